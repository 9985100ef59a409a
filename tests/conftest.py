import matplotlib
import numpy as np
import pyro
import pytest
import torch

matplotlib.use("Agg")
# The models under test are tiny: one thread is faster and keeps CI from oversubscribing.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty param store, fixed seeds and float32."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    np.random.seed(0)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)
    pyro.clear_param_store()
