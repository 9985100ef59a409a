"""Sphinx configuration of the pyro-flows documentation (see docs/README.md).

Build: ``sphinx-build -W --keep-going docs build/docs`` (warnings are errors, as in CI).
"""

import sys
from pathlib import Path

from docutils import nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro_flows  # noqa: E402

project = "pyro-flows"
author = "the pyro-flows developers"
copyright = "the pyro-flows developers; Apache-2.0"
release = version = pyro_flows.__version__

extensions = [
    "myst_nb",  # Markdown pages (MyST) and the committed notebooks, with their outputs
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings: Arguments, Returns, Example
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # ships MathJax with the site: formulas render without a network
    "sphinx.ext.viewcode",
]

exclude_patterns = ["README.md", "_build", "**/.ipynb_checkpoints"]

# Notebooks are shown with the outputs of their committed full run, never executed here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"pyro-flows {version}"
html_static_path = ["_static"]
html_theme_options = {"source_directory": "docs/", "navigation_with_keys": True}


def py_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: object,
    options: dict | None = None,
    content: list | None = None,
) -> tuple[list, list]:
    """``:py:`expr``` in the docstrings (zuko's convention): inline Python code."""
    node = nodes.literal(rawtext, text, classes=["code", "highlight", "python"])
    node["language"] = "python"
    return [node], []


def keep_notebook_outputs_inside(app: object) -> None:
    """Writes the notebooks' images into the doctree folder, not next to the output folder.

    myst-nb writes them to ``jupyter_execute`` beside the output folder (``build/docs`` gives
    ``build/jupyter_execute``) and has no setting for it. The doctree folder is inside the
    output folder unless ``-d`` puts it elsewhere, so a build writes nothing outside what the
    command line names.
    """
    config = app.env.mystnb_config
    folder = Path(app.doctreedir) / "jupyter_execute"
    app.env.mystnb_config = config.copy(output_folder=str(folder.resolve()))


def setup(app: object) -> None:
    app.add_role("py", py_role)
    # After myst-nb's own builder-inited handler (priority 500), which sets the folder.
    app.connect("builder-inited", keep_notebook_outputs_inside, priority=600)
