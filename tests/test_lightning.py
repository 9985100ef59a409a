"""SVIModule: data-parallel SVI on PyTorch Lightning (optional: skipped without `lightning`).

The DDP tests run this file as a script, `python tests/test_lightning.py OUT` (Lightning's
`strategy="ddp"` starts the second process by running the same command again; the gloo
backend on CPU), once per session: two fits, each with 2 processes on their shards of the
data, which write what the tests check to `OUT/ddp.json`.
"""

import doctest
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch.utils.data import DataLoader, TensorDataset

import pyro_flows.lightning
from pyro_flows import AutoFlowGuide
from pyro_flows.lightning import SVIModule

try:
    import lightning  # noqa: F401
except ImportError:
    lightning = None
needs_lightning = pytest.mark.skipif(
    lightning is None,
    reason='PyTorch Lightning is not installed: pip install "pyro-flows[lightning]"',
)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:GPU available but not used:UserWarning"),
    # Lightning 2.6 on torch 2.13.
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning"),
]

N = 512  # rows of the model with global latents only
# Groups and rows per group of the model with local latents. A batch is smaller than the plate:
# Pyro does not index the local parameters by a subsample of the plate's full size.
G, R = 128, 8
BATCH = 32  # per process; the one-process fits take 2 * BATCH
STEPS = 320  # 40 epochs of 8 steps
SEED = int(os.environ.get("PYRO_FLOWS_SEED", "0"))


# Models, data and guides: shared by the tests and the DDP script ----------------------------


def normal_model(index, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 2.0))
    with pyro.plate("data", N, subsample=index):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def group_plate(index, y):
    return pyro.plate("groups", G, subsample=index, dim=-2)


def hierarchical_model(index, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 2.0))
    with group_plate(index, y):
        b = pyro.sample("b", dist.Normal(mu, tau))
        with pyro.plate("rows", y.shape[-1], dim=-1):
            pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def local_guide(model):
    """The flow on the globals; a location and scale per group effect (local latents)."""
    return AutoFlowGuide(model, init="prior", create_plates=group_plate)


def split_guide(model):
    """The flow on the globals, AutoNormal on the local latents (an AutoGuideList)."""
    guide = AutoGuideList(model, create_plates=group_plate)
    guide.append(AutoFlowGuide(poutine.block(model, hide=["b"]), init="prior"))
    guide.append(AutoNormal(poutine.block(model, expose=["b"])))
    return guide


def dataset(case):
    generator = torch.Generator().manual_seed(1)
    if case == "globals":
        y = 2.0 + 1.5 * torch.randn(N, generator=generator)
        return TensorDataset(torch.arange(N), y)
    b = 1.0 + 0.5 * torch.randn(G, 1, generator=generator)
    return TensorDataset(torch.arange(G), b + torch.randn(G, R, generator=generator))


CASES = {  # case: (model, guide, global latent sites)
    "globals": (normal_model, lambda m: AutoFlowGuide(m, init="prior"), ("mu", "sigma")),
    "local": (hierarchical_model, local_guide, ("mu", "tau")),
}


