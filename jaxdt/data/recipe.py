"""The embedded default data: the lab's Flannel recipe, built offline.

Without the lab's files the default is built once into a cache folder: a
character-level BPE trained on English (Python's own documentation) plus Thai
(pythainlp's Wikipedia titles), and an English-only model corpus, so the Thai
tokens and the rare characters are dead. The cache has a manifest (SHA-256 of
every file, source versions, recipe version) written last; a cache that does
not match it is reported, never used.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sysconfig
import tempfile
import time
import warnings
from typing import Callable, Optional, Sequence

from jaxdt.data import vocabulary


# --- The recipe -------------------------------------------------------------

# Bump when anything below changes the built bytes; the cache folder and the
# manifest carry it, so an old cache is never mistaken for a new one.
RECIPE_VERSION = 1
RECIPE_NAME = "flannel-default"
CACHE_SUBDIR = f"flannel-v{RECIPE_VERSION}"

TOKENIZER_FILE = "flannel_tokenizer_chars.json"
CORPUS_FILE = "flannel_model_corpus.txt"
MASK_FILE = "live_dead_tokens.safetensors"
TOKENIZER_CORPUS_FILE = "flannel_tokenizer_corpus.txt"
MANIFEST_FILE = "manifest.json"

VOCAB_SIZE = 10000
MIN_FREQUENCY = 2
DOC_SEPARATOR = "\n\n"  # the lab joined documents with a blank line
# The lab trained on 80 MB English + 20 MB Thai (by bytes) and got 3,699 dead,
# 2,384 of them rare characters from 80 MB of web text. Our 6.6 MB of English
# has only ~170 distinct non-Thai characters, so Thai must carry the dead set:
# a third of the bytes gives the lab's scale (3,708 dead; 20% gives 2,814).
THAI_BYTE_SHARE = 0.33
MODEL_TOKENS = 1_371_328  # the lab's model-corpus token count (docs/definitions.md §Steps and files)

# Packages whose docstrings are English sources (import name, distribution).
# All are pinned dependencies. pythainlp is left out (its docstrings hold Thai),
# and so is jaxlib (platform-specific wheels).
ENGLISH_PACKAGES = (
    ("absl", "absl-py"),
    ("flax", "flax"),
    ("jax", "jax"),
    ("ml_dtypes", "ml_dtypes"),
    ("numpy", "numpy"),
    ("optax", "optax"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
)
THAI_PACKAGE = ("pythainlp", "pythainlp")
THAI_TITLES = ("corpus", "wikipedia_titles_th.txt")  # inside the pythainlp package

# Standard-library parts that distributions split off or patch (Debian ships
# tkinter, lib2to3, distutils, ensurepip separately), plus tests and the
# build-generated files: leaving them out keeps the source set the same on any
# install of the same Python version.
_SKIP_DIRS = frozenset({
    "__pycache__", "__phello__", "dist-packages", "distutils", "ensurepip",
    "idlelib", "lib2to3", "site-packages", "test", "tests", "tkinter",
    "turtledemo",
})
_SKIP_FILES = frozenset({"__config__.py", "turtle.py", "this.py"})

# --- The embedded default: sources -----------------------------------------


def _package_dir(import_name: str) -> str:
  spec = importlib.util.find_spec(import_name)
  if spec is None or not spec.origin:
    raise vocabulary.DataError(
        f"package {import_name!r} (a source of the default corpus) is not installed; "
        "run `pip install -e .` in the jaxdt checkout")
  return os.path.dirname(spec.origin)


def _python_files(root: str) -> list[str]:
  """Sorted .py files under `root`, skipping split-off/generated parts."""
  out = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
    out.extend(
        os.path.join(folder, f) for f in sorted(files)
        if f.endswith(".py") and f not in _SKIP_FILES and not f.startswith("_sysconfigdata"))
  return out


def _docstrings(path: str) -> list[str]:
  """Docstrings of a source file, parsed with `ast` (never imported)."""
  with open(path, "rb") as f:
    source = f.read()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # invalid escapes in old sources warn
    try:
      tree = ast.parse(source)
    except (SyntaxError, ValueError):
      return []
  out, stack = [], [tree]
  while stack:  # definitions only: expressions hold no docstrings
    node = stack.pop()
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc and doc.strip():
        out.append(doc)
    for child in reversed(list(ast.iter_child_nodes(node))):
      if isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
        stack.append(child)
  return out


def _has_thai(text: str) -> bool:
  return any(vocabulary.THAI_BLOCK[0] <= ord(c) <= vocabulary.THAI_BLOCK[1] for c in text)


def english_documents() -> list[str]:
  """The English sources: Python's own documentation, as documents.

  pydoc_data topics (the language reference), then docstrings of the standard
  library and of the pinned dependencies, parsed from source. Duplicates and
  anything holding Thai are dropped. The order is by SHA-256 of the text: a
  fixed shuffle that mixes the sources, like the lab's web stream.

  Returns:
    The documents, stripped of surrounding whitespace.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  docs = [topics.topics[k] for k in sorted(topics.topics)]
  roots = [sysconfig.get_paths()["stdlib"]] + [_package_dir(name) for name, _ in ENGLISH_PACKAGES]
  for root in roots:
    for path in _python_files(root):
      docs.extend(_docstrings(path))
  unique = {d.strip() for d in docs if d.strip() and not _has_thai(d)}
  return sorted(unique, key=lambda d: hashlib.sha256(d.encode("utf-8")).digest())


