"""Documents that cannot go stale silently: every reference they make must resolve.

Reads README.md, BUILD_NOTES.md, docs/*.md and every docstring (module, class,
function) under jaxdt/, torchref/, benchmarks/, experiments/ and run.py, and checks:

- file paths, a token ending in .py, .md, .sh, .json or .toml, in a backticked
  span, in a fenced block or in the prose: the path must exist from the
  repository root, or, written short (`rundir.py`, `io/rundir.py`), be the path
  suffix of exactly one file in the repository. Placeholders and run outputs
  (`runs/...`, `<name>`, `/tmp/x.json`, a flag's value) are left alone; the
  names of produced files (`summary.json`) must still be spelt in the code.
- dotted Python names in a backticked span (`rundir.open_run`,
  `jaxdt.io.rundir.RunDir`, `tied_nll.resolve_block_rows(...)`,
  `store.checkpoint_steps`): the first part must name a project module or
  package (by its last dotted component, or an import alias the project uses,
  `config_lib`), a top-level class of the project, `cfg`, or a section of
  ExperimentConfig, and the rest must then be found statically (a top-level
  binding or lazy export of the module, a member of a named class, a submodule,
  a config dataclass field); or the first part must be one of EXTERNAL_ROOTS
  (`jax`, `np`, `exp_avg`, ...), which are someone else's and are not checked.

Section references ("docs/definitions.md §Adam accounting", "BUILD_NOTES §4")
must name a heading of that file. Comments are not read. Pure file reading
(`ast`; nothing of the project is imported), so it is fast.
"""

import ast
import functools
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOC_FILES = ("README.md", "BUILD_NOTES.md")
DOC_DIRS = ("docs",)
CODE_ROOTS = ("jaxdt", "torchref", "benchmarks", "experiments", "run.py")
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "runs", "node_modules", ".venv", "venv"}

CHECKED_EXTS = ("py", "md", "sh", "json", "toml")
# Any of these as the last dotted part makes a token a file name, not a Python name
# (`metadata.json` is a file, not the attribute `json` of module io.metadata).
FILE_EXTS = set(CHECKED_EXTS) | {
    "txt", "png", "pt", "pth", "bin", "safetensors", "npz", "npy", "csv", "jsonl", "log",
    "yaml", "yml", "parquet", "html", "pdf", "lock", "cfg", "ini", "zip", "gz", "tar",
    "svg", "ipynb", "pkl", "tmp", "partial", "c", "h", "so", "whl"}

# Files a run or a benchmark writes, and the lab's input files: outputs and user
# files, not sources, so they are not looked for in the repository. Each must still
# be spelt as a string constant somewhere in the project's code (the name the code
# writes or reads), so that a renamed output cannot linger in the docs either.
PRODUCED_FILES = {
    "summary.json", "metadata.json", "meta.json", "compare.json", "tables.md",
    "sweep_summary.json", "flannel_tokenizer_chars.json", "detect.json", "twins.json",
    "grads.json",
}
# Substrings that mark a path as a pattern, a placeholder, a run output or a user file.
PLACEHOLDER_MARKS = ("runs/", "<", ">", "*", "/tmp", "~", "$", "{", "}", "...", "…", "://")
# Path components that stand for any name (`experiments/NAME.py`).
PLACEHOLDER_STEMS = {"NAME", "N", "X"}

# First parts of dotted names that are not this project's: other libraries, and the
# local variables, parameters and state-dict keys that prose quotes (`tx.update`,
# `exp_avg.lerp_`). Any other first part that names no project module, import
# alias, class or config section is reported, so that a module that was renamed or
# removed (`train.train`) cannot linger; add a name here only if it is not ours.
EXTERNAL_ROOTS = {
    # libraries
    "jax", "jnp", "lax", "np", "numpy", "torch", "nn", "optax", "flax", "tokenizers",
    "models", "safetensors", "huggingface_hub", "pyarrow", "pq", "pa", "pydoc_data",
    "transformers", "matplotlib", "plt", "ml_dtypes", "absl", "pytest", "hypothesis",
    # the standard library (besides sys.stdlib_module_names)
    "dataclasses", "os", "json",
    # variables, parameters and weight names in prose and formulas
    "exp_avg", "exp_avg_sq", "param", "p", "x", "tokenizer", "reader", "tx", "lm_head",
    "transformer", "optimizer", "W_dead", "loss", "spec", "checkpointer",
}
# Whole names of someone else's that begin with one of ours: torch's nn.Module.to on
# a variable called `model` (also our package jaxdt.model and a config section).
EXTERNAL_NAMES = {"model.to"}

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
DOTTED_RE = re.compile(rf"^({IDENT}(?:\.{IDENT})+)(?:\(.*\))?$")
PATH_RE = re.compile(r"[\w./-]*\w\.(?:%s)(?![\w])" % "|".join(CHECKED_EXTS))
SPAN_RE = re.compile(r"(`+)([^`]+?)\1(?!`)")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
# "docs/definitions.md §Adam accounting", "BUILD_NOTES §4", and in a markdown file a
# bare "see §4" (its own sections). The section must be a heading of that file: by
# its number ("## 4. ...") or by its first word ("## Adam accounting"). A document
# named in capitals that is not ours ("REFERENCE §5", the lab's) is left alone.
SECTION_RE = re.compile(r"(?:(?P<file>[\w./-]+)[\s,]+)?§\s?(?P<sec>[^\s,;:.)\"`]+)")


