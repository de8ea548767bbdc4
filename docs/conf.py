"""Sphinx configuration of the pbs2p documentation (build: ``sphinx-build -W -b html docs docs/_build/html``)."""

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pbs2p

project = "pbs2p"
author = "pbs2p contributors"
release = pbs2p.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath"]
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
exclude_patterns = ["_build", "generated/*.md"]
templates_path = ["_templates"]
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
