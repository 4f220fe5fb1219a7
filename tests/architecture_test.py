"""The package's house, read from its imports: what runs inside `jit` and what is host numpy.

Layers (docs/architecture.md): each package may import only the packages below
it. Host-side packages (io, analysis, report) never import the training side
(training, model), so an analysis can never change what a run computes. The one
host-side use of JAX compute is analysis recomputing the Adam accounting from
recorded W, m, v with the optimizer's own pure update (optim.accounting).
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "jaxdt"

# package -> the jaxdt packages it may import (besides itself)
ALLOWED = {
    "config": set(),
    "numerics": {"config"},
    "io": {"config"},
    "optim": {"config", "numerics"},
    "model": {"config", "numerics"},
    "data": {"config", "numerics", "io"},
    # what a step records and the one table of file keys; optim only inside the
    # accounting probe's factory (lazily)
    "probes": {"config", "numerics", "optim"},
    "analysis": {"config", "numerics", "io", "optim", "probes"},  # stream.accounting_from_state
    "report": {"config", "numerics", "io", "analysis", "probes"},
    "training": {"config", "numerics", "io", "optim", "model", "data", "probes"},
    "verify": {"config", "numerics", "io", "optim", "model", "data", "analysis", "training",
               "probes"},
    # a study runs members (training), scores the detector on them (detection) and writes
    # their summaries and tables (report)
    "study": {"config", "numerics", "io", "training", "report", "detection"},
    # --detect: a run's states (training.replay) scored and written (analysis, report)
    "detection": {"config", "numerics", "io", "analysis", "training", "report"},
    "cli": set(),  # absl flag errors as one line (run.py's scripts, benchmarks/, torchref)
}
HOST_SIDE = ("io", "analysis", "report")
TRAINING_SIDE = {"training", "model"}


def _package_of(path: pathlib.Path) -> str:
  rel = path.relative_to(PKG)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _jaxdt_imports(path: pathlib.Path) -> set:
  """The jaxdt packages a module imports (top-level, in functions, anywhere)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "jaxdt"
               else [node.module])
    for n in names:
      parts = n.split(".")
      if parts[0] == "jaxdt" and len(parts) > 1:
        found.add(parts[1])
    assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
  return found


MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py")


def test_every_module_belongs_to_a_known_package():
  unknown = {_package_of(p) for p in MODULES} - set(ALLOWED)
  assert not unknown, f"add {sorted(unknown)} to ALLOWED with their layer"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layers(path):
  pkg = _package_of(path)
  bad = _jaxdt_imports(path) - ALLOWED[pkg] - {pkg}
  assert not bad, f"{path.relative_to(PKG)} ({pkg}) imports {sorted(bad)}"


def test_host_side_never_imports_the_training_side():
  for path in MODULES:
    if _package_of(path) in HOST_SIDE:
      assert not _jaxdt_imports(path) & TRAINING_SIDE, path


def test_the_layers_have_no_cycle():
  seen, order = set(), []

  def visit(pkg, stack):
    assert pkg not in stack, f"cycle: {' -> '.join(stack + [pkg])}"
    if pkg in seen:
      return
    for dep in sorted(ALLOWED[pkg]):
      visit(dep, stack + [pkg])
    seen.add(pkg)
    order.append(pkg)

  for pkg in ALLOWED:
    visit(pkg, [])
  assert len(order) == len(ALLOWED)


def test_the_checker_sees_a_forbidden_import(tmp_path):
  bad = tmp_path / "m.py"
  bad.write_text("def f():\n  from jaxdt.training import step\n  import jaxdt.model.tinylm\n")
  assert _jaxdt_imports(bad) == {"training", "model"}


def test_host_side_imports_do_not_load_the_training_side():
  import subprocess
  import sys
  code = ("import sys, jaxdt.report.outputs, jaxdt.io.rundir, jaxdt.analysis.compare; "
          "bad = [m for m in sys.modules if m.split('.')[:2] in "
          "(['jaxdt', 'training'], ['jaxdt', 'model'], ['jaxdt', 'optim'], ['jaxdt', 'data'])]; "
          "print(bad); sys.exit(1 if bad else 0)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=PKG.parent, check=False)
  assert r.returncode == 0, r.stdout + r.stderr


def test_public_api():
  import jaxdt
  for name in jaxdt.__all__:
    assert getattr(jaxdt, name) is not None, name
  assert callable(jaxdt.train) and callable(jaxdt.analyze) and callable(jaxdt.compare)
  with pytest.raises(AttributeError):
    jaxdt.no_such_name  # pylint: disable=pointless-statement


# Rooms that say what they hold: no module over 450 lines, no function over 60 lines or
# with more than 7 parameters (self and cls not counted), in jaxdt/, torchref/ and run.py.
TORCHREF = sorted((PKG.parent / "torchref").glob("*.py"))
SOURCES = MODULES + TORCHREF + [PKG.parent / "run.py"]


def _functions(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      a = node.args
      names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
      n = len(names) + bool(a.vararg) + bool(a.kwarg) - (names[:1] in (["self"], ["cls"]))
      yield node.name, node.end_lineno - node.lineno + 1, n


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_modules_and_functions_stay_small(path):
  assert path.read_text(encoding="utf-8").count("\n") <= 450, f"{path.name} is over 450 lines"
  for name, lines, params in _functions(path):
    assert lines <= 60, f"{path.name}:{name} has {lines} lines"
    assert params <= 7, f"{path.name}:{name} takes {params} parameters"


def test_no_script_edits_sys_path():
  """Packages are installed (jaxdt, experiments, torchref): nothing edits sys.path to find them."""
  roots = [PKG, PKG.parent / "torchref", PKG.parent / "benchmarks", PKG.parent / "experiments",
           PKG.parent / "tests"]
  files = [p for r in roots for p in r.rglob("*.py")] + [PKG.parent / "run.py"]
  needle = "sys.path." + "insert"  # spelled apart, so this file does not count itself
  edits = [str(p.relative_to(PKG.parent)) for p in files
           if needle in p.read_text(encoding="utf-8")]
  assert not edits, f"sys.path edits in {edits}"


def test_torchref_is_never_imported_by_jaxdt():
  for path in MODULES:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "torchref" for n in names), path
