"""fit: the loop against a plain SVI loop, the non-finite guard, interrupts, early stopping,
progress, and checkpoint files (resume, mismatch, corruption, safety)."""

import io
import math
import os
import pickle
import signal
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

import pyro_flows._checkpoint
from pyro_flows import AutoFlowGuide, FitResult, NonFiniteLossError, fit, load_checkpoint
from pyro_flows._loop import plateau as _plateau

DATA = torch.tensor([1.2, 0.8, 1.1, 2.0, 0.3])


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=x)


@pytest.fixture(params=[True, False], ids=["validation", "no_validation"])
def validation(request):
    """Runs a test with Pyro's and torch's argument validation on, then off."""

    with pyro.validation_enabled(request.param):
        yield request.param


def params():
    store = pyro.get_param_store()
    return {name: p.detach().clone() for name, p in store.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_same_as_svi_loop():
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses, iterates = [], []
    for _ in range(30):
        losses.append(svi.step(DATA))
        iterates.append(params())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    optim = pyro.optim.Adam({"lr": 0.02})
    result = fit(model, AutoNormal(model), DATA, num_steps=30, optim=optim, average=0)
    assert result.losses == losses and result.averaged_steps == 0
    assert result.stop_reason == "completed" and not result.interrupted
    assert_same(params(), iterates[-1])

    # By default, the mean of the last 20% of the iterates (6 of 30): the same steps.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    optim = pyro.optim.Adam({"lr": 0.02})
    result = fit(model, AutoNormal(model), DATA, num_steps=30, optim=optim)
    assert result.losses == losses and result.averaged_steps == 6
    assert "averaged over the last 6 steps" in str(result)
    found = params()
    for name, value in found.items():
        mean = torch.stack([iterate[name] for iterate in iterates[-6:]]).mean(0)
        torch.testing.assert_close(value, mean)


def nan_at(calls, kind):
    """A model whose log-density (or its gradient) is NaN at the given attempts."""

    count = [-1]  # AutoNormal runs the model once to set itself up

    def model(x):
        attempt = count[0]
        count[0] += 1
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
        if attempt in calls:
            if kind == "loss":
                pyro.factor("bad", mu * math.nan)
            else:
                pyro.factor("bad", torch.sqrt(mu * 0.0))

    return model


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nan_step_is_undone(kind, validation):
    bad = nan_at({20}, kind)
    optim = pyro.optim.Adam({"lr": 0.05})
    seen = []
    result = fit(
        bad, AutoNormal(bad), DATA, num_steps=40, optim=optim, callback=lambda s, x: seen.append(s)
    )
    # Steps 0..19 succeed; the 21st attempt fails and undoes step 19, which is redone.
    assert seen == list(range(20)) + list(range(19, 40))
    assert result.num_steps == 40 and result.num_failures == 1 and result.lr_factor == 0.5
    assert all(math.isfinite(x) for x in result.losses)
    assert all(torch.isfinite(p).all() for p in params().values())
    for adam in optim.optim_objs.values():
        assert adam.param_groups[0]["lr"] == 0.025


def test_failures_in_a_row_and_apart_keep_optimizer_state(validation):
    # attempts 10 and 11 fail in a row; 13 fails after one good step, restoring a snapshot
    # taken right after a roll-back (whose optimizers had not been re-created yet)
    bad = nan_at({10, 11, 13}, "loss")
    optim = pyro.optim.Adam({"lr": 0.05})
    result = fit(bad, AutoNormal(bad), DATA, num_steps=30, optim=optim)
    assert result.num_failures == 3 and result.lr_factor == 0.125
    for adam in optim.optim_objs.values():
        assert adam.param_groups[0]["lr"] == 0.05 * 0.125
        for state in adam.state.values():
            assert state["step"] == 30  # Adam's own count of the updates that were kept


def test_undo_restores_last_good_state(validation):
    # A run with a NaN at attempt 10 must equal one that restarts from the state after
    # step 9 with half the learning rate and the random stream advanced by two attempts.
    optim = pyro.optim.Adam({"lr": 0.05})
    bad = nan_at({10}, "loss")
    fit(bad, AutoNormal(bad), DATA, num_steps=12, optim=optim, average=0)
    with_nan = params()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    good = nan_at(set(), "loss")
    guide = AutoNormal(good)
    svi = SVI(good, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(9):
        svi.step(DATA)
    state = pyro.get_param_store().get_state()
    state = {"params": {k: v.detach().clone() for k, v in state["params"].items()}}
    optim_state = pyro_flows._checkpoint.clone(svi.optim.get_state())
    svi.step(DATA)  # step 9, undone after the failed attempt 10
    svi.loss(good, guide, DATA)  # the failed attempt 10 draws from the guide too
    with torch.no_grad():
        for name, p in pyro.get_param_store().named_parameters():
            p.copy_(state["params"][name])
    for entry in optim_state.values():
        pyro_flows._checkpoint.scale_lr(entry, 0.5)
    svi.optim = pyro.optim.Adam({"lr": 0.05})
    svi.optim.set_state(optim_state)
    for _ in range(3):  # steps 9, 10, 11
        svi.step(DATA)
    assert_same(with_nan, params())


def always_nan(kind):
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        scale = torch.tensor(-1.0) if kind == "scale" else torch.tensor(1.0)
        with pyro.plate("data", len(x)):
            obs = x * math.nan if kind == "data" else x
            pyro.sample("obs", dist.Normal(mu, scale), obs=obs)
        if kind == "factor":
            pyro.factor("bad", mu * math.nan)

    return model


@pytest.mark.parametrize("kind,site", [("factor", "bad"), ("data", "obs"), ("scale", "obs")])
def test_always_nan_names_the_site(kind, site, tmp_path, validation):
    bad = always_nan(kind)
    path = tmp_path / "fit.pt"
    with pytest.raises(NonFiniteLossError, match=f"'{site}'") as info:
        fit(bad, AutoNormal(bad), DATA, num_steps=50, max_failures=4, checkpoint=path)
    assert info.value.site == site
    assert info.value.result.num_failures == 4
    assert all(torch.isfinite(p).all() for p in params().values())
    assert load_checkpoint(path)["step"] == info.value.result.num_steps


def test_nan_after_good_steps_keeps_work(validation):
    bad = nan_at(set(range(15, 1000)), "loss")
    with pytest.raises(NonFiniteLossError, match="'bad'") as info:
        fit(bad, AutoNormal(bad), DATA, num_steps=50, max_failures=3)
    # the first failure undoes step 14; later ones retry from the same state
    assert info.value.result.num_steps == 14
    assert info.value.result.lr_factor == 0.125


class InterruptingAdam(pyro.optim.PyroOptim):
    """Adam that updates one parameter of its n-th step, then raises KeyboardInterrupt."""

    def __init__(self, n):
        super().__init__(torch.optim.Adam, {"lr": 0.02})
        self.calls, self.n = 0, n

    def __call__(self, params, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            super().__call__(list(params)[:1])
            raise KeyboardInterrupt
        super().__call__(params, *args, **kwargs)


def interrupt_at(step):
    def callback(s, loss):
        if s == step:
            raise KeyboardInterrupt

    return callback


def adam():
    return pyro.optim.Adam({"lr": 0.02})


def sigint_at(attempt):
    """A model that sends this process Ctrl-C (SIGINT) in the middle of the given attempt."""

    count = [-1]  # AutoNormal runs the model once to set itself up

    def sending_model(x):
        if count[0] == attempt:
            os.kill(os.getpid(), signal.SIGINT)
        count[0] += 1
        model(x)

    return sending_model


def test_ctrl_c_finishes_the_step(tmp_path):
    fit(model, AutoNormal(model), DATA, num_steps=30, optim=adam())
    expected = params()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    path = tmp_path / "fit.pt"
    interrupting = sigint_at(10)
    guide = AutoNormal(interrupting)
    result = fit(interrupting, guide, DATA, num_steps=30, optim=adam(), checkpoint=path)
    assert result.stop_reason == "interrupted" and result.num_steps == 11
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back

    pyro.clear_param_store()
    fit(model, AutoNormal(model), DATA, num_steps=30, optim=adam(), checkpoint=path)
    assert_same(params(), expected)


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoIAFNormal": AutoIAFNormal,
    "AutoFlowGuide_stl": partial(AutoFlowGuide, stl=True),
    "AutoFlowGuide_nsf": partial(AutoFlowGuide, flow="nsf", randperm=True),
}
SCHEDULE = {"lr_schedule": lambda t: 0.99**t}
STOPS = {
    # how the first run stops: (its arguments, steps done, stop reason)
    "callback": (
        lambda: dict(callback=interrupt_at(24), optim=adam(), **SCHEDULE),
        25,
        "interrupted",
    ),
    "mid_update": (lambda: dict(optim=InterruptingAdam(25)), 24, "interrupted"),
    # inside the final 20% of the 60 steps, whose parameters are averaged: the checkpoint
    # holds the running mean of steps 49 to 53, and the resumed fit adds 54 to 60
    "averaging": (lambda: dict(callback=interrupt_at(52), optim=adam()), 53, "interrupted"),
    "num_steps": (
        lambda: dict(num_steps=25, checkpoint_every=10, optim=adam(), **SCHEDULE),
        25,
        "completed",
    ),
}


CASES = [("AutoNormal", how) for how in STOPS] + [
    ("AutoIAFNormal", "callback"),  # a Pyro flow, with a permutation buffer
    ("AutoFlowGuide_stl", "callback"),
    ("AutoFlowGuide_stl", "mid_update"),  # with undone non-finite steps before the stop
    ("AutoFlowGuide_nsf", "num_steps"),  # zuko's random permutations
]


@pytest.mark.parametrize("name,how", CASES)
def test_resume_equals_uninterrupted(name, how, tmp_path):
    guide = GUIDES[name]
    first, done, reason = STOPS[how]
    first = first()
    schedule = SCHEDULE if "lr_schedule" in first else {}
    fit(model, guide(model), DATA, num_steps=60, optim=adam(), **schedule)
    expected = params()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    path = tmp_path / "fit.pt"
    result = fit(model, guide(model), DATA, **{"num_steps": 60, "checkpoint": path, **first})
    assert result.stop_reason == reason
    assert result.num_steps == done - result.num_failures  # each failure undoes a step

    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # another random stream, and a guide built from it
    result = fit(
        model, guide(model), DATA, num_steps=60, optim=adam(), checkpoint=path, **schedule
    )
    assert result.num_steps == 60 and result.stop_reason == "completed"
    assert_same(params(), expected)
    assert load_checkpoint(path)["step"] == 60
    assert [p.name for p in tmp_path.iterdir()] == ["fit.pt"]  # no temporary file left


@pytest.mark.parametrize("show", [None, True, False])
@pytest.mark.parametrize("stream", [TTY, io.StringIO], ids=["terminal", "log"])
def test_progress_bar(show, stream):
    file = stream()
    fit(model, AutoNormal(model), DATA, num_steps=20, file=file, progress_bar=show)
    shown = show if show is not None else stream is TTY
    text = file.getvalue()
    assert ("20/20" in text and "elbo=" in text) if shown else text == ""


def test_plateau_rule():
    falling = [10.0 - i for i in range(10)]
    assert not _plateau(falling, 5, 0.0)
    assert not _plateau(falling[:5], 5, 0.0)  # one block: nothing to compare with
    assert _plateau(falling[:5] + [9.0] * 5, 5, 0.0)  # block means 8 then 9
    assert not _plateau(falling + [0.5] * 5, 5, 0.0)  # 0.5 < 3, the best earlier block
    assert _plateau(falling + [0.5] * 5, 5, 3.0)  # but not by more than min_delta = 3
    assert not _plateau(falling[:9], 5, 0.0)  # only checked at block ends
    assert not _plateau(falling + [9.0] * 5, None, 0.0)


def test_early_stopping():
    optim = pyro.optim.Adam({"lr": 0.1})
    result = fit(model, AutoNormal(model), DATA, num_steps=5000, optim=optim, patience=100)
    assert result.stop_reason == "early_stopping"
    assert result.num_steps % 100 == 0 and result.num_steps < 5000
    assert _plateau(result.losses, 100, 0.0)


def test_callback_stops():
    result = fit(model, AutoNormal(model), DATA, num_steps=50, callback=lambda s, x: s == 9)
    assert result.num_steps == 10 and result.stop_reason == "callback"


class GuideWithSTL(AutoNormal):
    stl = False


def test_stl_flag_is_deprecated_and_still_works():
    guide = GuideWithSTL(model)
    with pytest.warns(FutureWarning, match=r"AutoFlowGuide\(model, stl=True\)"):
        fit(model, guide, DATA, num_steps=2, stl=True)
    assert guide.stl is True
    fit(model, guide, DATA, num_steps=2)
    assert guide.stl is True  # stl=None leaves it
    with (
        pytest.warns(FutureWarning),
        pytest.raises(TypeError, match="stl=True needs a guide with an `stl` attribute"),
    ):
        fit(model, AutoNormal(model), DATA, num_steps=2, stl=True)
    flow = AutoFlowGuide(model)
    with pytest.warns(FutureWarning):
        fit(model, flow, DATA, num_steps=2, stl=True)
    assert flow.stl is True


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_steps=-1), ValueError, "num_steps"),
        (dict(num_steps=2.5), ValueError, "num_steps"),
        (dict(patience=0), ValueError, "patience"),
        (dict(min_delta=-1.0), ValueError, "min_delta"),
        (dict(max_failures=0), ValueError, "max_failures"),
        (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
        (dict(callback=3), TypeError, "callback"),
        (dict(optim=torch.optim.Adam), TypeError, "pyro.optim.Adam"),
        (dict(lr_schedule=3), TypeError, "lr_schedule"),
        (
            dict(
                optim=pyro.optim.ExponentialLR(
                    {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.01}, "gamma": 0.9}
                ),
                lr_schedule=lambda t: 1.0,
            ),
            ValueError,
            "not both",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fit(model, AutoNormal(model), DATA, **kwargs)


def test_scheduler_is_stepped():
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "gamma": 0.5}
    )
    fit(model, AutoNormal(model), DATA, num_steps=3, optim=optim)
    for scheduler in optim.optim_objs.values():
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_reduce_on_plateau_gets_the_loss(tmp_path):
    optim = pyro.optim.ReduceLROnPlateau(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "patience": 0}
    )
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), DATA, num_steps=20, optim=optim, checkpoint=path)
    lrs = [s.optimizer.param_groups[0]["lr"] for s in optim.optim_objs.values()]
    assert all(lr < 0.1 for lr in lrs)  # a noisy loss fails to improve within 20 steps
    assert load_checkpoint(path)["step"] == 20  # its state is checkpoint-safe


