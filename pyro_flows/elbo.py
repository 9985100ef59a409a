r"""An ELBO with vectorized particles for models that do not broadcast over them, and the
checks that :func:`~pyro_flows.fit` makes of Pyro's own vectorized particles.

``Trace_ELBO(num_particles=8, vectorize_particles=True)`` draws the particles under a plate
that the model must broadcast over. A model that does not either fails (``fit`` then says
why and what to do: :func:`particles_error`) or, worse, runs and mixes the particles, giving
a wrong loss silently (``fit`` checks that once: :func:`mixed_particles`).
"""

__all__ = ["VmapTrace_ELBO"]

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine import Trace
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, warn_if_nan
from torch import Size, Tensor

from ._replay import (
    SetValues,
    log_probs,
    per_draw,
    sampled,
    samples,
    subsample_trace,
    to_draws,
    total,
    trace,
    traces,
)
from ._structure import plate_nesting
from ._vmap import Culprit, culprit, layer_advice, log_joint, reason

PARTICLES = "num_particles_vectorized"  # the name of Pyro's own plate over particles

HINT = "declare every batch dimension with pyro.plate and index tensors from the right (x[..., i])"


@dataclass(frozen=True)
class _Setup:
    r"""What one plain run of the guide and model tells: the shapes of one particle's latent
    values, and the dimension of the plate over particles."""

    key: tuple
    shapes: dict[str, Size]
    batch_ndim: int


