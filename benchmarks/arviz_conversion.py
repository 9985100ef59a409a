r"""Time and peak memory of converting a fitted guide to InferenceData.

Compares, in one run, ``pyro_flows.to_inference_data`` (vectorized over draws, chunked) with
the naive route: ``Predictive`` without ``parallel`` (one model run per draw) for the
posterior and posterior predictive, a per-draw trace for the pointwise log-likelihood, then
``arviz.from_dict``. Both make the posterior, posterior predictive, log-likelihood and
observed data groups; ``to_inference_data`` also makes sample stats (log q, lp, weights).
Each method runs in a fresh process (same seed, same fit, ArviZ already imported), and its
peak memory is the highest resident set size seen while it runs, minus the size just before.

    python benchmarks/arviz_conversion.py --num-draws 4000 --num-obs 1000
"""

import argparse
import multiprocessing
import os
import threading
import time

import pyro
import pyro.distributions as dist
import torch

NUM_FEATURES = 5


def model(x, y=None):
    r"""A linear regression whose draws broadcast over a leading dimension."""
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("feature", x.shape[-1]):
        beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        mu = pyro.deterministic("mu", alpha + (x * beta.unsqueeze(-2)).sum(-1))
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def fit(num_obs, num_steps):
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    x = torch.randn(num_obs, NUM_FEATURES)
    y = 1.0 + x @ torch.linspace(-1, 1, NUM_FEATURES) + 0.5 * torch.randn(num_obs)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(num_steps):
        svi.step(x, y)
    return guide, x, y


def vectorized(guide, x, y, num_draws):
    from pyro_flows import to_inference_data

    return to_inference_data(guide, x, y, num_samples=num_draws)


def naive(guide, x, y, num_draws):
    import arviz as az
    from pyro import poutine
    from pyro.infer import Predictive

    shapes = {"alpha": (), "sigma": (), "beta": (NUM_FEATURES,), "mu": (len(y),), "y": (len(y),)}
    latent = ["alpha", "sigma", "beta"]
    predictive = Predictive(model, guide=guide, num_samples=num_draws, return_sites=list(shapes))
    with torch.no_grad():
        samples = predictive(x)  # y=None: "y" is drawn, a replicate of the data
        log_lik = []
        for i in range(num_draws):
            draw = {name: samples[name][i] for name in latent}
            trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(x, y)
            site = trace.nodes["y"]
            log_lik.append(site["fn"].log_prob(site["value"]))
    arrays = {name: samples[name].reshape(1, num_draws, *shapes[name]).numpy() for name in shapes}
    return az.from_dict(
        posterior={name: arrays[name] for name in latent + ["mu"]},
        posterior_predictive={"y": arrays["y"]},
        log_likelihood={"y": torch.stack(log_lik).numpy()[None]},
        observed_data={"y": y.numpy()},
        dims={"beta": ["feature"], "mu": ["data"], "y": ["data"]},
    )


def _rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(method, num_draws, num_obs, num_steps, queue):
    import arviz  # noqa: F401  (imported before measuring: both methods need it)

    import pyro_flows  # noqa: F401

    guide, x, y = fit(num_obs, num_steps)
    before = _rss()
    peak, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    idata = {"vectorized": vectorized, "naive": naive}[method](guide, x, y, num_draws)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    assert idata.log_likelihood["y"].shape == (1, num_draws, num_obs)
    queue.put((seconds, (peak[0] - before) / 2**20))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-draws", type=int, default=4000)
    parser.add_argument("--num-obs", type=int, default=1000)
    parser.add_argument("--num-steps", type=int, default=200, help="SVI steps of the fit")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = {}
    for method in ("vectorized", "naive"):
        queue = context.Queue()
        options = (method, args.num_draws, args.num_obs, args.num_steps, queue)
        process = context.Process(target=_measure, args=options)
        process.start()
        results[method] = queue.get()
        process.join()
    print(f"{args.num_draws} draws, {args.num_obs} observations, AutoNormal, 1 thread")
    print(f"{'method':<12}{'seconds':>10}{'peak MiB':>10}")
    for method, (seconds, mib) in results.items():
        print(f"{method:<12}{seconds:>10.2f}{mib:>10.1f}")
    (fast, fast_mib), (slow, slow_mib) = results["vectorized"], results["naive"]
    print(f"naive / vectorized: time {slow / fast:.1f}x, peak memory {slow_mib / fast_mib:.1f}x")


if __name__ == "__main__":
    main()
