"""Faults lose nothing: a fit killed by a signal resumes from its checkpoint to the parameters
of an uninterrupted fit with the same seed, bit for bit."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_flows import AutoFlowGuide, fit, load_checkpoint

# Centred eight schools: Pathfinder's path runs into the funnel's neck and the guide starts
# from init_loc_fn's point with a StartWarning (tested in test_guides.py), here and in the
# child processes alike.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:AutoFlowGuide\(init='pathfinder'\) starts at:pyro_flows.errors.StartWarning"
)
NUM_STEPS = 100
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def eight_schools(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def run_fit(path, every, callback=None):
    """The fit that every process runs: a fresh guide, seed 0, AutoFlowGuide with STL."""

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(eight_schools, hidden_features=(16,), stl=True)
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True)
    optim = pyro.optim.Adam({"lr": 0.01})
    return fit(
        eight_schools,
        guide,
        SIGMA,
        Y,
        num_steps=NUM_STEPS,
        optim=optim,
        loss=loss,
        checkpoint=path,
        checkpoint_every=every,
        callback=callback,
    )


def child(path, every, crash_at_save=None):
    """The process to be killed: reports each step, slowed down after step 30 so that the
    signal lands mid-run. With `crash_at_save=k`, it dies halfway through writing its k-th
    checkpoint instead, as if killed then."""

    torch.set_num_threads(1)
    if crash_at_save is not None:
        save, count = torch.save, [0]

        def crashing_save(obj, f):
            count[0] += 1
            if count[0] == crash_at_save:
                buffer = io.BytesIO()
                save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os._exit(3)  # no clean-up, no finally: as SIGKILL
            save(obj, f)

        torch.save = crashing_save

    def callback(step, loss):
        print(step, flush=True)
        if step >= 30:
            time.sleep(0.01)

    result = run_fit(path, every, callback)
    print("stopped", result.stop_reason, result.num_steps, flush=True)


def params():
    store = pyro.get_param_store()
    return {name: p.detach().clone() for name, p in store.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_fit(None, 1000)
    return params()


def start_and_signal(path, every, signum, crash_at_save=None):
    here = Path(__file__).parent
    code = f"import test_faults; test_faults.child({str(path)!r}, {every}, {crash_at_save})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    command = [sys.executable, "-c", code]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if signum is not None and line.strip().isdigit() and int(line) >= 40:
                process.send_signal(signum)
                break
        lines += [line.strip() for line in process.stdout]
        return process.wait(timeout=60), lines


@pytest.mark.parametrize(
    "signum, every",
    # Checkpoints at every step: the kill is likely to land while one is being written.
    [(signal.SIGKILL, 1), (signal.SIGINT, 25)],
    ids=["SIGKILL", "SIGINT"],
)
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, signum, every):
    path = tmp_path / "fit.pt"
    returncode, lines = start_and_signal(path, every, signum)
    step = load_checkpoint(path)["step"]
    if signum == signal.SIGKILL:
        assert returncode == -signal.SIGKILL and not lines[-1].startswith("stopped")
        assert 0 < step < NUM_STEPS and step % every == 0
    else:
        # The first Ctrl-C finishes the step, writes the checkpoint and returns.
        assert returncode == 0, lines
        assert lines[-1] == f"stopped interrupted {step}" and 40 <= step < NUM_STEPS

    result = run_fit(path, every)  # another process would do the same: a fresh guide
    assert result.num_steps == NUM_STEPS and result.stop_reason == "completed"
    resumed = params()
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    path = tmp_path / "fit.pt"
    returncode, lines = start_and_signal(path, 10, None, crash_at_save=4)
    assert returncode == 3 and lines[-1] == "38"  # died writing the checkpoint of step 40
    assert load_checkpoint(path)["step"] == 30  # the previous checkpoint, intact
    assert len(list(tmp_path.glob(".fit.pt.*.tmp"))) == 1  # the half-written one

    result = run_fit(path, 10)
    assert result.num_steps == NUM_STEPS
    for name, value in params().items():
        assert torch.equal(value, uninterrupted[name]), name
    assert [p.name for p in tmp_path.iterdir()] == ["fit.pt"]  # the dead process's file gone