class VmapTrace_ELBO(Trace_ELBO):
    r"""Creates a :class:`~pyro.infer.Trace_ELBO` whose particles are vectorized even where
    the model does not broadcast over them.

    The guide draws all particles in one run under a plate over particles, as with
    ``Trace_ELBO(vectorize_particles=True)`` (the guide must broadcast, as autoguides and
    :class:`~pyro_flows.AutoFlowGuide` do). The model is then run on each particle's values
    with :func:`torch.func.vmap`, so it is written for a single draw: a
    ``PyroModule[nn.Linear]`` with ``PyroSample`` weights (which fails under
    ``vectorize_particles=True``) is fine. Loss and gradients are those of ``Trace_ELBO``
    with ``num_particles`` particles, on the same draws; ``stl=True`` guides keep their
    "sticking the landing" gradient.

    Not supported (:py:`NotImplementedError` naming the site): guide sites that are not
    reparameterized or are enumerated, latent sites that the model draws itself (not in the
    guide), ``GuideMessenger`` guides, and models that :func:`torch.func.vmap` cannot run
    (``.item()``, Python control flow on tensor values, in-place writes into tensors made
    outside the model); for those use ``Trace_ELBO(num_particles=...)``. Pyro's validation
    is off inside the model's vectorized run; the first call checks the model once with it.

    Arguments:
        num_particles: The number of particles (draws from the guide) per estimate.
        max_plate_nesting: As in Pyro: the plate over particles goes to dimension
            ``-max_plate_nesting``. If :py:`math.inf`, one more than the model's plates,
            found by one plain run of the guide and model (as ``Trace_ELBO`` finds it).
        kwargs: Other keyword arguments of :class:`~pyro.infer.Trace_ELBO` (``retain_graph``
            ...), but not ``vectorize_particles``.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from torch import nn
        >>> from pyro.nn import PyroModule, PyroSample
        >>> from pyro_flows import AutoFlowGuide, fit
        >>> class Regression(PyroModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = PyroModule[nn.Linear](3, 1)
        ...         weight = dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2)
        ...         self.linear.weight = PyroSample(weight)
        ...         self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))
        ...     def forward(self, x, y=None):
        ...         mean = self.linear(x).squeeze(-1)
        ...         with pyro.plate("data", len(x)):
        ...             return pyro.sample("obs", dist.Normal(mean, 1.0), obs=y)
        >>> x, y = torch.randn(20, 3), torch.randn(20)
        >>> model = Regression()
        >>> guide = AutoFlowGuide(model, stl=True)
        >>> result = fit(model, guide, x, y, num_steps=5, loss=VmapTrace_ELBO(num_particles=8))
        >>> result.num_steps
        5

    References:
        | Automated Variational Inference in Probabilistic Programming (Wingate et al., 2013)
        | https://arxiv.org/abs/1301.1299

        | torch.func.vmap (PyTorch documentation)
        | https://docs.pytorch.org/docs/stable/generated/torch.func.vmap.html
    """

    def __init__(
        self, num_particles: int = 1, max_plate_nesting: float = math.inf, **kwargs: Any
    ) -> None:
        if not kwargs.pop("vectorize_particles", True):
            raise TypeError(
                "VmapTrace_ELBO always vectorizes its particles: drop vectorize_particles, or "
                "use Trace_ELBO(vectorize_particles=False) for one model run per particle."
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            **kwargs,
        )
        self._setup: _Setup | None = None

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        r"""Returns an estimate of the loss (the negative ELBO), without gradients."""
        setup = self._set_up(model, guide, args, kwargs)  # with gradients: guides set up
        with torch.no_grad():
            elbo, _ = self._elbo(setup, model, guide, args, kwargs)
        loss = -torch_item(elbo)
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        r"""Returns the loss, whose gradient is the ELBO's gradient estimate."""
        setup = self._set_up(model, guide, args, kwargs)
        elbo, surrogate = self._elbo(setup, model, guide, args, kwargs)
        loss = -elbo.detach() - (surrogate - surrogate.detach())
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        r"""Returns an estimate of the loss, and accumulates its gradient estimate into the
        parameters' ``.grad``."""
        setup = self._set_up(model, guide, args, kwargs)
        elbo, surrogate = self._elbo(setup, model, guide, args, kwargs)
        if surrogate.requires_grad:
            (-surrogate).backward(retain_graph=self.retain_graph)
        loss = -torch_item(elbo)
        warn_if_nan(loss, "loss")
        return loss

    def _elbo(
        self, setup: _Setup, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor]:
        r"""Returns the ELBO estimate and the surrogate whose gradient estimates the ELBO's."""
        n, batch_ndim = self.num_particles, setup.batch_ndim
        with pyro.plate(PARTICLES, n, dim=-batch_ndim):
            raw = poutine.trace(guide).get_trace(*args, **kwargs)
        guide_trace = prune_subsample_sites(raw)
        log_q, surrogate_q = _guide_terms(guide_trace, n, batch_ndim)
        values = {
            name: to_draws(guide_trace.nodes[name]["value"], n, shape)
            for name, shape in setup.shapes.items()
        }
        try:
            log_p = log_joint(model, values, n, args, kwargs, subsample_trace(raw))
        except RuntimeError as error:
            if "vmap" not in str(error):
                raise
            raise _not_vmappable(error) from error
        return (log_p - log_q).mean(), (log_p - surrogate_q).mean()

    def _set_up(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> _Setup:
        key = (model, guide, _shapes(args), _shapes(kwargs))
        if self._setup is None or not _same(self._setup.key, key):
            self._setup = self._plain_run(model, guide, args, kwargs, key)
        return self._setup

    def _plain_run(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, key: tuple
    ) -> _Setup:
        r"""Runs the guide and model once without particles (checking them as Pyro does)."""
        if isinstance(poutine.unwrap(guide), GuideMessenger):
            raise NotImplementedError(
                "VmapTrace_ELBO does not take a GuideMessenger guide (it runs the model "
                "itself): use Trace_ELBO(num_particles=...) instead."
            )
        with poutine.block():
            model_trace, guide_trace = traces(model, guide, args, kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace)
            model_trace.compute_log_prob()  # the support checks that vmap skips
        _check_guide(guide_trace)
        shapes = _latent_shapes(model_trace, guide_trace)
        nesting = self.max_plate_nesting
        if nesting == math.inf:
            sites = [site for t in (model_trace, guide_trace) for _, site in samples(t)]
            nesting = plate_nesting(sites) + 1
        return _Setup(key, shapes, int(nesting))


def _guide_terms(guide_trace: Trace, n: int, batch_ndim: int) -> tuple[Tensor, Tensor]:
    r"""Returns :math:`\log q` of each particle, and the terms of the surrogate: the
    log-densities through which the gradient flows (with ``stl``, stopped ones)."""
    guide_trace.compute_score_parts()
    log_q, surrogate = [], []
    for name, site in samples(guide_trace):
        if site["is_observed"]:
            continue
        log_prob, score_function, entropy_term = site["score_parts"]
        if not site["fn"].has_rsample or not _is_zero(score_function):
            raise _not_reparameterized(name, site)
        log_q.append(per_draw(log_prob, n, batch_ndim))
        surrogate.append(per_draw(entropy_term, n, batch_ndim))
    return torch.stack(log_q).sum(0), torch.stack(surrogate).sum(0)


def _is_zero(term: Tensor | float) -> bool:
    return isinstance(term, int | float) and term == 0


def _check_guide(guide_trace: Trace) -> None:
    for name, site in samples(guide_trace):
        if site["is_observed"]:
            continue
        if (site["infer"] or {}).get("enumerate"):
            raise NotImplementedError(
                f"VmapTrace_ELBO does not enumerate: guide site {name!r} has "
                f"infer={{'enumerate': ...}}. Use TraceEnum_ELBO."
            )
        if not site["fn"].has_rsample:
            raise _not_reparameterized(name, site)


def _not_vmappable(error: RuntimeError) -> NotImplementedError:
    return NotImplementedError(
        f"The model does not run under torch.func.vmap ({reason(error)}), which VmapTrace_ELBO "
        "runs it with: take .item(), Python control flow on tensor values and in-place "
        "writes into tensors made outside the model out of it, or use "
        "Trace_ELBO(num_particles=...) (one model run per particle)."
    )


def _not_reparameterized(name: str, site: dict) -> NotImplementedError:
    return NotImplementedError(
        f"VmapTrace_ELBO needs reparameterized guide sites, and site {name!r} "
        f"({type(site['fn']).__name__}) is not: its gradient needs the score function. Use "
        "Trace_ELBO(num_particles=...) (one model run per particle), or a guide that "
        "draws it by reparameterization."
    )


def _latent_shapes(model_trace: Trace, guide_trace: Trace) -> dict[str, Size]:
    r"""Returns the shapes of one particle's values of the model's latent sites."""
    shapes = {}
    for name, site in samples(model_trace):
        if site["is_observed"]:
            continue
        if name not in guide_trace.nodes:
            raise NotImplementedError(
                f"The model's latent site {name!r} is not in the guide: VmapTrace_ELBO "
                "runs the model on the guide's draws only. Use a guide that samples it, or "
                "Trace_ELBO(num_particles=...)."
            )
        shapes[name] = guide_trace.nodes[name]["value"].shape
    return shapes


def _shapes(args: tuple | dict) -> tuple:
    items = args.items() if isinstance(args, dict) else enumerate(args)
    return tuple((key, getattr(value, "shape", None)) for key, value in items)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:]


