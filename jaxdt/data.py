"""Data: the lab's Flannel recipe, built offline, in the lab's file formats.

Three inputs feed every experiment (docs/definitions.md §Steps and files):
  * a `tokenizers` JSON (`flannel_tokenizer_chars.json`),
  * the model corpus as UTF-8 text (`flannel_model_corpus.txt`),
  * the live/dead mask (`live_dead_tokens.safetensors`: `live_mask`,
    `dead_mask` bool [V]; `live_indices`, `dead_indices` int64 sorted;
    `token_occurrence_counts` int64 [V]).

Users may pass the lab's own files unchanged. Without them the embedded default
is built once into a cache folder: a character-level BPE trained on English
(Python's own documentation) plus Thai (pythainlp's Wikipedia titles), and an
English-only model corpus, so the Thai tokens and the rare characters are dead.
The cache has a manifest (SHA-256 of every file, source versions, recipe
version) written last; a cache that does not match it is reported, never used.

Batches are pure functions of (key, step), as in levanter: a keyed Feistel
permutation of the sequence index, reseeded per epoch, so any step's batch can
be recomputed on resume without saved iterator state.

Index vocabulary: `step` t is 1-based (the lab's step 1 is the first update);
step t draws batch index t-1; `epoch` = (t-1) // batches_per_epoch.
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
import sys
import sysconfig
import tempfile
import time
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt.config import DataConfig

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
SPECIAL_TOKENS = ("<|endoftext|>",)
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

_THAI = (0x0E00, 0x0E7F)
_FEISTEL_ROUNDS = 6
_ENCODE_PIECE = 1 << 14  # chars per piece in the parallel encode (see encode_text)


class DataError(ValueError):
  """Bad data input. The message is one line naming the file and the fix."""


# --- File helpers -----------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
  """Hex SHA-256 of `data`."""
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
  """Hex SHA-256 of the file at `path`."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _read_bytes(path: str, what: str, flag: str) -> bytes:
  """Reads a user file, turning OS errors into a one-line DataError."""
  if not os.path.exists(path):
    raise DataError(f"{what} {path!r} not found; fix {flag} to point at an existing file")
  if os.path.isdir(path):
    raise DataError(f"{what} {path!r} is a directory; pass the file itself with {flag}")
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(
        f"{what} {path!r} cannot be read ({e.strerror}); fix its permissions or {flag}") from None


def _decode_text(raw: bytes, path: str, flag: str) -> str:
  """UTF-8 text with universal newlines, as the lab's `open(..., 'r')` read it."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"corpus {path!r} is not UTF-8 (bad byte at offset {e.start}); "
        f"re-encode it as UTF-8 or fix {flag}") from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


# --- Tokenizer, counts and masks (numpy side) -------------------------------


def _fast_encode_ok(tokenizer) -> bool:
  """True when encoding line-aligned pieces equals one encode of the whole text.

  With a Whitespace pre-tokenizer and no normalizer, no token spans a newline,
  so splitting after '\n' changes nothing. tokenizers' single `encode` of a
  5 MB string is superlinear (about 7 s), the piecewise parallel encode ~1 s.
  """
  spec = json.loads(tokenizer.to_str())
  pre = spec.get("pre_tokenizer") or {}
  return spec.get("normalizer") is None and pre.get("type") in ("Whitespace", "WhitespaceSplit")


def _line_pieces(text: str, size: int) -> list[str]:
  """Splits `text` right after a newline roughly every `size` characters."""
  pieces, start = [], 0
  while start < len(text):
    cut = text.find("\n", start + size)
    cut = len(text) if cut < 0 else cut + 1
    pieces.append(text[start:cut])
    start = cut
  return pieces


def encode_text(tokenizer, text: str) -> np.ndarray:
  """Token ids of `text`, as the lab's single `tokenizer.encode(text)`, no EOS.

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
    text: the whole corpus.

  Returns:
    int32 [N] ids. Special tokens are never added (`add_special_tokens=False`),
    so a tokenizer with a post-processor still gives the lab's stream.
  """
  if not _fast_encode_ok(tokenizer):
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
  pieces = _line_pieces(text, _ENCODE_PIECE)
  encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
  return np.fromiter((i for e in encodings for i in e.ids), np.int32)


def count_tokens(tokenizer, text: str) -> np.ndarray:
  """Occurrences of every vocab id in one encode of `text` (no EOS).

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
    text: the whole corpus.

  Returns:
    int64 [V] counts, V = `tokenizer.get_vocab_size()`.
  """
  ids = encode_text(tokenizer, text)
  return np.bincount(ids, minlength=tokenizer.get_vocab_size()).astype(np.int64)


def masks_from_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
  """The lab's five mask arrays from occurrence counts: dead = zero occurrences.

  Args:
    counts: int [V] occurrences per id.

  Returns:
    {'live_mask', 'dead_mask'} bool [V], {'live_indices', 'dead_indices'}
    sorted int64, and 'token_occurrence_counts' int64 [V].
  """
  counts = np.asarray(counts, np.int64)
  live = counts > 0
  return {
      "live_mask": live,
      "dead_mask": ~live,
      "live_indices": np.flatnonzero(live).astype(np.int64),
      "dead_indices": np.flatnonzero(~live).astype(np.int64),
      "token_occurrence_counts": counts,
  }


def write_mask_file(path: str, masks: dict[str, np.ndarray]) -> None:
  """Writes the lab's `live_dead_tokens.safetensors` (no metadata, so bytes are stable)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in masks.items()}, path)


