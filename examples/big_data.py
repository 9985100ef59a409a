"""A million rows on PyTorch Lightning: a hierarchical logistic regression by data-parallel SVI.

    mu ~ Normal(0, 2),  tau ~ HalfNormal(2),  beta[k] ~ Normal(0, 2)        (the globals)
    b[g] ~ Normal(mu, tau)                                 g = 1..G   (group effects: local)
    y[g, r] ~ Bernoulli(logits = b[g] + x[g, r] . beta)    r = 1..R   (the rows of group g)

1,000,000 rows in 10,000 groups of 100, simulated from known values in a fraction of a second.
A batch is a set of groups with all their rows; the group plate takes its full size and the
batch's group indices, ``pyro.plate("groups", G, subsample=index)``, so each batch's loss is an
unbiased estimate of the full data's. The globals are under the flow; AutoFlowGuide gives each
group effect a location and a scale of its own (``--local structured``: a location that also
moves with the globals), indexed by the batch's groups. Lightning runs the steps:
with ``--processes 2`` it starts a second process (DDP; gloo on CPU), gives each process its
share of the groups (a distributed sampler) and averages the gradients. Run::

    python examples/big_data.py                       # one process
    python examples/big_data.py --processes 2         # two processes (Lightning DDP)
    python examples/big_data.py --device cuda         # on a GPU (not run on one yet)
    python examples/big_data.py --rows 10000 --groups 100 --batch-groups 10 --num-steps 50
    python examples/big_data.py --guide AutoNormal    # the mean-field guide, for comparison

Prints rows per second, time per epoch and peak memory, and the posterior of the globals
against the values that simulated the data; saves their marginals to ``--output``.
"""

import json
import resource
import time
import warnings
from pathlib import Path

import lightning
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from common import parser, plot_marginals, save
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
from torch.utils.data import DataLoader, TensorDataset

from pyro_flows import AutoFlowGuide
from pyro_flows.lightning import SVIModule

TRUTH = {"mu": -0.5, "tau": 0.8, "beta": (1.0, -0.5, 0.25)}
GLOBALS = ("mu", "tau", "beta")


class Model(PyroModule):
    """The hierarchical logistic regression, for batches ``(index, x, y)`` of groups."""

    def __init__(self, num_groups, num_features):
        super().__init__()
        self.num_groups = num_groups
        self.num_features = num_features

    def plates(self, index, x, y=None):
        """The group plate: its full size and the batch's groups (also the guide's plate)."""
        return pyro.plate("groups", self.num_groups, subsample=index, dim=-2)

    def forward(self, index, x, y=None):
        zero = x.new_zeros(())  # the priors on the data's device
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(zero + 2.0))
        beta = pyro.sample("beta", dist.Normal(zero, 2.0).expand([self.num_features]).to_event(1))
        with self.plates(index, x, y):
            b = pyro.sample("b", dist.Normal(mu, tau))
            with pyro.plate("rows", x.shape[-2], dim=-1):
                pyro.sample("y", dist.Bernoulli(logits=b + (x * beta).sum(-1)), obs=y)


def make_guide(model, kind, local="mean_field"):
    """The flow on the globals and a location and scale per group effect, or AutoNormal."""
    if kind == "AutoNormal":
        return AutoNormal(model, create_plates=model.plates)
    # The automatic (Pathfinder) start needs the whole data's density: start from the prior.
    return AutoFlowGuide(model, init="prior", local=local, create_plates=model.plates)


def simulate(num_rows, num_groups, seed=0):
    """Data from the known values: ``x`` of shape (G, R, 3), ``y`` (G, R), effects ``b``."""
    if num_rows % num_groups:
        raise ValueError(f"--rows {num_rows} is not a multiple of --groups {num_groups}")
    generator = torch.Generator().manual_seed(seed)
    beta = torch.tensor(TRUTH["beta"])
    b = TRUTH["mu"] + TRUTH["tau"] * torch.randn(num_groups, 1, generator=generator)
    x = torch.randn(num_groups, num_rows // num_groups, len(beta), generator=generator)
    y = torch.bernoulli(torch.sigmoid(b + x @ beta), generator=generator)
    return x, y, b


class Throughput(lightning.Callback):
    """Times the fit and its epochs; gathers every process's peak memory at the end."""

    def on_train_start(self, trainer, module):
        self.epochs = []  # (steps, seconds) of each epoch
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self.epoch_start = (trainer.global_step, time.perf_counter())

    def on_train_epoch_end(self, trainer, module):
        step, start = self.epoch_start
        self.epochs.append((trainer.global_step - step, time.perf_counter() - start))

    def on_train_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: kB)
        if module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(module.device) / 2**20
        peaks = trainer.strategy.all_gather(torch.tensor([peak], device=module.device))
        self.peak_mb = peaks.flatten().tolist()