def thai_documents(n_bytes: int) -> list[str]:
  """Thai Wikipedia titles from the pythainlp wheel, read as a data file.

  Args:
    n_bytes: stop once the titles (with separators) reach this many UTF-8 bytes.

  Returns:
    Titles in file order; comment and blank lines skipped.
  """
  path = os.path.join(_package_dir(THAI_PACKAGE[0]), *THAI_TITLES)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  out, total = [], 0
  for line in lines:
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if total >= n_bytes:
      break
    out.append(line)
    total += len(line.encode("utf-8")) + len(DOC_SEPARATOR)
  return out


def source_versions() -> dict[str, str]:
  """Versions of everything whose bytes shape the default build."""
  versions = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
  for _, dist in ENGLISH_PACKAGES + (THAI_PACKAGE,):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = "not installed"
  return dict(sorted(versions.items()))


# --- The embedded default: build --------------------------------------------


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE):
  """The lab's character-level BPE (notebook 1.19b), trained on `text`.

  Args:
    text: the tokenizer corpus.
    vocab_size: the lab's 10,000 (tests use fewer).

  Returns:
    A `tokenizers.Tokenizer`: `models.BPE()`, `Whitespace` pre-tokenizer, no
    normalizer or decoder, `BpeTrainer(vocab_size=10000, min_frequency=2,
    special_tokens=['<|endoftext|>'], initial_alphabet=` every character of
    `text``)`. Ids: 0 = special, then the alphabet by code point, then merges.
  """
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, special_tokens=list(vocabulary.SPECIAL_TOKENS),
      initial_alphabet=sorted(set(text)), show_progress=False)
  tokenizer.train_from_iterator([text], trainer=trainer)
  return tokenizer


def select_model_documents(tokenizer, docs: Sequence[str], target: int = MODEL_TOKENS) -> list[str]:
  """The shortest prefix of `docs` holding at least `target` tokens.

  The lab stopped its stream at 5.0 MB; we stop at its token count instead,
  so batches per epoch match the lab's (83 of 128 x 128). With the Whitespace
  pre-tokenizer and blank-line joins, tokens add up exactly across documents.
  """
  encodings = tokenizer.encode_batch_fast(list(docs), add_special_tokens=False)
  total = 0
  for i, e in enumerate(encodings):
    total += len(e.ids)
    if total >= target:
      return list(docs[:i + 1])
  return list(docs)


@dataclasses.dataclass(frozen=True)
class DefaultData:
  """Paths of a finished default build (a folder with a matching manifest)."""

  directory: str
  tokenizer_path: str
  corpus_path: str
  mask_path: str
  tokenizer_corpus_path: str
  manifest: dict
  built: bool  # True if this call built it, False if it reused a cache
  seconds: Optional[float] = None  # build time, when built


