"""Sphinx configuration of the pbs2p documentation (build: ``sphinx-build -n -W -b html docs docs/_build/html``)."""

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
    "sphinxarg.ext",
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

# `sphinx-build -n -W` (nitpicky) must pass offline: the machines that build these docs reach no documentation
# site, so names of other projects (torch, torchao, transformers, the standard library) are not linked.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|torchao|transformers|safetensors|collections|pathlib|os|typing|dataclasses)(\..*)?"),
    (r"py:class", r"(int|float|str|bool|dict|list|tuple|object|None|Callable|Sequence|Iterator|Path)"),
    (r"py:class", r"(optional|default .*|callable)"),
    # a module and a name written in docstrings without their documented path
    (r"py:mod", r"pbs2p\.kernels\.packing"),
    (r"py:func", r"load_model"),
    (r"py:class", r"BlockRecord"),
]
