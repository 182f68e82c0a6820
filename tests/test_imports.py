"""The import direction of the package (LAYOUT.md), checked statically with ``ast``.

Layers, from the bottom:

- shared helpers (``attnax/kernels/{_checks,protocols,score_mods,block_mask,tiles,merge,operands,
  gqa}.py``) import no kernel, no planner and not the Flax module;
- kernels (``reference``, ``memory_efficient``, ``flash``, ``pallas/*``, ``linear``, ``ring``,
  ``paged*``) import no planner (``attnax/kernels/aether/*``) and not ``attnax/attention.py``;
- planners do not import ``attnax/attention.py``.

Imports are read from the source (``import``/``from ... import`` anywhere in a module, function
bodies included, and ``importlib.import_module("...")`` with a literal name) and followed
transitively through every attnax module, so a helper cannot reach a kernel through a third module
either. ``from package import name`` depends on the submodule ``package.name`` when it exists,
otherwise on the package itself (its ``__init__``, which re-exports: importing
``attnax.kernels`` pulls in every kernel). Modules that do not exist (yet) are simply absent.
Also: no import cycles between the modules of one kernel subpackage (``attnax/kernels/pallas/``,
...).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnax"

HELPERS = ("_checks", "protocols", "score_mods", "block_mask", "tiles", "merge", "operands", "gqa")
KERNELS = ("reference", "memory_efficient", "flash", "pallas", "linear", "ring", "paged")
PLANNERS = ("aether",)
ATTENTION = "attnax.attention"


def module_files() -> dict[str, pathlib.Path]:
  """Dotted module name -> source file, for every module of the attnax package."""
  mods = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


MODULES = module_files()


def _is_package(name: str) -> bool:
  return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _resolve(name: str) -> str | None:
  """The attnax module ``name`` refers to: itself, or its longest prefix that is a module."""
  parts = name.split(".")
  while parts:
    candidate = ".".join(parts)
    if candidate in MODULES:
      return candidate
    parts.pop()
  return None


def direct_imports(module: str) -> dict[str, int]:
  """attnax modules ``module`` imports -> the line of the first such import."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  package = module if _is_package(module) else module.rpartition(".")[0]
  found: dict[str, int] = {}

  def add(target: str | None, node: ast.AST):
    if target is not None and target != module:
      found.setdefault(target, node.lineno)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(_resolve(alias.name), node)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        add(sub if sub in MODULES else _resolve(source), node)
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)):
      add(_resolve(node.args[0].value), node)
  return found


GRAPH = {m: direct_imports(m) for m in MODULES}


def reachable(start: str) -> dict[str, list[str]]:
  """Every module ``start`` imports, directly or through others -> one import chain to it."""
  chains = {start: [start]}
  todo = [start]
  while todo:
    m = todo.pop()
    for t in GRAPH[m]:
      if t not in chains:
        chains[t] = chains[m] + [t]
        todo.append(t)
  del chains[start]
  return chains


def _layer(names: tuple[str, ...]) -> set[str]:
  """The modules of a layer: ``attnax.kernels.<name>``, the package and every submodule of it,
  and (for ``paged``) every ``paged*`` module."""
  out = set()
  for m in MODULES:
    if not m.startswith("attnax.kernels."):
      continue
    first = m.split(".")[2]
    for n in names:
      if first == n or (n == "paged" and first.startswith("paged")):
        out.add(m)
  return out


HELPER_MODULES = sorted(f"attnax.kernels.{n}" for n in HELPERS if f"attnax.kernels.{n}" in MODULES)
KERNEL_MODULES = sorted(_layer(KERNELS))
PLANNER_MODULES = sorted(_layer(PLANNERS))
# Aggregators re-export a whole layer: importing one imports what it re-exports.
KERNEL_LIKE = set(KERNEL_MODULES) | {"attnax.kernels"}
PLANNER_LIKE = set(PLANNER_MODULES) | {"attnax.kernels"}
ATTENTION_LIKE = {ATTENTION, "attnax"}


def _violations(module: str, forbidden: set[str]) -> list[str]:
  """Import chains from ``module`` to a forbidden module (the first one on each chain)."""
  return [" -> ".join(chain) + f" (line {GRAPH[chain[-2]][chain[-1]]} of {chain[-2]})"
          for target, chain in sorted(reachable(module).items())
          if target in forbidden and not forbidden & set(chain[1:-1])]


def test_layers_are_found():
  assert {"attnax.kernels.score_mods", "attnax.kernels._checks"} <= set(HELPER_MODULES)
  assert {"attnax.kernels.flash", "attnax.kernels.reference", "attnax.kernels.pallas"} <= set(
      KERNEL_MODULES)
  assert "attnax.kernels.aether" in PLANNER_MODULES and ATTENTION in MODULES
  # The import reader sees the imports that are known to exist.
  assert "attnax.kernels.score_mods" in GRAPH["attnax.kernels.reference"]
  assert "attnax.kernels.reference" in GRAPH["attnax.kernels"]


@pytest.mark.parametrize("module", HELPER_MODULES)
def test_shared_helpers_import_no_kernel(module):
  bad = _violations(module, KERNEL_LIKE | PLANNER_LIKE | ATTENTION_LIKE)
  assert not bad, f"{module} (a shared helper) imports kernel-level code:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_import_no_planner_and_not_the_module(module):
  bad = _violations(module, PLANNER_LIKE | ATTENTION_LIKE)
  assert not bad, (f"{module} (a kernel) imports a planner or attnax.attention:\n  "
                   + "\n  ".join(bad))


@pytest.mark.parametrize("module", PLANNER_MODULES)
def test_planners_do_not_import_the_module(module):
  bad = _violations(module, ATTENTION_LIKE)
  assert not bad, f"{module} (a planner) imports attnax.attention:\n  " + "\n  ".join(bad)


def _cycles(modules: set[str]) -> list[list[str]]:
  """Strongly connected components (size > 1, or a self-import) of the import graph on
  ``modules`` (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(m):
    index[m] = low[m] = len(index)
    stack.append(m)
    on.add(m)
    for t in GRAPH[m]:
      if t not in modules:
        continue
      if t not in index:
        visit(t)
        low[m] = min(low[m], low[t])
      elif t in on:
        low[m] = min(low[m], index[t])
    if low[m] == index[m]:
      comp = []
      while True:
        t = stack.pop()
        on.discard(t)
        comp.append(t)
        if t == m:
          break
      if len(comp) > 1 or m in GRAPH[m]:
        out.append(sorted(comp))

  for m in sorted(modules):
    if m not in index:
      visit(m)
  return out


SUBPACKAGES = sorted(m for m in MODULES if m.startswith("attnax.kernels.") and _is_package(m))


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_import_cycles_in_kernel_subpackages(package):
  members = {m for m in MODULES if m == package or m.startswith(package + ".")}
  cycles = _cycles(members)
  lines = []
  for comp in cycles:
    edges = [f"{a} imports {b} (line {GRAPH[a][b]})" for a in comp for b in comp
             if b in GRAPH[a]]
    lines.append(" <-> ".join(comp) + ": " + "; ".join(edges))
  assert not cycles, f"import cycles in {package}:\n  " + "\n  ".join(lines)