def default_cache_root() -> str:
  """Per-user cache: $XDG_CACHE_HOME/jaxdt, else ~/.cache/jaxdt."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxdt")


def _build_files(folder: str, log: Callable[[str], None]) -> dict:
  """Builds the default's files into `folder`; returns the manifest (not written)."""
  english = english_documents()
  english_bytes = len(DOC_SEPARATOR.join(english).encode("utf-8"))
  thai = thai_documents(int(english_bytes * THAI_BYTE_SHARE / (1 - THAI_BYTE_SHARE)))
  log(f"sources: {len(english):,} English documents ({english_bytes:,} bytes), "
      f"{len(thai):,} Thai titles")
  tokenizer_text = DOC_SEPARATOR.join(english + thai)  # English first, as the lab
  tokenizer = train_tokenizer(tokenizer_text)
  log(f"tokenizer: {tokenizer.get_vocab_size():,} tokens "
      f"from {len(set(tokenizer_text)):,} characters")
  model_text = DOC_SEPARATOR.join(select_model_documents(tokenizer, english))
  counts = vocabulary.count_tokens(tokenizer, model_text)
  masks = vocabulary.masks_from_counts(counts)
  log(f"model corpus: {int(counts.sum()):,} tokens, {int(masks['dead_mask'].sum()):,} dead")

  write_text(os.path.join(folder, TOKENIZER_CORPUS_FILE), tokenizer_text)
  write_text(os.path.join(folder, CORPUS_FILE), model_text)
  tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
  vocabulary.write_mask_file(os.path.join(folder, MASK_FILE), masks)
  files = (TOKENIZER_FILE, CORPUS_FILE, MASK_FILE, TOKENIZER_CORPUS_FILE)
  return {
      "recipe": RECIPE_NAME,
      "recipe_version": RECIPE_VERSION,
      "versions": source_versions(),
      "sources_sha256": {
          "english_documents": vocabulary.sha256_bytes(DOC_SEPARATOR.join(english).encode("utf-8")),
          "thai_titles": vocabulary.sha256_bytes(DOC_SEPARATOR.join(thai).encode("utf-8")),
      },
      "files": {name: vocabulary.sha256_file(os.path.join(folder, name)) for name in sorted(files)},
      "counts": {
          "vocab_size": int(counts.size),
          "total_tokens": int(counts.sum()),
          "live": int(masks["live_mask"].sum()),
          "dead": int(masks["dead_mask"].sum()),
      },
  }