# --------------------------------------------------------------------------- sources

def _walk_files(root):
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Hidden folders (.git, .venv-ci: CI's venv inside the clone) and virtual environments
    # hold other projects' files, never the ones the documents mean.
    dirnames[:] = sorted(d for d in dirnames
                         if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and not d.startswith(".")
                         and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")))
    for name in sorted(filenames):
      out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return out


def _python_files(repo):
  files = []
  for root in CODE_ROOTS:
    path = os.path.join(repo, root)
    if os.path.isfile(path):
      files.append(root)
    elif os.path.isdir(path):
      files.extend(f"{root}/{rel}" for rel in _walk_files(path) if rel.endswith(".py"))
  return files


@functools.lru_cache(maxsize=None)
def _parse(path):
  with open(path, encoding="utf-8") as f:
    return ast.parse(f.read(), path)


def split_text(text, first_line=1):
  """([(line, span)], [(line, prose line)]): inline code spans, and the rest.

  Fenced blocks yield no spans; their lines count as prose (for paths only). Code
  spans never cross a blank line, so backticks pair paragraph by paragraph: one
  stray backtick cannot shift the pairing of the rest of the file.
  """
  kept, prose, in_fence = [], [], False
  for line in text.split("\n"):
    if FENCE_RE.match(line):
      in_fence = not in_fence
      kept.append("")
      prose.append("")
    elif in_fence:
      kept.append("")
      prose.append(line)
    else:
      kept.append(line)
      prose.append(None)  # filled in below, with the spans blanked
  found, start = [], 0
  while start < len(kept):
    if not kept[start].strip():
      start += 1
      continue
    end = start
    while end < len(kept) and kept[end].strip():
      end += 1
    para = "\n".join(kept[start:end])
    for m in SPAN_RE.finditer(para):
      found.append((first_line + start + para.count("\n", 0, m.start()),
                     " ".join(m.group(2).split())))
    blanked = SPAN_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), para).split("\n")
    prose[start:end] = [p if p is not None else b for p, b in zip(prose[start:end], blanked)]
    start = end
  return found, [(first_line + i, p) for i, p in enumerate(prose) if p and p.strip()]


def spans(text, first_line=1):
  return split_text(text, first_line)[0]


def doc_sources(repo=REPO):
  """(where, text, first line) for each markdown file and each docstring."""
  out = []
  for rel in DOC_FILES:
    path = os.path.join(repo, rel)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        out.append((rel, f.read(), 1))
  for d in DOC_DIRS:
    for rel in _walk_files(os.path.join(repo, d)):
      if rel.endswith(".md"):
        with open(os.path.join(repo, d, rel), encoding="utf-8") as f:
          out.append((f"{d}/{rel}", f.read(), 1))
  for rel in _python_files(repo):
    for node in ast.walk(_parse(os.path.join(repo, rel))):
      if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      body = node.body
      if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
          and isinstance(body[0].value.value, str)):
        name = getattr(node, "name", "module")
        out.append((f"{rel}|{name} docstring", body[0].value.value, body[0].value.lineno))
  return out


# --------------------------------------------------------------------------- project index

class _Scope:
  """Names a module or class binds, statically; `classes` maps to nested scopes."""

  def __init__(self):
    self.names = set()
    self.classes = {}
    self.bases = {}  # class name -> base names (for lookups through same-module bases)


def _targets(node):
  if isinstance(node, ast.Name):
    yield node.id
  elif isinstance(node, (ast.Tuple, ast.List)):
    for elt in node.elts:
      yield from _targets(elt)
  elif isinstance(node, ast.Starred):
    yield from _targets(node.value)


