"""The guides compared by the benchmark: a dict of named constructors `model -> guide`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pyro.distributions.transforms import iterated, spline_autoregressive
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.autoguide.initialization import InitMessenger

from pyro_flows import AutoFlowGuide, init_to_median_or_feasible

# Every guide starts from the same point: Pyro's default `init_to_median`, falling back to a
# feasible point for flat improper priors (where Pyro's own strategies fail). Pyro's flows
# ignore the start point but need it to trace the model.
INIT = init_to_median_or_feasible
PYRO_FLOW_LAYERS = 3


def _with_init(model: Callable) -> Callable:
    return InitMessenger(INIT)(model)


def auto_normal(model: Callable) -> AutoNormal:
    r"""Pyro's mean-field `AutoNormal`."""
    return AutoNormal(model, init_loc_fn=INIT)


def auto_mvn(model: Callable) -> AutoMultivariateNormal:
    r"""Pyro's full-rank Gaussian `AutoMultivariateNormal`."""
    return AutoMultivariateNormal(model, init_loc_fn=INIT)


def auto_iaf(model: Callable) -> AutoIAFNormal:
    r"""Pyro's `AutoIAFNormal` with its defaults (one affine autoregressive layer)."""
    return AutoIAFNormal(_with_init(model))


def auto_spline(model: Callable) -> AutoNormalizingFlow:
    r"""Pyro's `AutoNormalizingFlow` with 3 autoregressive rational-quadratic spline layers."""
    transform = partial(iterated, PYRO_FLOW_LAYERS, spline_autoregressive)
    return AutoNormalizingFlow(_with_init(model), transform)


def flow_guide(flow: str, stl: bool = False) -> Callable[[Callable], AutoFlowGuide]:
    r"""Returns a constructor of `pyro_flows.AutoFlowGuide` with a named flow family."""

    def build(model: Callable) -> AutoFlowGuide:
        return AutoFlowGuide(model, flow=flow, stl=stl)

    build.__doc__ = (
        f"pyro-flows' AutoFlowGuide, flow={flow!r}, stl={stl}, other options at defaults."
    )
    return build


BASELINE = "AutoNormal"

GUIDES: dict[str, Callable[[Callable], object]] = {
    BASELINE: auto_normal,
    "AutoMultivariateNormal": auto_mvn,
    "AutoIAFNormal": auto_iaf,
    "AutoNormalizingFlow(spline)": auto_spline,
    "AutoFlowGuide(iaf)": flow_guide("iaf"),
    "AutoFlowGuide(nsf)": flow_guide("nsf"),
    "AutoFlowGuide(nsf_coupling)": flow_guide("nsf_coupling"),
    "AutoFlowGuide(realnvp)": flow_guide("realnvp"),
    # The recommended recipe: the "sticking the landing" gradient (docs/guide.md).
    "AutoFlowGuide(iaf)+stl": flow_guide("iaf", stl=True),
}