def _relax_modes(folder: str) -> None:
  """Gives the build the umask's modes: mkdtemp (0700) and safetensors (0600) are private."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(folder, 0o777 & ~umask)
  for name in os.listdir(folder):
    os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def write_text(path: str, text: str) -> None:
  with open(path, "wb") as f:  # bytes, so no platform newline translation
    f.write(text.encode("utf-8"))


def _manifest_text(manifest: dict) -> str:
  return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def _paths(directory: str, manifest: dict, built: bool,
           seconds: Optional[float] = None) -> DefaultData:
  join = lambda name: os.path.join(directory, name)
  return DefaultData(directory, join(TOKENIZER_FILE), join(CORPUS_FILE), join(MASK_FILE),
                     join(TOKENIZER_CORPUS_FILE), manifest, built, seconds)


def check_cache(directory: str, recipe_version: int = RECIPE_VERSION) -> DefaultData:
  """Validates a finished default build against its manifest.

  Args:
    directory: the recipe folder (e.g. ~/.cache/jaxdt/flannel-v1).

  Returns:
    Its paths.

  Raises:
    DataError: no or unreadable manifest, another recipe or source versions,
      a missing file, or a file whose SHA-256 differs from the manifest.
  """
  fix = f"delete {directory!r} to rebuild it, or choose another --data_dir"
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise vocabulary.DataError(
        f"cache {directory!r} has no {MANIFEST_FILE} (an unfinished or foreign folder); {fix}")
  manifest = vocabulary.read_json(path, fix, required=("recipe_version", "files", "versions"),
                                  schema={"recipe_version": int, "files": dict, "files.*": str,
                                          "versions": dict})
  recipe, files, versions = manifest["recipe_version"], manifest["files"], manifest["versions"]
  if recipe != recipe_version:
    raise vocabulary.DataError(f"cache manifest {path!r} is recipe version {recipe}, "
                    f"this jaxdt builds {recipe_version}; {fix}")
  now = source_versions()
  changed = [f"{k} {versions.get(k)} -> {v}" for k, v in now.items() if versions.get(k) != v]
  if changed:
    raise vocabulary.DataError(
        f"cache manifest {path!r} was built with other sources ({'; '.join(changed)}); {fix}")
  for name, digest in sorted(files.items()):
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      raise vocabulary.DataError(f"cache file {file!r} is missing; {fix}")
    if vocabulary.sha256_file(file) != digest:
      raise vocabulary.DataError(f"cache file {file!r} does not match its SHA-256 in {MANIFEST_FILE}; {fix}")
  missing = {TOKENIZER_FILE, CORPUS_FILE, MASK_FILE} - set(files)
  if missing:
    raise vocabulary.DataError(f"cache manifest {path!r} lists no {sorted(missing)[0]}; {fix}")
  return _paths(directory, manifest, built=False)


def _remove_dead_builds(root: str, subdir: str = CACHE_SUBDIR) -> None:
  """Deletes the temporary folders of builds whose process is gone (killed mid-build).

  A build folder is `.<subdir>.tmp-<pid>-<random>`; one whose pid no longer
  runs can never be finished. Folders without a pid (older jaxdt) go too.
  """
  prefix = f".{subdir}.tmp-"
  for entry in os.listdir(root):
    if not entry.startswith(prefix):
      continue
    pid = entry[len(prefix):].split("-", 1)[0]
    if pid.isdigit() and int(pid) != os.getpid():
      try:
        os.kill(int(pid), 0)
        continue  # still building
      except ProcessLookupError:
        pass
      except PermissionError:
        continue  # alive, someone else's
    elif pid.isdigit():
      continue  # this process's own
    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def atomic_build(root: str, subdir: str, build_files: Callable[[str], dict],
                 log: Callable[[str], None]) -> DefaultData:
  """Runs `build_files(tmp)` in a temporary folder inside `root`, writes its manifest last
  and renames the folder to `root/subdir`, so a crash never leaves a folder that looks
  finished (a killed build's folder is removed by the next one).

  Raises:
    DataError: root is unusable, or the disk is full (nothing half-written stays).
  """
  directory = os.path.join(root, subdir)
  try:
    os.makedirs(root, exist_ok=True)
    _remove_dead_builds(root, subdir)
    tmp = tempfile.mkdtemp(prefix=f".{subdir}.tmp-{os.getpid()}-", dir=root)
  except OSError as e:
    raise vocabulary.DataError(f"cannot create the data cache in {root!r} ({e.strerror}); "
                    "pass a writable --data_dir") from None
  start = time.perf_counter()
  try:
    log(f"building into {directory}")
    manifest = build_files(tmp)
    with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8", newline="\n") as f:
      f.write(_manifest_text(manifest))  # last: the completion marker
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise vocabulary.DataError(f"cannot write the data cache in {root!r} ({e.strerror}); "
                    "free space or pass another --data_dir") from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  try:
    _relax_modes(tmp)
    os.rename(tmp, directory)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(directory):  # another process finished first: use (and check) its build
      return check_cache(directory, manifest["recipe_version"])
    raise vocabulary.DataError(f"cannot move the build into {directory!r} ({e.strerror}); "
                    "pass another --data_dir") from None
  seconds = time.perf_counter() - start
  log(f"built in {seconds:.1f} s")
  return _paths(directory, manifest, built=True, seconds=seconds)


def build_default(data_dir: Optional[str] = None, *, verbose: bool = False) -> DefaultData:
  """Builds the embedded default once, or validates and reuses the cache.

  The files are built in a temporary folder inside `data_dir`; the manifest is
  written last and the folder renamed into place (`atomic_build`). An existing
  folder is validated, never rebuilt or overwritten.

  Args:
    data_dir: cache root; the build goes to `<data_dir>/flannel-v<RECIPE>`.
      None = `default_cache_root()`.
    verbose: print progress.

  Returns:
    The paths of the build.

  Raises:
    DataError: the cache does not match its manifest, or data_dir is unusable.
  """
  log = (lambda msg: print(f"[flannel] {msg}", flush=True)) if verbose else (lambda msg: None)
  root = os.path.abspath(os.path.expanduser(data_dir or default_cache_root()))
  directory = os.path.join(root, CACHE_SUBDIR)
  if os.path.exists(directory):
    return check_cache(directory)
  return atomic_build(root, CACHE_SUBDIR, lambda tmp: _build_files(tmp, log), log)
