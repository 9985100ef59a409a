"""The `Target` record shared by every benchmark target, and an init strategy for flat priors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.distributions import biject_to


@dataclass(frozen=True)
class Target:
    r"""A posterior to fit, with reference draws to compare against.

    Arguments:
        name: Registry name of the target.
        description: One line on what the target is and what makes it hard.
        model: A Pyro model; it must broadcast over a leading particle dimension placed left of
            its `max_plate_nesting` plate dimensions (vectorized particles).
        draw_reference: Returns reference draws in the constrained space, keyed by site name,
            one row per draw: called as `draw_reference(num_draws, seed)`; `num_draws=None`
            means every stored draw (or a default number for exact samplers).
        args: Positional arguments of the model.
        max_plate_nesting: How many plate dimensions the model uses.
        exact: Whether the reference draws are independent exact draws (synthetic targets) or
            MCMC draws (posteriordb references).
        log_evidence: The log normalising constant of the model, where known.
        posterior: The posteriordb name of the posterior that the target ports, if any.
    """

    name: str
    description: str
    model: Callable[..., object]
    draw_reference: Callable[[int | None, int], dict[str, np.ndarray]]
    args: tuple = field(default=())
    max_plate_nesting: int = 0
    exact: bool = False
    log_evidence: float | None = None
    posterior: str | None = None

    def reference(self, num_draws: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        r"""Returns reference draws in the constrained space, keyed by site name.

        Arguments:
            num_draws: How many draws; `None` for all stored draws (or a default of 10,000 for
                exact samplers).
            seed: Seed of exact samplers; ignored by stored references.
        """
        return self.draw_reference(num_draws, seed)


def as_tensor(value: object) -> torch.Tensor:
    r"""Converts data to a tensor of the current default floating dtype."""
    return torch.as_tensor(np.asarray(value), dtype=torch.get_default_dtype())


def init_to_uniform_unconstrained(site: dict | None = None, radius: float = 2.0) -> object:
    r"""Initialises a latent site uniformly in `(-radius, radius)` of its unconstrained space.

    Pyro's own strategies sample the prior first, which fails on flat improper priors
    (`ImproperUniform`); this one needs only the site's support and shape.

    Arguments:
        site: A Pyro sample site; `None` returns the strategy itself.
        radius: Half-width of the uniform box in the unconstrained space.

    Returns:
        A value in the site's support.

    Example:
        >>> from pyro.infer import NUTS
        >>> kernel = NUTS(lambda: None, init_strategy=init_to_uniform_unconstrained)
    """
    if site is None:
        return init_to_uniform_unconstrained
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.shape())
    dtype = torch.get_default_dtype()
    u = (torch.rand(shape, dtype=dtype) * 2 - 1) * radius
    value = transform(u).detach()
    value._pyro_custom_init = False
    return value
