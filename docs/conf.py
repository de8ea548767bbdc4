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
    # internal modules and helpers named in docstrings but not part of the documented API
    (r"py:.*", r"(BlockRecord|load_model|pbs2p\.(kernels|algorithms|pipeline\.sequential)(\..*)?)"),
    (r"py:.*", r"pbs2p_lab\.(data|eval)\..*"),
]
