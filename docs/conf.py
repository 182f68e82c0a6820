"""Sphinx configuration for attnax (build: sphinx-build -W -b html docs docs/_build/html)."""

import pathlib
import re

import attnax

project = "attnax"
author = "the attnax authors"
copyright = "2025, the attnax authors"
release = attnax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Docstrings are Google style; the package imports without JAX tricks, so nothing is mocked.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"attnax {release}"

# index.rst lists the core pages (kernels, attention); any other top-level page someone adds to
# docs/ joins a "More" toctree automatically, so a new guide is never an orphan (a -W error).
_HERE = pathlib.Path(__file__).parent


def _add_other_pages(app, docname, source):
  if docname != "index":
    return
  listed = set(re.findall(r"^\s+(\S+)\s*$", source[0], flags=re.M))
  others = sorted(p.stem for p in _HERE.glob("*.rst") if p.stem != "index" and p.stem not in listed)
  if others:
    source[0] += "\n.. toctree::\n   :maxdepth: 1\n   :caption: More\n\n" + "".join(
        f"   {name}\n" for name in others)


def setup(app):
  app.connect("source-read", _add_other_pages)
