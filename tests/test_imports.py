"""The package's import graph: no cycle, and arrows only run down.

Every ``import`` / ``from ... import`` of every module of ``radnet_jax`` is read
with ``ast``, at module level and inside functions alike (a function-level
import hides an arrow, it does not remove it). One exception for cycles: a
module-level ``__getattr__`` that keeps a moved name importable from its old
home for a release (``convert.build_shards`` -> ``build.build_shards``) is a
re-export, not a dependency of the module's code; its imports still obey the
layering rule.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "radnet_jax")

# Layers that must never import a task or a training loop.
LOW = ("radnet_jax.inference", "radnet_jax.shards", "radnet_jax.phantom", "radnet_jax.dicom",
       "radnet_jax.labels", "radnet_jax.data", "radnet_jax.models", "radnet_jax.contract")
TASKS_AND_LOOPS = ("radnet_jax.tasks", "radnet_jax.training.trainer", "radnet_jax.training.loop")


def modules() -> dict[str, str]:
  """Dotted module name -> file, for every .py file of the package."""
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(d, f)
  return out


def _resolve(name: str, known: set) -> str | None:
  """The longest known module that ``name`` (a.b.c, maybe a.b.attr) names."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    cand = ".".join(parts[:n])
    if cand in known:
      return cand
  return None


def _shim_nodes(tree: ast.Module) -> set[int]:
  """ids of the nodes inside a module-level ``__getattr__`` (re-export shims)."""
  return {id(n) for f in tree.body if isinstance(f, ast.FunctionDef)
          and f.name == "__getattr__" for n in ast.walk(f)}


def imports_of(module: str, path: str, known: set, shims: bool = True) -> set[str]:
  """Package modules that ``module`` imports (anywhere in the file; with
  ``shims=False`` not counting a module-level ``__getattr__``)."""
  tree = ast.parse(open(path).read(), path)
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  skip = set() if shims else _shim_nodes(tree)
  out = set()
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      # ``from pkg import sub`` is an arrow to pkg.sub (a submodule) or to pkg
      # (an attribute), not to both: a package's submodules may import their
      # siblings through it.
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for n in names:
      target = _resolve(n, known)
      if target and target != module:
        out.add(target)
  return out


def graph(shims: bool = True) -> dict[str, set[str]]:
  mods = modules()
  known = set(mods)
  return {m: imports_of(m, p, known, shims) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def _under(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("import os\nfrom radnet_jax.shards import seg as s\n"
                 "def f():\n  from radnet_jax.tasks import segment\n  from . import demo\n")
  known = {"radnet_jax.shards", "radnet_jax.shards.seg", "radnet_jax.shards.demo",
           "radnet_jax.tasks", "radnet_jax.tasks.segment", "radnet_jax.shards.m"}
  got = imports_of("radnet_jax.shards.m", str(src), known)
  assert got == {"radnet_jax.shards.seg", "radnet_jax.tasks.segment",
                 "radnet_jax.shards.demo"}
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  shim = tmp_path / "old.py"
  shim.write_text("def __getattr__(name):\n  from radnet_jax.shards import seg\n"
                  "  return seg.build_shards\n")
  assert imports_of("radnet_jax.shards.m", str(shim), known) == {"radnet_jax.shards.seg"}
  assert imports_of("radnet_jax.shards.m", str(shim), known, shims=False) == set()


def test_no_import_cycle():
  found = cycles(graph(shims=False))
  assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_low_layers_never_import_a_task_or_a_training_loop():
  bad = sorted(f"{m} -> {t}" for m, ts in graph().items() if _under(m, LOW)
               for t in ts if _under(t, TASKS_AND_LOOPS))
  assert not bad, "imports against the layering:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("module", [
    "radnet_jax.cli.predict", "radnet_jax.cli.predict_seg", "data_prep.build_shards",
    "data_prep.build_seg_shards", "data_prep.make_phantoms", "data_prep.label_index",
    "data_prep.locate", "data_prep.select_series", "data_prep.beam_build_shards"])
def test_cli_help_imports_no_jax(module):
  code = (f"import sys, runpy; sys.argv = ['x', '--help']\n"
          f"try:\n  runpy.run_module({module!r}, run_name='__main__')\n"
          f"except SystemExit:\n  pass\n"
          f"assert 'jax' not in sys.modules, 'jax imported by --help'")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "usage:" in res.stdout