def _scan_body(body, scope):
  for stmt in body:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
      scope.names.add(stmt.name)
    elif isinstance(stmt, ast.ClassDef):
      scope.names.add(stmt.name)
      inner = _Scope()
      _scan_body(stmt.body, inner)
      for sub in ast.walk(stmt):  # instance attributes: self.x = ...
        if isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
          for t in (sub.targets if isinstance(sub, ast.Assign) else [sub.target]):
            if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id == "self"):
              inner.names.add(t.attr)
      scope.classes[stmt.name] = inner
      scope.bases[stmt.name] = [ast.unparse(b) for b in stmt.bases]
    elif isinstance(stmt, ast.Assign):
      for t in stmt.targets:
        scope.names.update(_targets(t))
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
      scope.names.update(_targets(stmt.target))
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
      for alias in stmt.names:
        scope.names.add((alias.asname or alias.name).split(".")[0])
    elif isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
      for field in ("body", "orelse", "finalbody"):
        _scan_body(getattr(stmt, field, []), scope)
      for handler in getattr(stmt, "handlers", []):
        _scan_body(handler.body, scope)


def _lazy_exports(tree):
  """Names a module serves through a module-level __getattr__ (jaxdt's `train`)."""
  if not any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in tree.body):
    return set()
  names = set()
  for stmt in tree.body:
    if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Dict):
      names.update(k.value for k in stmt.value.keys
                   if isinstance(k, ast.Constant) and isinstance(k.value, str))
  return names