def particles_advice(found: Culprit | None, num_particles: int) -> str:
    r"""What to do about a model that does not broadcast over particles.

    Example:
        >>> print(particles_advice(None, 8))
        To fix it, pass loss=pyro_flows.VmapTrace_ELBO(num_particles=8) ...
    """
    options = [
        f"pass loss=pyro_flows.VmapTrace_ELBO(num_particles={num_particles}) (the guide's "
        "particles drawn vectorized, the model run on each under torch.func.vmap: as fast, "
        "and the model stays as written)"
    ]
    if found is None:
        options.append(f"make the model broadcast: {HINT}")
    elif layer_advice(found):
        options.append(layer_advice(found))
    options.append("pass vectorize_particles=False (one model run per particle, slow)")
    return "To fix it, " + "; or ".join(options) + "."


def particles_error(
    loss: Any, model: Callable, guide: Callable, args: tuple, kwargs: dict, error: Exception
) -> ValueError | None:
    r"""Explains an error of a step with particles vectorized under a plate, if the model
    and guide run without that plate (else returns :py:`None`: the error is another one)."""
    if not _runs_alone(model, guide, args, kwargs):
        return None
    found = culprit(error, model)
    text = (
        f"{type(loss).__name__}(num_particles={loss.num_particles}, vectorize_particles=True)"
        f" failed: the model does not broadcast over the particles ({type(error).__name__}: "
        f"{reason(error)}), though it runs with one particle. "
    )
    return ValueError(
        text + (f"{found} " if found else "") + particles_advice(found, loss.num_particles)
    )


