"""The exceptions of pyro_flows.errors: bad data is a DataError that names the observed site or
argument, at set-up and in fit, for any guide.

(The errors of each function are tested with the function: test_guides.py, test_fitting.py,
test_flows.py, ...)
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_flows
from pyro_flows import AutoFlowGuide, NonFiniteLossError, fit

NAN, INF = float("nan"), float("inf")


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)


def masked(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=torch.isfinite(y))


# NaN or inf in the data ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_observation_is_named_at_set_up(bad):
    y = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(
        ValueError,
        match=r"Observed site 'y' holds .* of 3 \(the model's argument 'y'\), the "
        r"first at index \(1,\).*replace them with any finite value.*mask them out",
    ):
        AutoFlowGuide(regression)(torch.ones(3), y)


def test_masked_nan_observation_is_named_too():
    # Pyro's obs_mask leaves the NaN in the observed site: the loss is finite, the gradients NaN.
    with pytest.raises(ValueError, match=r"Observed site 'y_observed' holds 1 NaN"):
        AutoFlowGuide(masked)(torch.tensor([0.5, NAN, 1.0]))
    pyro.clear_param_store()
    guide = AutoFlowGuide(masked)  # the advice: a finite placeholder, masked out
    assert set(guide(torch.tensor([0.5, 0.0, 1.0]))) == {"mu", "y_unobserved"}


@pytest.mark.parametrize("validation", [True, False])
def test_nonfinite_covariate_is_named_at_set_up(validation):
    x = torch.tensor([1.0, NAN, 2.0])
    with (
        pyro.validation_enabled(validation),
        pytest.raises(ValueError, match=r"argument 'x' holds 1 NaN and 0 infinite.*finite value"),
    ):
        AutoFlowGuide(regression)(x, torch.zeros(3))


def test_fit_stops_at_once_on_bad_data_with_a_flow_guide():
    calls = []

    def callback(step, loss):
        calls.append(step)

    x = torch.tensor([1.0, NAN])
    with pytest.raises(ValueError, match="argument 'x' holds 1 NaN") as info:
        fit(regression, AutoFlowGuide(regression), x, torch.zeros(2), callback=callback)
    assert not isinstance(info.value, NonFiniteLossError) and calls == []  # not retried


@pytest.mark.parametrize("where", ["y", "x"])
def test_fit_names_bad_data_with_any_guide(where):
    data = {"x": torch.ones(3), "y": torch.zeros(3)}
    data[where] = torch.tensor([0.0, NAN, 1.0])
    expected = {"y": r"site 'y' is observed and its data hold NaN", "x": r"site 'y' has log-dens"}
    with pytest.raises(NonFiniteLossError, match=rf"{expected[where]}.*argument '{where}' holds"):
        fit(regression, AutoNormal(regression), data["x"], data["y"], num_steps=5)


def test_integer_and_finite_data_pass():
    def counts(y):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(rate), obs=y)

    assert set(AutoFlowGuide(counts)(torch.tensor([0.0, 3.0, 1.0]))) == {"rate"}


# Latent sites ------------------------------------------------------------------------------


# Flow options --------------------------------------------------------------------------------


# Checkpoints ---------------------------------------------------------------------------------


def test_exceptions_are_exported_and_catchable_as_builtins():
    assert issubclass(pyro_flows.DataError, ValueError)
    assert issubclass(pyro_flows.NonFiniteLossError, FloatingPointError)
    error = pyro_flows.NonFiniteLossError("the loss is nan", site="y", result="r")
    assert (str(error), error.site, error.result) == ("the loss is nan", "y", "r")
