"""Smoke test of the benchmark runner (tiny settings) and checks of its metrics."""

import importlib
import json
import math

import numpy as np
import pytest

from benchmarks import settings
from benchmarks.guides import BASELINE, GUIDES
from benchmarks.metrics import marginal_errors, steps_to_within, wasserstein_1d
from benchmarks.run import main, parse_args


def test_quick_mode_on_one_small_target(tmp_path, capsys):
    argv = ["--quick", "--targets", "banana", "--steps", "30", "--draws", "200"]
    results = main([*argv, "--out", str(tmp_path)])
    assert [r["guide"] for r in results] == list(GUIDES)
    for r in results:
        assert r["error"] is None, (r["guide"], r["error"])
        assert math.isfinite(r["elbo"]) and math.isfinite(r["khat"])
        assert r["elbo"] < 3 * r["elbo_se"]  # the banana is normalised: ELBO <= log Z = 0
        assert r["iwelbo"] >= r["elbo"] - 3 * r["elbo_se"]
        assert r["ms_per_step"] > 0 and len(r["elbo_trace"]) == 30
    assert next(r for r in results if r["guide"] == BASELINE)["step_ratio"] == 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["recipe"]["steps"] == 30 and len(saved["results"]) == len(GUIDES)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {guide} |" in table for guide in GUIDES)
    assert (tmp_path / "marginals-banana.png").stat().st_size > 0
    assert (tmp_path / "elbo-banana.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_settings_sweep_on_one_small_target(tmp_path):
    argv = ["--num-steps", "20", "--seeds", "1", "--draws", "100", "--targets", "banana"]
    rows = settings.main([*argv, "--variants", "default", "1 layer", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["default", "1 layer"]
    assert all(math.isfinite(r["elbo"]) and math.isfinite(r["khat"]) for r in rows)
    assert len(json.loads((tmp_path / "settings.json").read_text())) == 2
    assert "| banana | 1 layer |" in (tmp_path / "settings.md").read_text()


def test_laplace_start_mode_runs_every_kind_of_guide(tmp_path):
    argv = ["--start", "laplace", "--targets", "banana", "--steps", "3", "--draws", "100"]
    guides = ["AutoNormal", "AutoMultivariateNormal", "AutoFlowGuide"]
    results = main([*argv, "--seeds", "1", "--guides", *guides, "--out", str(tmp_path)])
    assert [r["guide"] for r in results] == guides
    assert all(r["error"] is None for r in results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["start"] == "laplace"


def test_modes_have_their_defaults():
    quick, full = parse_args(["--quick"]), parse_args([])
    assert quick.seeds == 1 and len(quick.targets) == 3
    assert full.seeds == 3 and full.steps == 5000 and len(full.targets) == 12


def test_wasserstein_of_gaussians():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200_000), rng.normal(size=200_000)
    # W1(N(0, 1), N(0, 2^2)) = E|Z| (2 - 1) = sqrt(2 / pi); sampling error ~ 0.003
    assert wasserstein_1d(x, 2 * y) == pytest.approx(math.sqrt(2 / math.pi), abs=0.015)
    assert wasserstein_1d(x, y) < 0.015


def test_marginal_errors_are_in_reference_sds():
    rng = np.random.default_rng(1)
    reference = {"a": rng.normal(0.0, 10.0, 100_000)}
    guide = {"a": rng.normal(5.0, 5.0, 100_000)}
    errors = marginal_errors(guide, reference)["a"]
    assert errors["mean_error"] == pytest.approx(0.5, abs=0.01)
    assert errors["sd_ratio"] == pytest.approx(0.5, abs=0.01)


def test_steps_to_within_one_nat():
    trace = np.r_[np.full(50, -20.0), np.full(950, -3.0)]
    assert steps_to_within(trace, -3.0) == 50 + 19  # running mean over 20 steps
    assert steps_to_within(np.full(100, -5.0), 0.0) is None


@pytest.mark.slow
def test_stl_benchmark_smoke(capsys):
    stl = importlib.import_module("benchmarks.stl")
    argv = ["--num-steps", "5", "--seeds", "1", "--draws", "50", "--particles", "2"]
    rows = stl.main([*argv, "--targets", "banana"])  # synthetic: no ../shared needed
    assert [row["stl"] for row in rows] == [False, True]
    assert all(row["error"] is None and math.isfinite(row["elbo"]) for row in rows)
    assert "medians over seeds" in capsys.readouterr().out
