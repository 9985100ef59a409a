r"""Initialization strategies for :class:`~pyro_flows.AutoFlowGuide`."""

from __future__ import annotations

__all__ = ["init_to_median_or_feasible"]

import torch
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.runtime import Message
from torch import Tensor

from .supports import site_bijection


def init_to_median_or_feasible(site: Message) -> Tensor:
    r"""Initializes a site to its prior median, or to a feasible point if the prior has none.

    As Pyro's :func:`~pyro.infer.autoguide.initialization.init_to_median`, which is the
    default of Pyro's autoguides, except that a prior that cannot be sampled, such as a flat
    improper :class:`~pyro.distributions.ImproperUniform`, falls back to the image of zero
    under the guide's bijection onto the support
    (:func:`~pyro_flows.supports.site_bijection`, which also maps lower-Cholesky and positive
    definite supports) instead of failing (Pyro's own ``init_to_feasible`` samples the prior
    too).

    Arguments:
        site: A Pyro sample site.

    Returns:
        The initial value, in the site's support.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro.distributions import constraints
        >>> site = {"name": "s", "fn": dist.ImproperUniform(constraints.positive, (), ()),
        ...         "value": None, "is_observed": False}
        >>> init_to_median_or_feasible(site)
        tensor(1.)
    """

    try:
        return init_to_median(site)
    except NotImplementedError:
        fn = site["fn"]
        transform = site_bijection(fn.support)
        return transform(torch.zeros(transform.inverse_shape(fn.shape())))
