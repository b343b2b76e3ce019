"""Sphinx configuration of the lit_partial documentation (``make docs``: HTML in docs/_build, warnings are errors)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lit_partial, not an installed one

project = "lit_partial"
author = "lit_partial contributors"
copyright = "lit_partial contributors"
release = "0.1.0"

extensions = [
    "myst_parser",  # Markdown pages
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
# Pages starting with "_" are fragments (not part of the site); the benchmark's raw output is linked, not a page.
exclude_patterns = ["_build", "**/_*", "benchmark_results.md"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False  # the API pages are written by hand (curated), no generated stubs
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = "lit_partial"
html_static_path: list[str] = []