class Project:
  """Modules (by dotted name), their static scopes, the config sections and all files."""

  def __init__(self, repo=REPO):
    self.repo = repo
    self.files = _walk_files(repo)
    self.modules = {}  # dotted name -> _Scope
    self.submodules = {}  # package dotted name -> set of child names
    self.literals = set()  # every string constant in the project's code
    for rel in _python_files(repo):
      parts = rel[:-3].split("/")
      if parts[-1] == "__init__":
        parts = parts[:-1]
      tree = _parse(os.path.join(repo, rel))
      scope = _Scope()
      _scan_body(tree.body, scope)
      scope.names |= _lazy_exports(tree)
      self.modules[".".join(parts)] = scope
      for i in range(1, len(parts)):
        self.submodules.setdefault(".".join(parts[:i]), set()).add(parts[i])
      self.literals.update(n.value for n in ast.walk(tree)
                           if isinstance(n, ast.Constant) and isinstance(n.value, str))
    for pkg in self.submodules:  # directories without __init__.py (benchmarks/)
      self.modules.setdefault(pkg, _Scope())
    self.by_stem = {}
    for dotted in self.modules:
      self.by_stem.setdefault(dotted.split(".")[-1], set()).add(dotted)
    self.classes = {}  # top-level class name -> [(module, class)]
    for dotted, scope in self.modules.items():
      for cls in scope.classes:
        self.classes.setdefault(cls, []).append((dotted, cls))
    self.config_fields, self.sections = self._config()
    self.aliases = self._aliases()

  def _config(self):
    """Each config dataclass's fields, and ExperimentConfig's dataclass-valued sections."""
    fields, annotations = {}, {}
    for node in _parse(os.path.join(self.repo, "jaxdt", "config.py")).body:
      if isinstance(node, ast.ClassDef):
        fields[node.name] = set()
        for stmt in node.body:
          if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            fields[node.name].add(stmt.target.id)
            annotations[(node.name, stmt.target.id)] = ast.unparse(stmt.annotation)
          elif isinstance(stmt, ast.FunctionDef) and any(
              ast.unparse(d) == "property" for d in stmt.decorator_list):
            fields[node.name].add(stmt.name)
    sections = {name: annotations[("ExperimentConfig", name)]
                for name in fields.get("ExperimentConfig", ())
                if annotations.get(("ExperimentConfig", name)) in fields}
    return fields, sections

  def _aliases(self):
    """`config_lib` -> jaxdt.config: the aliases the project imports its modules by."""
    aliases = {}
    files = _python_files(self.repo) + [
        f for f in self.files if f.startswith("tests/") and f.endswith(".py")]
    for rel in files:
      for node in ast.walk(_parse(os.path.join(self.repo, rel))):
        if isinstance(node, ast.ImportFrom) and node.module:
          for a in node.names:
            if a.asname and f"{node.module}.{a.name}" in self.modules:
              aliases.setdefault(a.asname, set()).add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Import):
          for a in node.names:
            if a.asname and a.name in self.modules:
              aliases.setdefault(a.asname, set()).add(a.name)
    return aliases

  # ------------------------------------------------------------------ resolvers

  def _in_class(self, module, cls, rest, seen=()):
    scope = self.modules[module]
    inner = scope.classes[cls]
    if rest[0] in inner.classes:
      return len(rest) == 1 or rest[1] in inner.classes[rest[0]].names
    if rest[0] in inner.names:
      return True  # a method or attribute; anything after it is runtime
    for base in scope.bases.get(cls, []):
      if base in scope.classes:
        if base not in seen and self._in_class(module, base, rest, seen + (cls,)):
          return True
      elif base != "object":
        return True  # a base from elsewhere (NamedTuple, Exception, ...): can't tell
    return False

  def _in_module(self, module, rest):
    """Whether `rest` (attribute parts) exists below `module`."""
    if not rest:
      return True
    name = rest[0]
    if name in self.submodules.get(module, ()) and self._in_module(f"{module}.{name}", rest[1:]):
      return True
    scope = self.modules.get(module)
    if scope is None:
      return False
    if name in scope.classes:
      return len(rest) == 1 or self._in_class(module, name, rest[1:])
    return name in scope.names  # a function or value: anything after it is runtime

  def _config_path(self, section, rest):
    cls = self.sections.get(section)
    return cls is not None and (not rest or rest[0] in self.config_fields[cls])

  def resolve_name(self, token):
    """None if `token` is someone else's name; else whether it resolves."""
    if token in EXTERNAL_NAMES:
      return None
    parts = token.split(".")
    first, rest = parts[0], parts[1:]
    candidates = []
    for module in sorted(self.by_stem.get(first, set()) | self.aliases.get(first, set())):
      candidates.append(self._in_module(module, rest))
    for module, cls in self.classes.get(first, ()):
      candidates.append(self._in_class(module, cls, rest))
    if first in self.sections:
      candidates.append(self._config_path(first, rest))
    if first == "cfg":
      top = self.config_fields.get("ExperimentConfig", set())
      candidates.append(rest[0] in top and (rest[0] not in self.sections
                                            or self._config_path(rest[0], rest[1:])))
    if not candidates:
      if first in EXTERNAL_ROOTS or first in getattr(sys, "stdlib_module_names", ()):
        return None
      return False  # names nothing of ours, nor anything known to be someone else's
    if any(candidates):
      return True
    # A standard-library module that a project package shares a name with (`io`):
    # only a reference that goes on into the project's package is ours.
    if first in getattr(sys, "stdlib_module_names", ()) and first not in self.sections:
      if not any(rest[0] in self.submodules.get(m, ()) for m in self.by_stem.get(first, ())):
        return None
    return False

  def resolve_section(self, file, section, own=None):
    """None if `file` is not ours (the lab's REFERENCE); else whether it has the section."""
    if any(mark in section for mark in PLACEHOLDER_MARKS):
      return None
    if file is not None and not file.endswith(".md"):
      if file not in ("BUILD_NOTES", "README"):
        if file.isupper():
          return None  # someone else's document
        file = None  # a word of the sentence: "see §4"
    if file is None:
      if own is None or not os.path.exists(os.path.join(self.repo, own)):
        return None  # a docstring's bare "§4" names no file
      path = own
    else:
      path = file if file.endswith(".md") else file + ".md"
      if self.resolve_path(path) is not True:
        return False
      if not os.path.exists(os.path.join(self.repo, path)):
        path = next(f for f in self.files if f.endswith("/" + path))
    with open(os.path.join(self.repo, path), encoding="utf-8") as f:
      headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    if section.isdigit():
      return any(h.startswith(section + ".") or h.startswith(section + " ") for h in headings)
    return any(h.split()[0] == section for h in headings if h)

  def resolve_path(self, token):
    """None if `token` is a placeholder or a user's file; else whether it exists."""
    if any(mark in token for mark in PLACEHOLDER_MARKS):
      return None
    if token.startswith("/"):
      return None  # a machine's own path (a run folder, a script kept outside the repo)
    path = token[2:] if token.startswith("./") else token
    if any(part.split(".")[0] in PLACEHOLDER_STEMS for part in path.split("/")):
      return None
    if os.path.basename(path) in PRODUCED_FILES:
      return os.path.basename(path) in self.literals
    if os.path.exists(os.path.join(self.repo, path)):
      return True
    return sum(f == path or f.endswith("/" + path) for f in self.files) == 1


@functools.lru_cache(maxsize=None)
def project():
  return Project()


# --------------------------------------------------------------------------- check

