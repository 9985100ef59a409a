"""The guides compared by the benchmark: a dict of named constructors `model -> guide`.

Each also takes `start=`, a `pyro_flows.LaplaceStart` (`--start laplace`): the guide starts at
its mode, with its scale per coordinate where the guide has one (`AutoNormal`,
`AutoMultivariateNormal`, `AutoFlowGuide`); Pyro's flows ignore both.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from pyro.distributions.transforms import iterated, spline_autoregressive
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam

from pyro_flows import AutoFlowGuide, LaplaceStart, init_to_median_or_feasible

# Every guide starts from the same point: Pyro's default `init_to_median`, falling back to a
# feasible point for flat improper priors (where Pyro's own strategies fail). Pyro's flows
# ignore the start point but need it to trace the model.
INIT = init_to_median_or_feasible
PYRO_FLOW_LAYERS = 3


def _with_init(model: Callable, start: LaplaceStart | None = None) -> Callable:
    return InitMessenger(INIT if start is None else start.init_loc_fn)(model)


class _AutoNormalFrom(AutoNormal):
    """`AutoNormal` with a scale per coordinate at set-up (its `init_scale` is one number)."""

    def __init__(self, model: Callable, start: LaplaceStart) -> None:
        super().__init__(model, init_loc_fn=start.init_loc_fn)
        self._start_scales = start.scales

    def _setup_prototype(self, *args: object, **kwargs: object) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, scale in self._start_scales.items():
            param = PyroParam(scale.clone(), self.scale_constraint, self._event_dims[name])
            deep_setattr(self.scales, name, param)


class _AutoMultivariateNormalFrom(AutoMultivariateNormal):
    """`AutoMultivariateNormal` with a scale per coordinate at set-up."""

    def __init__(self, model: Callable, start: LaplaceStart) -> None:
        super().__init__(model, init_loc_fn=start.init_loc_fn)
        self._start_scales = start.scales

    def _setup_prototype(self, *args: object, **kwargs: object) -> None:
        super()._setup_prototype(*args, **kwargs)
        names = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
        scale = torch.cat([self._start_scales[name].reshape(-1) for name in names])
        self.scale = PyroParam(scale.to(self.loc), self.scale_constraint)


def auto_normal(model: Callable, start: LaplaceStart | None = None) -> AutoNormal:
    r"""Pyro's mean-field `AutoNormal`."""
    if start is not None:
        return _AutoNormalFrom(model, start)
    return AutoNormal(model, init_loc_fn=INIT)


def auto_mvn(model: Callable, start: LaplaceStart | None = None) -> AutoMultivariateNormal:
    r"""Pyro's full-rank Gaussian `AutoMultivariateNormal`."""
    if start is not None:
        return _AutoMultivariateNormalFrom(model, start)
    return AutoMultivariateNormal(model, init_loc_fn=INIT)


def auto_iaf(model: Callable, start: LaplaceStart | None = None) -> AutoIAFNormal:
    r"""Pyro's `AutoIAFNormal` with its defaults (one affine autoregressive layer)."""
    return AutoIAFNormal(_with_init(model, start))


def auto_spline(model: Callable, start: LaplaceStart | None = None) -> AutoNormalizingFlow:
    r"""Pyro's `AutoNormalizingFlow` with 3 autoregressive rational-quadratic spline layers."""
    transform = partial(iterated, PYRO_FLOW_LAYERS, spline_autoregressive)
    return AutoNormalizingFlow(_with_init(model, start), transform)


def flow_guide(flow: str = "iaf", **options: object) -> Callable[..., AutoFlowGuide]:
    r"""Returns a constructor of `pyro_flows.AutoFlowGuide` with a named flow family and
    options (the package's defaults otherwise)."""

    def build(model: Callable, start: LaplaceStart | None = None) -> AutoFlowGuide:
        if start is None:
            return AutoFlowGuide(model, flow=flow, **options)
        laplace = {"init_loc_fn": start.init_loc_fn, "init_scale": start.scales}
        return AutoFlowGuide(model, flow=flow, **{**options, "init": "prior", **laplace})

    shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "other options at defaults"
    build.__doc__ = f"pyro-flows' AutoFlowGuide, flow={flow!r}, {shown}."
    return build


BASELINE = "AutoNormal"

GUIDES: dict[str, Callable[[Callable], object]] = {
    BASELINE: auto_normal,
    "AutoMultivariateNormal": auto_mvn,
    "AutoIAFNormal": auto_iaf,
    "AutoNormalizingFlow(spline)": auto_spline,
    # The default: iaf, Pathfinder start, linear layer, STL.
    "AutoFlowGuide": flow_guide(),
    "AutoFlowGuide(nsf)": flow_guide("nsf"),
    "AutoFlowGuide(nsf_coupling)": flow_guide("nsf_coupling"),
    "AutoFlowGuide(realnvp)": flow_guide("realnvp"),
    # AutoNormal's start and no STL: how version 0.1 started and trained (and the linear layer).
    "AutoFlowGuide(init=prior,stl=False)": flow_guide(init="prior", stl=False),
}