def build(case, batch_size):
    """The model, guide, data loader and SVIModule of a case, from the test seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    model, make_guide, _ = CASES[case]
    loader = DataLoader(dataset(case), batch_size=batch_size, shuffle=True, drop_last=True)
    guide = make_guide(model)
    decay = lambda step: 0.1 ** (step / STEPS)  # noqa: E731 - lr 0.05 to 0.005 over the fit
    module = SVIModule(model, guide, next(iter(loader)), lr=0.05, lr_schedule=decay)
    return module, loader


def trainer(devices=1, steps=STEPS, **options):
    import lightning

    options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **options,
    }
    strategy = "ddp" if devices > 1 else "auto"
    return lightning.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, **options
    )


def posterior(module, loader, case):
    """Mean and sd of each global latent site, from 4,000 guide draws on a fixed seed."""
    sites = CASES[case][2]
    pyro.set_rng_seed(123)
    predictive = Predictive(
        module.model, guide=module.guide, num_samples=4000, return_sites=sites, parallel=True
    )
    with torch.no_grad():
        draws = predictive(*next(iter(loader)))
    return {k: [v.mean().item(), v.std().item()] for k, v in draws.items()}


# The DDP script -------------------------------------------------------------------------------


def _ddp_callback():
    import lightning

    class Record(lightning.Callback):
        """Gathers, from both processes, the rows of the first epoch and the parameters."""

        def on_train_start(self, trainer, module):
            self.rows = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 0:
                self.rows.append(batch[0])

        def on_train_end(self, trainer, module):
            gather = trainer.strategy.all_gather
            self.rows = gather(torch.cat(self.rows)).tolist()
            params = torch.cat([p.detach().flatten() for p in module.parameters()])
            self.params = gather(params)

    return Record()


def ddp_main(out):
    import lightning

    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        module, loader = build(case, BATCH)
        record = _ddp_callback()
        checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=out / case)
        fit = trainer(2, callbacks=[record, checkpoint], enable_checkpointing=True)
        fit.fit(module, loader)
        if fit.is_global_zero:
            results[case] = {
                "rows": record.rows,
                "param_gap": (record.params[0] - record.params[1]).abs().max().item(),
                "posterior": posterior(module, loader, case),
                "checkpoint": checkpoint.best_model_path,
                "global_step": fit.global_step,
            }
    if results:
        (out / "ddp.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Runs the DDP script once (two fits of STEPS steps on 2 processes); its results."""
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(Path(__file__).resolve()), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((out / "ddp.json").read_text())


# Data-parallel training -----------------------------------------------------------------------


@needs_lightning
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_processes_train_on_their_shards(ddp, case):
    result = ddp[case]
    first, second = (set(rows) for rows in result["rows"])
    size = N if case == "globals" else G
    assert len(first) == len(result["rows"][0]) == size // 2  # no row twice in an epoch
    assert not first & second and first | second == set(range(size))
    assert result["global_step"] == STEPS


@needs_lightning
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_processes_hold_the_same_parameters(ddp, case):
    # DDP averaged the gradients: both processes took the same steps.
    assert ddp[case]["param_gap"] == 0.0


@needs_lightning
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_fit_matches_one_process(ddp, case):
    # One process with batches of 2 * BATCH takes the steps of two with BATCH each, so the two
    # fits differ by their random draws (minibatches, ELBO draws) only. Tolerances from five
    # one-process fits (PYRO_FLOWS_SEED=0..4, 320 steps, lr 0.05 decaying to 0.005): their
    # means spread over up to 1.0 posterior sd (tau of the local case) and their sds by up to a
    # factor 1.6 (mu of the globals case: 0.067 to 0.109), so the DDP fit's mean must lie within
    # 1.5 sds of the one-process fit's and its sd within a factor 1.7. A DDP bug that breaks the
    # fit (shards not averaged, local parameters of other rows) moves them much further.
    module, loader = build(case, 2 * BATCH)
    trainer().fit(module, loader)
    one = posterior(module, loader, case)
    for site, (mean, sd) in ddp[case]["posterior"].items():
        assert abs(mean - one[site][0]) < 1.5 * one[site][1], site
        assert 1 / 1.7 < sd / one[site][1] < 1.7, site


@needs_lightning
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* is not empty:UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_from_ddp_resumes(ddp, case):
    import lightning

    path = Path(ddp[case]["checkpoint"])
    saved = torch.load(path, weights_only=True)
    module, loader = build(case, 2 * BATCH)

    class Check(lightning.Callback):
        def on_train_start(self, trainer, module):
            for name, value in module.state_dict().items():
                assert torch.equal(value, saved["state_dict"][name]), name
            self.checked = True

    check = Check()
    # The callback that saved the checkpoint, as Lightning asks on resuming.
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=path.parent)
    fit = trainer(steps=STEPS + 8, callbacks=[check, checkpoint], enable_checkpointing=True)
    fit.fit(module, loader, ckpt_path=path)
    assert check.checked and fit.global_step == STEPS + 8
    adam = fit.optimizers[0].state[next(module.parameters())]
    assert adam["step"] == STEPS + 8  # the optimizer's state came back too