def path_tokens(text):
  """Path-like tokens of a span or a prose line, less placeholders and flag values."""
  for word in text.split():
    word = word.split("=")[0] if word.startswith("-") else word  # --out=x.json: the user's
    if any(mark in word for mark in PLACEHOLDER_MARKS):
      continue
    for m in PATH_RE.finditer(word):
      yield m.group(0)


def check(sources, project):
  """Return (number checked, [(where:line, token, kind)] unresolved)."""
  checked, stale = 0, []

  def record(where, line, token, kind, ok):
    nonlocal checked
    if ok is None:
      return
    checked += 1
    if not ok:
      file, _, what = where.partition("|")
      stale.append((f"{file}:{line}" + (f" ({what})" if what else ""), token, kind))

  for where, text, first_line in sources:
    spans_, prose = split_text(text, first_line)
    for line, span in spans_:
      m = DOTTED_RE.match(span)
      if m and m.group(1).rsplit(".", 1)[-1] not in FILE_EXTS:
        record(where, line, span, "name", project.resolve_name(m.group(1)))
        continue
      for token in path_tokens(span):
        record(where, line, token, "path", project.resolve_path(token))
    for line, text_line in prose:
      for token in path_tokens(text_line):
        record(where, line, token, "path", project.resolve_path(token))
    own = where if "|" not in where else None
    for m in SECTION_RE.finditer(text):
      line = first_line + text.count("\n", 0, m.start("sec"))
      token = " ".join(m.group(0).split())
      record(where, line, token, "section",
             project.resolve_section(m.group("file"), m.group("sec"), own))
  return checked, stale


def test_every_reference_resolves():
  checked, stale = check(doc_sources(), project())
  print(f"checked {checked} references")
  assert checked > 300, f"only {checked} references found: is the scanner still reading the docs?"
  assert not stale, "stale references (point them at what exists now, or drop them):\n" + \
      "\n".join(f"  {loc}: `{token}` ({kind})" for loc, token, kind in stale)


def test_produced_file_names_are_still_spelt_in_the_code():
  missing = PRODUCED_FILES - project().literals
  assert not missing, f"no longer spelt in the code (drop them here and in the docs): {missing}"


def test_the_check_reports_stale_references():
  fake = (
      "See `BUILD_NOTES_store.md` and `jaxdt/io/rundir.py`; call\n"
      "`accounting_report.format_accounting` or `rundir.no_such_function(path)`,\n"
      "`train.train`, `jaxdt.train`, `optim.learning_rate`, `optim.no_such_field`,\n"
      "`jax.lax.scan`, `rundir.py`, `out_dir/summary.json`, `old_summary.json`,\n"
      "`/nowhere/kept_outside.sh`.\n"
      "Prose too: docs/no_such_page.md and tests/conftest.py; docs/definitions.md\n"
      "§Adam accounting, BUILD_NOTES §4, BUILD_NOTES §99, docs/adamw.md §Nowhere.\n"
      "\n"
      "```\n"
      "python benchmarks/no_such_bench.py --out=/tmp/x.json --corpus=c.json\n"
      "`not_a_module.attr` in a fence is code, not a reference\n"
      "```\n")
  checked, stale = check([("fake.md", fake, 1), ("x.py|f docstring", "`loop.no_train`", 7)],
                         project())
  got = {(loc, token) for loc, token, _ in stale}
  assert got == {
      ("fake.md:1", "BUILD_NOTES_store.md"),
      ("fake.md:2", "accounting_report.format_accounting"),
      ("fake.md:2", "rundir.no_such_function(path)"),
      ("fake.md:3", "train.train"),
      ("fake.md:3", "optim.no_such_field"),
      ("fake.md:4", "old_summary.json"),
      ("fake.md:6", "docs/no_such_page.md"),
      ("fake.md:7", "BUILD_NOTES §99"),
      ("fake.md:7", "docs/adamw.md §Nowhere"),
      ("fake.md:10", "benchmarks/no_such_bench.py"),
      ("x.py:7 (f docstring)", "loop.no_train"),
  }, got
  # Resolved: jaxdt/io/rundir.py, jaxdt.train (a lazy export), optim.learning_rate,
  # rundir.py, out_dir/summary.json (a produced name), tests/conftest.py, the two
  # paths and two sections of line 6-7. Not checked: jax's name, a machine's absolute
  # path (it may exist on one host and not another), /tmp, a flag's value.
  assert checked == len(got) + 10, checked
  assert spans("a\n\n`x.y`", first_line=10) == [(12, "x.y")]