def posterior(model, guide, dataset, num_samples, device):
    """Draws of the globals (the guide, vectorized; the model on one group)."""
    batch = [t.to(device) for t in dataset[:1]]
    predictive = Predictive(
        model, guide=guide, num_samples=num_samples, return_sites=GLOBALS, parallel=True
    )
    with torch.no_grad():
        draws = predictive(*batch)
    return {name: draws[name].reshape(num_samples, -1).squeeze(-1).cpu().numpy() for name in draws}


def report(args, throughput, draws, b, steps_per_epoch):
    """Prints the speed, memory and posterior; returns them as a dict."""
    rows_per_step = args.batch_groups * (args.rows // args.groups) * args.processes
    steps = sum(s for s, _ in throughput.epochs)
    full = [seconds for s, seconds in throughput.epochs if s == steps_per_epoch]
    epoch_s = float(np.median(full[1:] or full)) if full else float("nan")  # after warm-up
    rows_per_s = rows_per_step * steps / throughput.seconds
    where = f"{args.processes} process{'es' * (args.processes > 1)} ({args.device})"
    print(f"{args.rows:,} rows, {args.groups:,} groups, {where}, guide {args.guide}")
    print(f"{steps} steps of {rows_per_step:,} rows ({steps_per_epoch} steps per epoch)")
    print(f"{rows_per_s:,.0f} rows/s, {epoch_s:.2f} s per epoch, {throughput.seconds:.1f} s")
    print("peak memory (MB) per process: " + ", ".join(f"{m:.0f}" for m in throughput.peak_mb))
    print(f"{'':8s}{'truth':>8s}{'mean':>8s}{'sd':>8s}{'(mean-truth)/sd':>17s}")
    columns = {}
    for name in GLOBALS:
        values = np.asarray(draws[name]).reshape(len(draws[name]), -1)
        truth = np.atleast_1d(TRUTH[name])
        for j in range(values.shape[1]):
            label = name if values.shape[1] == 1 else f"{name}[{j}]"
            mean, sd = float(values[:, j].mean()), float(values[:, j].std())
            columns[label] = {"truth": float(truth[j]), "mean": mean, "sd": sd}
            print(f"{label:8s}{truth[j]:8.3f}{mean:8.3f}{sd:8.3f}{(mean - truth[j]) / sd:17.1f}")
    print(f"(the simulated group effects: mean {b.mean():.3f}, sd {b.std():.3f})")
    return {
        "config": {
            key: getattr(args, key)
            for key in ("rows", "groups", "batch_groups", "processes", "device", "guide", "local")
        },
        "rows_per_s": rows_per_s,
        "epoch_s": epoch_s,
        "train_s": throughput.seconds,
        "steps": steps,
        "peak_mb": throughput.peak_mb,
        "posterior": columns,
    }


def plot(draws, args):
    """The marginals of the globals, with the simulating values as vertical lines."""
    names = ["mu", "tau", *(f"beta[{j}]" for j in range(len(TRUTH["beta"])))]
    fig = plot_marginals({args.guide: draws}, names, "Hierarchical logistic regression")
    truths = [TRUTH["mu"], TRUTH["tau"], *TRUTH["beta"]]
    for ax, truth in zip(fig.axes, truths, strict=False):
        ax.axvline(truth, color="black", lw=1.5, label="truth")
    save(fig, args, "big_data_globals")


def main(argv=None):
    p = parser(__doc__, num_steps=2000, num_samples=2000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--groups", type=int, default=10_000)
    p.add_argument("--batch-groups", type=int, default=500, help="groups per step and process")
    p.add_argument("--processes", type=int, default=1, help="1, or 2 and more for DDP")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--guide", choices=("AutoFlowGuide", "AutoNormal"), default="AutoFlowGuide")
    p.add_argument("--local", choices=("mean_field", "structured"), default="mean_field")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-decay", type=float, default=0.1, help="final lr / initial lr")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--summary", help="also write the printed numbers to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The data live in memory: worker processes would only copy them.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    pyro.set_rng_seed(args.seed)  # the same in every process: the same data and start
    x, y, b = simulate(args.rows, args.groups, args.seed)
    dataset = TensorDataset(torch.arange(args.groups), x, y)
    loader = DataLoader(dataset, batch_size=args.batch_groups, shuffle=True, drop_last=True)
    model = Model(args.groups, x.shape[-1])
    guide = make_guide(model, args.guide, args.local)
    decay = args.lr_decay ** (1 / max(1, args.num_steps))  # lr to lr * decay over the fit
    batch = next(iter(loader))
    module = SVIModule(model, guide, batch, lr=args.lr, lr_schedule=lambda step: decay**step)

    throughput = Throughput()
    trainer = lightning.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=args.processes,
        strategy="ddp" if args.processes > 1 else "auto",
        max_steps=args.num_steps,
        callbacks=[throughput],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    if not trainer.is_global_zero:  # the other processes are done
        return None
    steps_per_epoch = trainer.num_training_batches
    draws = posterior(model, guide, dataset, args.num_samples, module.device)
    summary = report(args, throughput, draws, b, steps_per_epoch)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    if not args.no_figures:
        plot(draws, args)
    return summary


if __name__ == "__main__":
    main()
