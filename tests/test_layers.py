"""Imports only go down the floors of the package plan: every `kimi_jax` module is parsed and
each import of another `kimi_jax` package must land on a lower floor, or on the same floor
without a cycle between packages."""
import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOORS = {"sharding": 0, "optimizers": 0, "losses": 0, "metrics": 0, "model": 1,
          "checkpointing": 2, "data": 3, "rewards": 3, "rollout": 4, "eval": 5, "training": 6}


def imported_modules(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
  """(line, dotted kimi_jax module) of every import in `source`, a module of `package`
  (e.g. ("kimi_jax", "eval")), relative imports resolved."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
      module = ".".join(filter(None, [base, node.module]))
      found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
  return [(line, name) for line, name in found if name.startswith("kimi_jax.")]


def package_edges() -> list[tuple[str, str, str]]:
  """(importing package, imported package, 'file:line') across package borders."""
  edges = []
  for path in sorted((ROOT / "kimi_jax").rglob("*.py")):
    parts = path.relative_to(ROOT / "kimi_jax").parts
    if len(parts) < 2:
      continue  # kimi_jax/__init__.py
    package = path.relative_to(ROOT).parts[:-1]
    for line, name in imported_modules(path.read_text(), package):
      target = name.split(".")[1]
      if target != parts[0]:
        edges.append((parts[0], target, f"{path.relative_to(ROOT)}:{line}"))
  return edges


def test_every_package_has_a_floor():
  packages = {p.name for p in (ROOT / "kimi_jax").iterdir() if (p / "__init__.py").exists()}
  assert packages == set(FLOORS), packages ^ set(FLOORS)


def test_no_import_goes_up_a_floor():
  upward = [f"{where}: {src} (floor {FLOORS[src]}) imports {dst} (floor {FLOORS[dst]})"
            for src, dst, where in package_edges() if FLOORS[dst] > FLOORS[src]]
  assert not upward, "\n".join(upward)


def test_packages_form_no_cycle():
  sorter = graphlib.TopologicalSorter()
  for src, dst, _ in package_edges():
    sorter.add(src, dst)
  sorter.prepare()  # raises graphlib.CycleError naming the cycle


@pytest.mark.parametrize("source,expected", [
    ("from kimi_jax.training import rl", ["kimi_jax.training.rl"]),
    ("import kimi_jax.rollout.engine", ["kimi_jax.rollout.engine"]),
    ("from ..rollout import types", ["kimi_jax.rollout.types"]),
    ("from . import summary", ["kimi_jax.eval.summary"]),
    ("from .summary import summarize", ["kimi_jax.eval.summary.summarize"]),
    ("import numpy", []),
])
def test_imported_modules_resolves_absolute_and_relative_imports(source, expected):
  assert [name for _, name in imported_modules(source, ("kimi_jax", "eval"))] == expected
