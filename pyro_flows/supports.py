r"""Latent sites whose support depends on other latents (e.g. ``Uniform(0, 1 - a)``).

Pyro's autoguides fix each site's bijection to its support when they first trace the model;
a support that moves with an upstream draw then breaks them. These helpers find such sites
and map unconstrained values through the support that each site has *given the upstream
draws*, by running the model with those draws in place.
"""

from __future__ import annotations

__all__ = ["ConstrainMessenger", "dependent_support_sites", "trace_with_leaf_latents"]

from collections.abc import Callable, Iterable, Iterator

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from torch import Tensor
from torch.distributions import biject_to


def _constraint_tensors(constraint: object) -> Iterator[Tensor]:
    for value in vars(constraint).values():
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, constraints.Constraint):
            yield from _constraint_tensors(value)
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, Tensor):
                    yield item
                elif isinstance(item, constraints.Constraint):
                    yield from _constraint_tensors(item)


def trace_with_leaf_latents(
    model: Callable[..., object],
    values: dict[str, Tensor],
    *args: object,
    **kwargs: object,
) -> Trace:
    r"""Traces the model with each latent set to a leaf tensor that requires a gradient.

    In the trace, a site whose support holds a tensor that requires a gradient depends on
    another latent (or on a ``pyro.param``); see :func:`dependent_support_sites`.

    Arguments:
        model: The model.
        values: A value for every latent site, in the constrained space.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.

    Returns:
        The trace of the whole model (observed sites and plates included).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("a", dist.Beta(2.0, 2.0))
        >>> trace = trace_with_leaf_latents(model, {"a": torch.tensor(0.5)})
        >>> trace.nodes["a"]["value"].requires_grad
        True
    """

    leaves = {name: value.detach().requires_grad_() for name, value in values.items()}
    with torch.enable_grad():
        conditioned = poutine.condition(model, data=leaves)
        return poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)


def dependent_support_sites(trace: Trace, names: Iterable[str]) -> set[str]:
    r"""Finds the sites whose support varies with other latents or with parameters.

    Arguments:
        trace: A trace from :func:`trace_with_leaf_latents`.
        names: The latent sites to check.

    Returns:
        The names of the sites with a dependent support.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     a = pyro.sample("a", dist.Beta(2.0, 2.0))
        ...     pyro.sample("b", dist.Uniform(0.0, 1.0 - a))
        >>> values = {"a": torch.tensor(0.5), "b": torch.tensor(0.2)}
        >>> dependent_support_sites(trace_with_leaf_latents(model, values), values)
        {'b'}
    """

    dependent = set()
    for name in names:
        support = trace.nodes[name]["fn"].support
        if any(t.requires_grad for t in _constraint_tensors(support)):
            dependent.add(name)
    return dependent


class ConstrainMessenger(Messenger):
    r"""Maps unconstrained values onto the support that each site has in this run.

    Used around a model, it sets each named latent site to
    :math:`x = T(u)` with :math:`T` = ``biject_to(support)`` of the site's distribution as
    the model builds it from the values already set upstream, and records
    :math:`\log |\det \partial x / \partial u|`.

    Arguments:
        unconstrained: The unconstrained value of each latent site.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     a = pyro.sample("a", dist.Beta(2.0, 2.0))
        ...     return pyro.sample("b", dist.Uniform(0.0, 1.0 - a))
        >>> with ConstrainMessenger({"a": torch.tensor(0.0), "b": torch.tensor(0.0)}) as m:
        ...     b = model()
        >>> b
        tensor(0.2500)
        >>> sorted(m.values)
        ['a', 'b']
    """

    def __init__(self, unconstrained: dict[str, Tensor]) -> None:
        super().__init__()
        self.unconstrained = unconstrained
        self.values: dict[str, tuple[Tensor, Tensor]] = {}

    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.unconstrained:
            return
        fn = msg["fn"]
        u = self.unconstrained[name]
        transform = biject_to(fn.support)
        value = transform(u)
        ladj = transform.log_abs_det_jacobian(u, value)
        ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + fn.event_dim)
        self.values[name] = (value, ladj)
        msg["value"] = value
        msg["done"] = True