def test_checkpoint_folder_must_exist(tmp_path):
    with pytest.raises(ValueError, match="folder does not exist"):
        fit(model, AutoNormal(model), DATA, checkpoint=tmp_path / "missing" / "fit.pt")


def test_checkpoint_mismatch(tmp_path):
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), DATA, num_steps=3, checkpoint=path)

    def other(x):
        pyro.sample("nu", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="does not match.*AutoNormal.locs.nu"):
        fit(other, AutoNormal(other), DATA, num_steps=5, checkpoint=path)
    result = fit(other, AutoNormal(other), DATA, num_steps=5, checkpoint=path, resume=False)
    assert result.num_steps == 5 and load_checkpoint(path)["step"] == 5


def test_checkpoint_loads_without_unpickling(tmp_path):
    path = tmp_path / "fit.pt"
    fit(model, AutoNormal(model), DATA, num_steps=3, checkpoint=path)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3 and state["losses"].shape == (3,)
    torch.save({"format": pyro_flows._checkpoint.FORMAT, "code": FitResult()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not written by pyro_flows.fit"):
        load_checkpoint(path)


def test_unsafe_state_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]\[1\] is a FitResult"):
        pyro_flows._checkpoint.save_checkpoint(tmp_path / "x.pt", {"x": [1, FitResult()]})
    assert list(tmp_path.iterdir()) == []


def test_result_summary():
    result = FitResult(losses=[4.0, 2.0], num_failures=1, lr_factor=0.5)
    assert str(result) == (
        "FitResult: 2 steps (completed), ELBO -3 (mean of the last 2), "
        "1 non-finite steps undone (learning rate x0.5)"
    )
    assert math.isnan(FitResult().elbo())


# Checkpoint files ---------------------------------------------------------------------------


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
    guide = small(model, init_scale=1.0, stl=True)
    result = fit(model, guide, num_steps=5, checkpoint=checkpoint)
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


def test_default_optimizer_is_fused_adam_with_the_same_results():
    from pyro_flows.fitting import _optimizer

    x = torch.zeros(3, requires_grad=True)
    x.grad = torch.ones(3)
    optim = _optimizer(None, None)
    optim([x])
    adam = optim.optim_objs[x]
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["fused"]
    assert adam.defaults["lr"] == 0.01

    def run(optim):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model)
        result = fit(model, guide, DATA, num_steps=50, optim=optim)
        return result.losses, params()

    fused, plain = run(None), run(pyro.optim.Adam({"lr": 0.01}))
    torch.testing.assert_close(torch.tensor(fused[0]), torch.tensor(plain[0]))
    for name, value in fused[1].items():
        torch.testing.assert_close(value, plain[1][name], rtol=1e-5, atol=1e-5)
