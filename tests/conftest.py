import os
import signal

import matplotlib
import numpy as np
import pyro
import pytest
import torch

matplotlib.use("Agg")
# The models under test are tiny: one thread is faster and keeps CI from oversubscribing.
torch.set_num_threads(1)
# A shell's background job starts with Ctrl-C ignored, and `fit` then leaves it ignored: the
# interrupt tests need Python's handler (its subprocesses get the default action).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The seed every test starts from: 0, or PYRO_FLOWS_SEED to check by hand that statistical
# tests hold on other random streams (their tolerances must not depend on one trajectory).
SEED = int(os.environ.get("PYRO_FLOWS_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty param store, fixed seeds and float32."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    np.random.seed(SEED)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)
    pyro.clear_param_store()


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the device-aware tests (the `device` fixture): cpu (default) or cuda; "
        "with cuda and no CUDA device they are skipped",
    )


@pytest.fixture
def device(request):
    """The torch device chosen with `pytest --device ...`; skips the test when it is absent."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device")
    return device