# Set-up and errors ----------------------------------------------------------------------------


@needs_lightning
def test_guide_not_set_up_is_refused_before_ddp():
    loader = DataLoader(dataset("globals"), batch_size=BATCH)
    module = SVIModule(normal_model, AutoFlowGuide(normal_model, init="prior"))
    with pytest.raises(RuntimeError, match=r"parameters do not exist yet.*example_batch="):
        module.setup("fit")  # Lightning calls it in every process, before DDP wraps
    with pytest.raises(RuntimeError, match="example_batch="):
        trainer(steps=1).fit(module, loader)


@needs_lightning
def test_set_up_on_a_guide_called_before():
    loader = DataLoader(dataset("local"), batch_size=BATCH)
    guide = split_guide(hierarchical_model)
    guide(*next(iter(loader)))
    module = SVIModule(hierarchical_model, guide)
    module.setup("fit")
    fit = trainer(steps=2)
    fit.fit(module, loader)
    assert fit.global_step == 2


@needs_lightning
def test_parameter_outside_the_module_is_refused():
    def model(index, y):
        shift = pyro.param("shift", torch.tensor(0.0))
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", N, subsample=index):
            pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    batch = dataset("globals")[:BATCH]
    with pytest.raises(ValueError, match=r"\['shift'\].*not parameters of this module"):
        SVIModule(model, AutoNormal(model), batch)


@needs_lightning
def test_shuffled_batch_of_the_whole_plate():
    # Pyro indexes local parameters by a subsample smaller than the plate only: AutoFlowGuide
    # indexes a full-size one itself; with another guide of local latents it is refused.
    loader = DataLoader(dataset("local"), batch_size=G, shuffle=True)
    batch = next(iter(loader))
    SVIModule(hierarchical_model, local_guide(hierarchical_model), batch)
    pyro.clear_param_store()
    guide = AutoNormal(hierarchical_model, create_plates=group_plate)
    with pytest.raises(ValueError, match=r"all 128 elements of plate 'groups'.*site 'b'"):
        SVIModule(hierarchical_model, guide, batch)
    whole = DataLoader(dataset("local"), batch_size=G)  # in order: indexed as it should be
    pyro.clear_param_store()
    guide = AutoNormal(hierarchical_model, create_plates=group_plate)
    SVIModule(hierarchical_model, guide, next(iter(whole)))


@needs_lightning
def test_guide_function_is_refused():
    def guide(index, y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match="guide must be a torch module"):
        SVIModule(normal_model, guide)


@needs_lightning
def test_learning_rate_schedule():
    module, loader = build("globals", BATCH)
    module.lr_schedule = lambda step: 0.5**step
    fit = trainer(steps=3)
    fit.fit(module, loader)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


def test_without_lightning_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    path = pyro_flows.lightning.__file__
    spec = importlib.util.spec_from_file_location("pyro_flows._lightning_missing", path)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)  # imports without Lightning
    with pytest.raises(ImportError, match=r'pip install "pyro-flows\[lightning\]"'):
        copy.SVIModule(normal_model, AutoNormal(normal_model))


@needs_lightning
def test_docstring_example_runs_with_lightning(tmp_path, monkeypatch):
    # test_docs.py runs the example with the Lightning lines skipped; here they run.
    monkeypatch.chdir(tmp_path)
    text = SVIModule.__doc__.replace("# doctest: +SKIP", "")
    globs = dict(vars(pyro_flows.lightning))
    test = doctest.DocTestParser().get_doctest(text, globs, "SVIModule", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


if __name__ == "__main__":  # the DDP script: python tests/test_lightning.py OUT
    ddp_main(Path(sys.argv[1]))
