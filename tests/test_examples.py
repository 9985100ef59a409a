"""Every example runs with tiny settings (a smoke test; accuracy is tested elsewhere)."""

import logging
import sys
from pathlib import Path

import pytest

from pyro_flows import StartWarning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TINY = ["--num-steps", "3", "--num-samples", "100"]


@pytest.fixture
def figures(tmp_path):
    """Runs an example with ``--output`` in a temporary folder; returns the PNGs it wrote."""
    folder = tmp_path / "figures"

    def run(main, *extra):
        summary = main([*TINY, "--output", str(folder), *extra])
        return summary, sorted(p.name for p in folder.glob("*.png"))

    return run


def test_eight_schools(capsys, caplog, figures):
    import eight_schools

    # Pyro's logger does not propagate to the root logger that caplog watches.
    pyro_logger = logging.getLogger("pyro")
    pyro_logger.addHandler(caplog.handler)
    try:
        summary, pngs = figures(eight_schools.main, "--num-particles", "2")
    finally:
        pyro_logger.removeHandler(caplog.handler)
    out = capsys.readouterr().out
    assert "AutoFlowGuide" in out and "theta[7]" in out
    assert "2000 reference draws from examples/data/eight_schools_reference.npz" in out
    assert set(summary) == {"AutoNormal", "AutoFlowGuide", "NUTS (posteriordb)"}
    assert set(summary["AutoFlowGuide"]) == {"mu", "tau", *(f"theta[{j}]" for j in range(8))}
    # The bundled reference: posteriordb's NUTS posterior (mean and sd of tau about 3.5 and 3.2).
    assert summary["NUTS (posteriordb)"]["tau"][:2] == pytest.approx([3.5, 3.2], abs=0.1)
    assert "Guessed max_plate_nesting" not in caplog.text  # the example passes it to the ELBO
    assert pngs == ["eight_schools_elbo.png", "eight_schools_marginals.png"]


def test_funnel(capsys, figures):
    import funnel

    summary, pngs = figures(funnel.main, "--num-particles", "2")
    assert set(summary) == {"AutoNormal", "AutoFlowGuide"}
    assert "sd(y)" in capsys.readouterr().out
    assert pngs == ["funnel_fit.png", "funnel_marginals.png", "funnel_scatter.png"]


# Three draws from an unfitted guide give ArviZ's PSIS-LOO little to fit: it warns.
@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto:UserWarning")
def test_regression(capsys, figures):
    import regression

    summary, pngs = figures(regression.main, "--num-particles", "2")
    out = capsys.readouterr().out
    assert "elpd_loo" in out and "NUTS (posteriordb)" in out
    assert summary["NUTS (posteriordb)"]["sd"][2] == pytest.approx(0.148, abs=0.01)
    assert pngs == ["regression_fit.png", "regression_marginals.png", "regression_pair.png"]


def test_hierarchical(capsys, figures):
    import hierarchical

    with pytest.warns(StartWarning, match="ran away.*non-centred"):  # the funnel's neck
        summary, pngs = figures(hierarchical.main, "--num-particles", "2", "--num-nuts", "4")
    assert set(summary) == {"AutoNormal", "AutoFlowGuide", "NUTS (non-centred)"}
    assert "tau_a" in capsys.readouterr().out
    assert pngs == ["hierarchical_centred_fit.png", "hierarchical_centred_marginals.png"]


def test_hierarchical_noncentred(figures):
    import hierarchical

    args = ("--num-particles", "2", "--num-nuts", "4", "--noncentred")
    summary, pngs = figures(hierarchical.main, *args)
    assert set(summary) == {"AutoNormal", "AutoFlowGuide", "NUTS (non-centred)"}
    assert pngs[0] == "hierarchical_noncentred_fit.png"


def test_neutra(capsys, figures):
    import neutra

    summary, pngs = figures(neutra.main, "--num-mcmc", "4")
    assert set(summary) == {"NUTS", "NeuTra NUTS"}
    assert "ESS(y)/s" in capsys.readouterr().out
    assert pngs == ["neutra.png"]


def test_no_figures(tmp_path):
    import funnel

    funnel.main([*TINY, "--no-figures", "--output", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


# Lightning 2.6 on torch 2.13; a tiny run has fewer batches than Lightning's logging interval.
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning")
@pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning")
def test_big_data(capsys, figures):
    pytest.importorskip("lightning")
    import big_data

    tiny = ("--rows", "2000", "--groups", "100", "--batch-groups", "10")
    summary, pngs = figures(big_data.main, *tiny)
    out = capsys.readouterr().out
    assert "rows/s" in out and "beta[2]" in out
    assert summary["steps"] == 3 and summary["rows_per_s"] > 0
    assert set(summary["posterior"]) == {"mu", "tau", "beta[0]", "beta[1]", "beta[2]"}
    assert pngs == ["big_data_globals.png"]