def _runs_alone(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> bool:
    r"""Whether the guide and model run with one particle, without a plate over particles."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block():
            Trace_ELBO().loss(model, guide, *args, **kwargs)
    except Exception:
        return False
    return True


def mixed_particles(
    loss: Any, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> ValueError | None:
    r"""Checks that a loss's plate over particles does not mix particles in the model.

    Two particles are drawn under the plate (as the loss draws them) and each is rerun alone
    on the same draw: a model that broadcasts the plate's dimension wrongly (a matrix product
    with the data on the left, say) runs, but gives other log-densities. Returns the error
    to raise, or :py:`None`.
    """
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block():
            name = _mixed_site(model, guide, args, kwargs, int(loss.max_plate_nesting))
    except Exception:  # a check that cannot run (a guide that needs gradients...) passes
        return None
    if name is None:
        return None
    found = culprit(None, model)
    text = (
        f"{type(loss).__name__}(num_particles={loss.num_particles}, vectorize_particles=True)"
        f" gives a wrong loss for this model: {name} has another log-density in the run "
        "vectorized over particles than in a run of one particle on the same draw, so the "
        "model mixes the particles. "
    )
    return ValueError(
        text + (f"{found} " if found else "") + particles_advice(found, loss.num_particles)
    )


def _mixed_site(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, batch_ndim: int
) -> str | None:
    r"""Returns the first site (or "the guide") whose log-density differs between two
    particles drawn under a plate over particles and single runs on the same draws."""
    if isinstance(poutine.unwrap(guide), GuideMessenger):
        return None
    _, plain = traces(model, guide, args, kwargs)
    shapes = {name: site["value"].shape for name, site in samples(plain)}
    with pyro.plate(PARTICLES, 2, dim=-batch_ndim):
        raw = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = trace(poutine.replay(model, trace=raw), args, kwargs)
    guide_trace, indices = prune_subsample_sites(raw), subsample_trace(raw)
    model_lp = log_probs(model_trace, 2, batch_ndim)
    log_q = total(log_probs(guide_trace, 2, batch_ndim), 2)
    for i in range(2):
        given = {
            name: to_draws(site["value"], 2, shapes[name])[i]
            for name, site in samples(guide_trace)
            if sampled(site)
        }
        alone = poutine.replay(SetValues(given)(guide), trace=indices)
        single_model, single_guide = traces(model, alone, args, kwargs)
        for name, log_prob in log_probs(single_model, 1, None).items():
            if name in model_lp and not _close(model_lp[name][i], log_prob[0]):
                return f"site {name!r}"
        if not _close(log_q[i], total(log_probs(single_guide, 1, None), 1)[0]):
            return "the guide"
    return None


def _close(a: Tensor, b: Tensor) -> bool:
    # float32 sums of the same terms in another order: relative differences of about 1e-6
    return bool(torch.isclose(a, b.to(a), rtol=1e-4, atol=1e-3, equal_nan=True))