def load_mask_file(path: str) -> dict[str, np.ndarray]:
  """Reads a mask safetensors file; unreadable or non-safetensors is a DataError."""
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  raw = _read_bytes(path, "mask file", "--dead_mask_path")
  try:
    return dict(load(raw))
  except Exception as e:  # safetensors raises its own error types
    raise DataError(
        f"mask file {path!r} is not a safetensors file ({_one_line(e)}); pass the lab's "
        "live_dead_tokens.safetensors or omit --dead_mask_path") from None


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:200]


# --- Token classes (the lab's 1.19b2 demographics) ---------------------------

CATEGORIES = (
    "other", "thai", "english", "whitespace", "punctuation", "numeric", "special", "mixed")


def token_category(token: str) -> str:
  """The lab's token class (notebook 1.19b2), used for the dead-token table.

  Args:
    token: the vocabulary string.

  Returns:
    One of CATEGORIES. Thai is U+0E00-0E7F; English has ASCII letters; digits
    are numeric; ASCII non-alphanumerics are punctuation; anything else (other
    scripts, Latin-1 letters, symbols) is other. Thai or English tokens may
    carry punctuation and whitespace; mixtures of scripts are mixed.
  """
  if token in SPECIAL_TOKENS:
    return "special"
  kinds = {_char_kind(c) for c in token}
  letters = kinds & {"thai", "english", "other"}
  if "thai" in kinds and not kinds & {"english", "digit", "other"}:
    return "thai"
  if "english" in kinds and not kinds & {"thai", "other"}:
    return "english"
  if not letters and "digit" not in kinds:
    return "whitespace" if "space" in kinds else "punctuation"
  if not letters:
    return "numeric"
  return "mixed" if len(letters) > 1 else "other"


def _char_kind(c: str) -> str:
  code = ord(c)
  if _THAI[0] <= code <= _THAI[1]:
    return "thai"
  if c.isascii() and c.isalpha():
    return "english"
  if "0" <= c <= "9":
    return "digit"
  if c.isspace():
    return "space"
  return "punct" if code < 128 else "other"


# --- The embedded default: sources -----------------------------------------


