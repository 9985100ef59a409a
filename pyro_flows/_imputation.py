r"""The elements of ``obs_mask`` imputation sites that the model throws away.

``pyro.sample(name, fn, obs=y, obs_mask=m)`` samples a latent site ``{name}_unobserved`` of
the full shape of ``y`` and keeps its values only where ``m`` is False. The other elements
have no density in the model and no effect on it, so a guide's entropy alone drives them,
without bound: under an affine flow they reached 1e9 in 1,500 steps, and the other
coordinates, which the flow's layers condition on them, lost their accuracy (measured).
:class:`~pyro_flows.AutoFlowGuide` leaves them out of its packed latent and holds them at
the observed values.
"""

from __future__ import annotations

__all__ = ["discarded_elements", "scatter_live"]

import torch
from pyro.poutine.trace_struct import Trace
from torch import Tensor


def discarded_elements(trace: Trace) -> dict[str, tuple[Tensor, Tensor]]:
    r"""Finds the elements of ``obs_mask`` imputation sites that the model throws away.

    Arguments:
        trace: A trace of the model (its latent sites may be conditioned).

    Returns:
        For each latent site that ``obs_mask`` made and that has such elements, a boolean
        tensor of the site's batch shape, true where the element is thrown away, and the
        observed values (with the site's shape).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y, mask):
        ...     with pyro.plate("data", 3):
        ...         pyro.sample("y", dist.Normal(0.0, 1.0), obs=y, obs_mask=mask)
        >>> mask = torch.tensor([True, False, True])
        >>> trace = pyro.poutine.trace(model).get_trace(torch.tensor([1.0, 0.0, 2.0]), mask)
        >>> discarded_elements(trace)
        {'y_unobserved': (tensor([ True, False,  True]), tensor([1., 0., 2.]))}
    """

    found = {}
    for name, site in trace.nodes.items():  # conditioned latent sites count as observed
        base = name.removesuffix("_unobserved")
        observed = trace.nodes.get(f"{base}_observed")
        if base == name or site["type"] != "sample" or observed is None:
            continue
        if not observed["is_observed"]:
            continue
        latent_mask, observed_mask = site["mask"], observed["mask"]
        if not (isinstance(latent_mask, Tensor) and isinstance(observed_mask, Tensor)):
            continue
        discarded = (observed_mask & ~latent_mask).expand(site["fn"].batch_shape)
        if discarded.any():
            found[name] = discarded, observed["value"].detach().expand(site["value"].shape)
    return found


def scatter_live(fill: Tensor, live: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    r"""Returns ``fill`` expanded to ``shape``, with ``values`` in the ``live`` elements.

    Arguments:
        fill: The value of every element that is not live.
        live: Which elements are live, with the shape of ``fill``.
        values: The live elements, with shape :math:`(*, L)` in row-major order.
        shape: The output shape: a batch shape followed by the shape of ``fill``.

    Example:
        >>> live = torch.tensor([False, True, True])
        >>> scatter_live(torch.zeros(3), live, torch.tensor([[1.0, 2.0]]), torch.Size([1, 3]))
        tensor([[0., 1., 2.]])
    """

    return fill.to(values).expand(shape).masked_scatter(live.expand(shape), values)
