"""The documentation: the getting-started page runs as written, docstring examples pass as
doctests, and the site builds with warnings as errors."""

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pytest

import pyro_flows

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return FENCE.findall(page.read_text())


@pytest.mark.slow  # the page's full-length fit: about a minute on one thread
def test_getting_started(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOCS / "getting-started.md")
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__getting_started__"}
    for block in blocks:
        exec(compile(block, "getting-started.md", "exec"), namespace)
    plt.close("all")
    out = capsys.readouterr().out
    assert "FitResult: 3000 steps (completed)" in out
    assert "Verdict:" in out and "hdi_3%" in out
    assert (tmp_path / "fit.png").exists() and (tmp_path / "theta.png").exists()
    assert namespace["diagnosis"].verdict in ("trust", "use with care", "do not trust")


@pytest.mark.slow  # full-length fits and, for neutra.md, NUTS: one to two minutes each
@pytest.mark.parametrize("page", ["initialization.md", "neutra.md", "big-data.md"])
# Lightning 2.6 on torch 2.13, and its advice for a small run (big-data.md).
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning")
@pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:GPU available but not used:UserWarning")
@pytest.mark.filterwarnings("ignore:Starting from v1.9.0, `tensorboardX`:UserWarning")
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_page_code_runs(page, tmp_path, monkeypatch, capsys):
    """The other pages whose code blocks form a whole program run as written too."""
    if page == "big-data.md":
        pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__page__"}
    for block in python_blocks(DOCS / page):
        exec(compile(block, page, "exec"), namespace)
    assert capsys.readouterr().out


def _modules() -> list[str]:
    names = [pyro_flows.__name__]
    for info in pkgutil.iter_modules(pyro_flows.__path__, prefix="pyro_flows."):
        names.append(info.name)
    return names


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module) if t.examples]
    return sorted(tests, key=lambda t: t.name)


@pytest.mark.parametrize("test", _doctests(), ids=lambda t: t.name)
def test_docstring_example(test):
    """Each docstring example on its own, from an empty param store and fixed seeds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    np.random.seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = []
    runner.run(test, out=output.append, clear_globs=True)
    plt.close("all")
    assert runner.failures == 0, "".join(output)


def test_docs_build_strict(tmp_path):
    """The site builds with every Sphinx warning an error (as the CI build)."""
    for module in ("sphinx", "myst_nb", "furo"):
        pytest.importorskip(module, reason="the docs tools: pip install -e '.[docs]'")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-2000:]
    html = tmp_path / "html"
    for page in ("index", "getting-started", "api", "neutra", "benchmark", "changelog"):
        assert (html / f"{page}.html").exists(), page
    assert "AutoFlowGuide" in (html / "api.html").read_text()