def _package_dir(import_name: str) -> str:
  spec = importlib.util.find_spec(import_name)
  if spec is None or not spec.origin:
    raise DataError(
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
  return any(_THAI[0] <= ord(c) <= _THAI[1] for c in text)


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


def train_tokenizer(text: str):
  """The lab's character-level BPE (notebook 1.19b), trained on `text`.

  Args:
    text: the tokenizer corpus.

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
      vocab_size=VOCAB_SIZE, min_frequency=MIN_FREQUENCY, special_tokens=list(SPECIAL_TOKENS),
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
  counts = count_tokens(tokenizer, model_text)
  masks = masks_from_counts(counts)
  log(f"model corpus: {int(counts.sum()):,} tokens, {int(masks['dead_mask'].sum()):,} dead")

  _write_text(os.path.join(folder, TOKENIZER_CORPUS_FILE), tokenizer_text)
  _write_text(os.path.join(folder, CORPUS_FILE), model_text)
  tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
  write_mask_file(os.path.join(folder, MASK_FILE), masks)
  files = (TOKENIZER_FILE, CORPUS_FILE, MASK_FILE, TOKENIZER_CORPUS_FILE)
  return {
      "recipe": RECIPE_NAME,
      "recipe_version": RECIPE_VERSION,
      "versions": source_versions(),
      "sources_sha256": {
          "english_documents": sha256_bytes(DOC_SEPARATOR.join(english).encode("utf-8")),
          "thai_titles": sha256_bytes(DOC_SEPARATOR.join(thai).encode("utf-8")),
      },
      "files": {name: sha256_file(os.path.join(folder, name)) for name in sorted(files)},
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


def _write_text(path: str, text: str) -> None:
  with open(path, "wb") as f:  # bytes, so no platform newline translation
    f.write(text.encode("utf-8"))


def _manifest_text(manifest: dict) -> str:
  return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def _paths(directory: str, manifest: dict, built: bool,
           seconds: Optional[float] = None) -> DefaultData:
  join = lambda name: os.path.join(directory, name)
  return DefaultData(directory, join(TOKENIZER_FILE), join(CORPUS_FILE), join(MASK_FILE),
                     join(TOKENIZER_CORPUS_FILE), manifest, built, seconds)


def check_cache(directory: str) -> DefaultData:
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
    raise DataError(
        f"cache {directory!r} has no {MANIFEST_FILE} (an unfinished or foreign folder); {fix}")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    recipe, files, versions = manifest["recipe_version"], manifest["files"], manifest["versions"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"cache manifest {path!r} is unreadable ({_one_line(e)}); {fix}") from None
  if recipe != RECIPE_VERSION:
    raise DataError(f"cache manifest {path!r} is recipe version {recipe}, "
                    f"this jaxdt builds {RECIPE_VERSION}; {fix}")
  now = source_versions()
  changed = [f"{k} {versions.get(k)} -> {v}" for k, v in now.items() if versions.get(k) != v]
  if changed:
    raise DataError(
        f"cache manifest {path!r} was built with other sources ({'; '.join(changed)}); {fix}")
  for name, digest in sorted(files.items()):
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      raise DataError(f"cache file {file!r} is missing; {fix}")
    if sha256_file(file) != digest:
      raise DataError(f"cache file {file!r} does not match its SHA-256 in {MANIFEST_FILE}; {fix}")
  missing = {TOKENIZER_FILE, CORPUS_FILE, MASK_FILE} - set(files)
  if missing:
    raise DataError(f"cache manifest {path!r} lists no {sorted(missing)[0]}; {fix}")
  return _paths(directory, manifest, built=False)


def _remove_dead_builds(root: str) -> None:
  """Deletes the temporary folders of builds whose process is gone (killed mid-build).

  A build folder is `.<subdir>.tmp-<pid>-<random>`; one whose pid no longer
  runs can never be finished. Folders without a pid (older jaxdt) go too.
  """
  prefix = f".{CACHE_SUBDIR}.tmp-"
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


def build_default(data_dir: Optional[str] = None, *, verbose: bool = False) -> DefaultData:
  """Builds the embedded default once, or validates and reuses the cache.

  The files are built in a temporary folder inside `data_dir`; the manifest is
  written last and the folder renamed into place, so a crash never leaves a
  folder that looks finished. An existing folder is validated, never rebuilt
  or overwritten.

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
  try:
    os.makedirs(root, exist_ok=True)
    _remove_dead_builds(root)
    tmp = tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.tmp-{os.getpid()}-", dir=root)
  except OSError as e:
    raise DataError(f"cannot create the data cache in {root!r} ({e.strerror}); "
                    "pass a writable --data_dir") from None
  start = time.perf_counter()
  try:
    log(f"building the default data into {directory}")
    manifest = _build_files(tmp, log)
    with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8", newline="\n") as f:
      f.write(_manifest_text(manifest))  # last: the completion marker
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(f"cannot write the data cache in {root!r} ({e.strerror}); "
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
      return check_cache(directory)
    raise DataError(f"cannot move the build into {directory!r} ({e.strerror}); "
                    "pass another --data_dir") from None
  seconds = time.perf_counter() - start
  log(f"built in {seconds:.1f} s")
  return _paths(directory, manifest, built=True, seconds=seconds)


# --- Loading a corpus --------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A tokenized model corpus and its live/dead split."""

  tokens: np.ndarray  # int32 [N], one encode of the whole corpus, no EOS
  vocab_size: int
  dead_mask: np.ndarray  # bool [V]
  live_mask: np.ndarray  # bool [V]
  dead_indices: np.ndarray  # int64 [n_dead], sorted
  live_indices: np.ndarray  # int64 [n_live], sorted
  token_occurrence_counts: np.ndarray  # int64 [V]
  vocab: tuple  # token string per id
  n_chars: int  # characters of the corpus text (for tokens per character)
  files: dict  # input name -> sha256 of the file used
  paths: dict  # input name -> path
  default: Optional[DefaultData] = None  # set when the embedded default was used

  @property
  def n_dead(self) -> int:
    return int(self.dead_mask.sum())

  @property
  def n_live(self) -> int:
    return int(self.live_mask.sum())


def _load_tokenizer(path: str, vocab_size: int):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  raw = _read_bytes(path, "tokenizer", "--tokenizer_path")
  try:
    tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
  except Exception as e:  # tokenizers raises a bare Exception
    raise DataError(
        f"tokenizer {path!r} is not a tokenizers JSON ({_one_line(e)}); "
        "pass the lab's flannel_tokenizer_chars.json") from None
  got = tokenizer.get_vocab_size(with_added_tokens=True)
  if got != vocab_size:
    raise DataError(
        f"tokenizer {path!r} has {got} tokens but the model is configured for {vocab_size}; "
        f"use a {vocab_size}-token tokenizer or set model.vocab_size={got}")
  return tokenizer, sha256_bytes(raw)


def _check_mask(path: str, arrays: dict, counts: np.ndarray, corpus_path: str) -> None:
  """The user's mask must have the lab's layout and the recount's dead set."""
  vocab_size = counts.size
  fix = ("rebuild it from this corpus (omit --dead_mask_path) "
         "or pass the corpus and tokenizer it was made from")
  lab = "pass the lab's live_dead_tokens.safetensors"
  if "dead_mask" not in arrays:
    raise DataError(f"mask file {path!r} has no 'dead_mask' (keys {sorted(arrays)}); {lab}")
  dead = arrays["dead_mask"]
  if dead.dtype != np.bool_ or dead.ndim != 1:
    raise DataError(
        f"mask file {path!r}: dead_mask is {dead.dtype} {list(dead.shape)}, not bool [V]; {lab}")
  if dead.size != vocab_size:
    raise DataError(
        f"mask file {path!r}: dead_mask has length {dead.size} but the vocabulary has "
        f"{vocab_size}; pass the mask made with this tokenizer")
  expected = masks_from_counts(counts)
  wrong = np.flatnonzero(dead != expected["dead_mask"])
  if wrong.size:
    i = int(wrong[0])
    raise DataError(
        f"mask file {path!r} disagrees with the recount of {corpus_path!r} on {wrong.size} ids "
        f"(first: id {i} has {int(counts[i])} occurrences, mask says "
        f"{'dead' if dead[i] else 'live'}); {fix}")
  for key in ("live_mask", "live_indices", "dead_indices", "token_occurrence_counts"):
    if key in arrays and not np.array_equal(arrays[key], expected[key]):
      raise DataError(
          f"mask file {path!r}: {key} disagrees with the recount of {corpus_path!r}; {fix}")


def _load_files(corpus_path: str, tokenizer_path: str, mask_path: Optional[str], vocab_size: int,
                default: Optional[DefaultData] = None) -> Corpus:
  tokenizer, tokenizer_sha = _load_tokenizer(tokenizer_path, vocab_size)
  raw = _read_bytes(corpus_path, "corpus", "--corpus_path")
  text = _decode_text(raw, corpus_path, "--corpus_path")
  tokens = encode_text(tokenizer, text)
  counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
  files = {"corpus": sha256_bytes(raw), "tokenizer": tokenizer_sha}
  paths = {"corpus": corpus_path, "tokenizer": tokenizer_path}
  if mask_path is not None:
    _check_mask(mask_path, load_mask_file(mask_path), counts, corpus_path)
    files["mask"], paths["mask"] = sha256_file(mask_path), mask_path
  masks = masks_from_counts(counts)
  vocab = tuple(tokenizer.id_to_token(i) or "" for i in range(vocab_size))
  return Corpus(tokens, vocab_size, masks["dead_mask"], masks["live_mask"], masks["dead_indices"],
                masks["live_indices"], counts, vocab, len(text), files, paths, default)


def load_corpus(cfg: DataConfig, vocab_size: int, *, verbose: bool = False) -> Corpus:
  """The model corpus for `cfg`: the user's files, or the embedded default.

  Args:
    cfg: data config. `corpus_path` and `tokenizer_path` go together;
      `dead_mask_path` is optional and is checked against a recount.
    vocab_size: the model's vocabulary size; the tokenizer must match it.
    verbose: print build progress when the default is built.

  Returns:
    The tokenized corpus with its masks.

  Raises:
    DataError: missing or unreadable files, non-UTF-8 text, tokenizer vocab !=
      vocab_size, mask length != vocab, a mask that disagrees with the corpus
      counts, a corpus shorter than one batch, or a bad cache. Nothing is
      written in any of these cases.
  """
  if (cfg.corpus_path is None) != (cfg.tokenizer_path is None):
    given = "--corpus_path" if cfg.corpus_path else "--tokenizer_path"
    raise DataError(
        f"{given} was given alone; pass both --corpus_path and --tokenizer_path (a corpus "
        "needs its own tokenizer), or neither for the default")
  _check_scheme(cfg)
  if cfg.corpus_path is None:
    default = build_default(cfg.data_dir, verbose=verbose)
    corpus = _load_files(default.corpus_path, default.tokenizer_path,
                         cfg.dead_mask_path or default.mask_path, vocab_size, default)
  else:
    corpus = _load_files(cfg.corpus_path, cfg.tokenizer_path, cfg.dead_mask_path, vocab_size)
  if batches_per_epoch(corpus.tokens.size, cfg) < 1:
    raise DataError(
        f"corpus {corpus.paths['corpus']!r} has {corpus.tokens.size:,} tokens, fewer than one "
        f"{cfg.scheme} batch of {cfg.batch_size} x {cfg.seq_len}; "
        "use a longer corpus or a smaller batch_size/seq_len")
  return corpus


# --- Batch sampling -----------------------------------------------------------


class Batch(NamedTuple):
  """One training batch. The loss scores logits[:, :L'] against `targets`."""

  inputs: jax.Array  # int32 [B, L]
  targets: jax.Array  # int32 [B, L']


def _check_scheme(cfg: DataConfig) -> None:
  if cfg.scheme not in ("chunks", "windows"):
    raise DataError(f"data scheme {cfg.scheme!r} is unknown; "
                    "use 'chunks' (Crucible, Thimble 8/9) or 'windows' (Thimble 1/6)")
  if cfg.batch_size < 1 or cfg.seq_len < 3:
    raise DataError(f"batch_size={cfg.batch_size}, seq_len={cfg.seq_len} is unusable; "
                    "use batch_size >= 1 and seq_len >= 3")


def num_sequences(n_tokens: int, cfg: DataConfig) -> int:
  """Sequences one epoch shuffles: chunks N // L, windows N - L (the lab's N - 128)."""
  if cfg.scheme == "chunks":
    return n_tokens // cfg.seq_len
  return max(0, n_tokens - cfg.seq_len)


def batches_per_epoch(n_tokens: int, cfg: DataConfig) -> int:
  """Full batches per epoch (drop_last): 10,713 chunks of 128 -> 83 batches of 128."""
  return num_sequences(n_tokens, cfg) // cfg.batch_size


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (xorshift-multiply finalizer); wraps mod 2^32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def feistel_permute(key: jax.Array, index: jax.Array, n: int) -> jax.Array:
  """A keyed bijection of [0, n), evaluated at `index` without a permutation table.

  A balanced Feistel network on 2h bits (2^(2h) >= n) is a bijection of
  [0, 2^(2h)) for any round function; re-applying it to outputs >= n
  ("cycle walking") restricts it to a bijection of [0, n). Expected walks are
  below 4 since 2^(2h) < 4n.

  Args:
    key: a JAX PRNG key; it fixes the permutation.
    index: int array of positions in [0, n).
    n: static domain size (>= 1).

  Returns:
    int32 array shaped like `index`: the permuted positions.
  """
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = jnp.uint32((1 << half) - 1)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)

  def encrypt(x):
    left, right = x >> half, x & mask
    for r in range(_FEISTEL_ROUNDS):
      left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right

  def walk(x):
    return jnp.where(x >= n, encrypt(x), x)

  x = encrypt(jnp.asarray(index).astype(jnp.uint32))
  x = jax.lax.while_loop(lambda x: jnp.any(x >= n), walk, x)
  return x.astype(jnp.int32)


def make_sampler(tokens: np.ndarray, cfg: DataConfig) -> Callable[[jax.Array, jax.Array], Batch]:
  """A pure batch function `sample(key, step) -> Batch` over `tokens`.

  Schemes:
    chunks (Crucible, Thimble 8/9): non-overlapping seq_len chunks, a fresh
      shuffle each epoch, drop_last. inputs = chunk [B, L]; targets =
      chunk[:, 1:] [B, L-1] (the lab's `logits[:, :-1]` vs `input_ids[:, 1:]`).
    windows (Thimble 1/6): every window of seq_len+1 tokens, shuffled.
      inputs = w[:, :-1] [B, L]; targets = w[:, 1:] [B, L], true next-token.
  double_shift_labels: targets start one token later (w[:, 2:], chunk[:, 2:]).
    That is what the lab's GPT2 runs trained on: they passed labels = w[1:] to
    HF GPT2, whose loss shifts labels again, so each position predicted the
    token two ahead (docs/definitions.md §Steps and files). Use it only for faithful replays.

  Step t (1-based) uses batch index t-1 of epoch (t-1) // batches_per_epoch;
  the epoch's order is `feistel_permute(fold_in(key, epoch), ...)`, so no
  permutation is stored and any step can be recomputed on resume.

  Args:
    tokens: int [N] token ids (host array); copied to the device once.
    cfg: data config (scheme, batch_size, seq_len, double_shift_labels).

  Returns:
    `sample(key, step)`, jittable and usable inside `lax.scan`; `step` may be a
    traced int32 scalar.
  """
  _check_scheme(cfg)
  n_seq = num_sequences(len(tokens), cfg)
  per_epoch = batches_per_epoch(len(tokens), cfg)
  if per_epoch < 1:
    raise DataError(f"{len(tokens):,} tokens give fewer than one {cfg.scheme} batch of "
                    f"{cfg.batch_size} x {cfg.seq_len}; use a longer corpus or a smaller batch")
  chunks = cfg.scheme == "chunks"
  span = cfg.seq_len if chunks else cfg.seq_len + 1
  stride = cfg.seq_len if chunks else 1
  first_target = 2 if cfg.double_shift_labels else 1
  data = jnp.asarray(np.asarray(tokens, np.int32))
  offsets = jnp.arange(span, dtype=jnp.int32)
  lanes = jnp.arange(cfg.batch_size, dtype=jnp.int32)

  def sample(key, step):
    index = jnp.asarray(step, jnp.int32) - 1
    epoch, within = index // per_epoch, index % per_epoch
    seq = feistel_permute(jax.random.fold_in(key, epoch), within * cfg.batch_size + lanes, n_seq)
    rows = data[seq[:, None] * stride + offsets[None, :]]  # (B, span)
    inputs = rows if chunks else rows[:, :-1]  # (B, L)
    return Batch(inputs, rows[:, first_target:])  # (B, L')

  return sample


# --- Report ------------------------------------------------------------------


def report(corpus: Corpus, cfg: DataConfig) -> str:
  """The counts the lab's notebooks (1.19b2, 1.19b4) printed, as text.

  Args:
    corpus: a loaded corpus.
    cfg: the data config (for the batch arithmetic).

  Returns:
    A multi-line report.
  """
  v, n = corpus.vocab_size, int(corpus.tokens.size)
  live_counts = corpus.token_occurrence_counts[corpus.live_mask]
  top = np.argsort(-corpus.token_occurrence_counts, kind="stable")[:5]
  lines = []
  if corpus.default is not None:
    d = corpus.default
    how = f"built in {d.seconds:.1f} s" if d.built else "cached, manifest verified"
    lines.append(f"Default data ({RECIPE_NAME} v{RECIPE_VERSION}): {d.directory} ({how})")
  for name in sorted(corpus.paths):
    lines.append(f"  {name:9s} {corpus.paths[name]}  sha256 {corpus.files[name][:16]}")
  lines += [
      f"Vocabulary: {v:,} tokens",
      f"Total tokens: {n:,}",
      f"Unique tokens: {corpus.n_live:,}",
      f"Tokens per character: {n / max(corpus.n_chars, 1):.3f} ({corpus.n_chars:,} characters)",
      f"Live: {corpus.n_live:,} ({100 * corpus.n_live / v:.2f}%)",
      f"Dead: {corpus.n_dead:,} ({100 * corpus.n_dead / v:.2f}%)",
  ]
  if live_counts.size:
    lines.append(
        f"Occurrences per live token: min {live_counts.min():,}, max {live_counts.max():,}, "
        f"mean {live_counts.mean():.1f}, median {np.median(live_counts):g}")
  lines.append("Top tokens: " + ", ".join(
      f"{corpus.vocab[i]!r} {corpus.token_occurrence_counts[i]:,}" for i in top))
  for scheme in ("chunks", "windows"):
    c = dataclasses.replace(cfg, scheme=scheme)
    lines.append(f"Batches ({scheme}, {c.batch_size} x {c.seq_len}): "
                 f"{num_sequences(n, c):,} sequences, {batches_per_epoch(n, c):,} per epoch")
  lines += _category_table("Vocabulary by category", corpus.vocab, np.ones(v, bool), v)
  lines += _category_table("Dead tokens by category", corpus.vocab, corpus.dead_mask, corpus.n_dead)
  return "\n".join(lines)


def _category_table(title: str, vocab: Sequence[str], mask: np.ndarray, total: int) -> list[str]:
  counts = {c: 0 for c in CATEGORIES}
  for i in np.flatnonzero(mask):
    counts[token_category(vocab[i])] += 1
  lines = [f"{title}:"]
  for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], CATEGORIES.index(kv[0]))):
    lines.append(f"  {name.capitalize():12s} {count:6,} ({100 * count / max(total, 1):5.1f}%)")
  return lines
