"""Bad inputs get an error that names the site or argument and says what to do.

One test per row of docs/errors.md that tests/test_guide_errors.py and tests/test_fit.py do not
already cover.
"""

import os
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flows import AutoFlowGuide, NonFiniteLossError, fit
from pyro_flows.checkpoint import load_checkpoint

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


def test_latent_sites_without_elements():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(0), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"no elements \(shapes \{'z': \(0,\)\}\)"):
        AutoFlowGuide(model)()


def test_a_size_given_as_an_int_is_checked_like_a_shape():
    def model(n):
        pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))

    guide = AutoFlowGuide(model)
    guide(3)
    with pytest.raises(ValueError, match=r"'z' of shape \(3,\).*gives it shape \(4,\)"):
        guide(4)


def test_a_float_argument_does_not_retrace_the_model():
    calls = []

    def model(temperature):
        calls.append(temperature)
        pyro.sample("z", dist.Normal(0.0, temperature))

    guide = AutoFlowGuide(model)
    guide(1.0)
    before = len(calls)
    for t in (0.5, 0.25):
        guide(t)
    assert len(calls) == before


# Flow options --------------------------------------------------------------------------------


def one_site():
    pyro.sample("mu", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"hidden_features": ()}, ValueError, r"hidden_features=\(\): give one positive int"),
        ({"hidden_features": (64, 0)}, ValueError, r"hidden_features=\(64, 0\)"),
        ({"hidden_features": 64}, TypeError, r"options \{'hidden_features': 64\}.*\(64, 64\)"),
        ({"transforms": -1}, ValueError, "transforms=-1: a flow needs at least one layer"),
        ({"flow": "nsf", "bins": 1}, ValueError, "bins=1: a spline needs at least 2 bins"),
        ({"activation": "relu"}, TypeError, r"'activation': 'relu'.*activation=torch.nn.ELU"),
        ({"flow": "IAF"}, ValueError, r"Unknown flow 'IAF': use one of \['iaf'"),
        ({"init_scale": float("inf")}, ValueError, "init_scale=inf: .* positive and finite"),
    ],
)
def test_bad_flow_options(options, error, message):
    with pytest.raises(error, match=message):
        AutoFlowGuide(one_site, **options)


# Checkpoints ---------------------------------------------------------------------------------


def three(name, d):
    def model():
        pyro.sample(name, d.expand([3]).to_event(1))

    return model


def small(model, **options):
    return AutoFlowGuide(model, **{"hidden_features": (8,), **options})


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "fit.pt"
    model = three("mu", dist.Normal(0.0, 1.0))
    fit(model, small(model), num_steps=3, checkpoint=path)
    pyro.clear_param_store()
    return path


def test_checkpoint_of_another_model_with_the_same_latent_size(checkpoint):
    other = three("sigma", dist.HalfNormal(1.0))  # same parameter shapes as the saved one
    with pytest.raises(
        ValueError, match=r"written for latent sites \{'mu': \[3\]\}.*have \{'sigma': \[3\]\}"
    ):
        fit(other, small(other), num_steps=5, checkpoint=checkpoint)
    fit(other, small(other), num_steps=5, checkpoint=checkpoint, resume=False)  # the way out
    assert load_checkpoint(checkpoint)["step"] == 5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"flow": "nsf_coupling"}, r"\{'flow': 'iaf', 'hidden_features': \(8,\)\}.*'nsf_coupl"),
        ({"hidden_features": (16,)}, r"have \{'flow': 'iaf', 'hidden_features': \(16,\)\}"),
        ({"randperm": True}, r"'randperm': True"),  # same shapes, other permutations
    ],
)
def test_checkpoint_of_another_flow_configuration(checkpoint, options, message):
    model = three("mu", dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match=message):
        fit(model, small(model, **options), num_steps=5, checkpoint=checkpoint)


def test_resume_may_change_stl_and_init_scale(checkpoint):
    model = three("mu", dist.Normal(0.0, 1.0))
    result = fit(model, small(model, init_scale=1.0), num_steps=5, checkpoint=checkpoint, stl=True)
    assert result.num_steps == 5


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1], ids=["empty", "10_bytes", "half", "last_byte"])
def test_truncated_checkpoint(checkpoint, cut):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    model = three("mu", dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match=r"is truncated or corrupted.*resume=False to overwrite"):
        fit(model, small(model), num_steps=5, checkpoint=checkpoint)


def test_corrupted_checkpoint(checkpoint):
    data = bytearray(checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is truncated or corrupted"):
        load_checkpoint(checkpoint)


class Payload:
    """Unpickling this creates a file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_asks_to_unpickle_code(tmp_path, writer):
    path, marker = tmp_path / "fit.pt", str(tmp_path / "pwned")
    state = {"format": "pyro_flows.fit/1", "step": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    model = three("mu", dist.Normal(0.0, 1.0))
    with warnings.catch_warnings():
        # torch warns about the protocol of a plain pickle before refusing it
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        with pytest.raises(ValueError, match=r"asks to unpickle code \((io|builtins).open\)"):
            fit(model, small(model), num_steps=5, checkpoint=path)
    assert not os.path.exists(marker)
