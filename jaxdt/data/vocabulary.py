"""Tokens: file reads, encoding and counting, live/dead masks, token classes.

The numpy side of the data (no JAX): encode a text with a `tokenizers`
tokenizer, count each id, split the vocabulary into live and dead ids
(`live_dead_tokens.safetensors`: `live_mask`, `dead_mask` bool [V];
`live_indices`, `dead_indices` int64 sorted; `token_occurrence_counts` int64
[V]), and the lab's token classes (notebook 1.19b2) for the dead-token table.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jaxdt.io import disk
from jaxdt.io import tensorfile
from jaxdt.io import untrusted



SPECIAL_TOKENS = ("<|endoftext|>",)
THAI_BLOCK = (0x0E00, 0x0E7F)  # the Thai Unicode block
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


def read_json(path: str, fix: str, *, schema=None, required=(), max_bytes: int = 16 << 20,
              missing_ok: bool = False):
  """A JSON object file of the data (a manifest, a cached row group) through
  `jaxdt.io.untrusted`: bounded, strict, held to `schema`; a DataError otherwise."""
  try:
    return untrusted.read_object(path, fix, schema=schema, required=required,
                                 max_bytes=max_bytes, missing_ok=missing_ok)
  except disk.StoreError as e:
    raise DataError(str(e)) from None


def read_bytes(path: str, what: str, flag: str) -> bytes:
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


def decode_text(raw: bytes, path: str, flag: str) -> str:
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
  so splitting after '\n' changes nothing; tokenizers' single `encode` of a
  long string is superlinear in its length, the piecewise parallel encode is not.
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
  """Reads a mask safetensors file with jaxdt's bounded reader (its header checked against
  the file's size and the memory budget before anything is allocated); unreadable or
  non-safetensors is a DataError."""
  if not os.path.exists(path):
    raise DataError(f"mask file {path!r} not found; fix --dead_mask_path to point at an "
                    "existing file")
  if os.path.isdir(path):
    raise DataError(f"mask file {path!r} is a directory; pass the file itself with "
                    "--dead_mask_path")
  try:
    with tensorfile.TrajectoryReader(path) as reader:
      return {k: reader.read(k) for k in reader.keys()}
  except disk.StoreError as e:
    raise DataError(
        f"mask file {path!r} is not a usable safetensors file ({one_line(e)}); pass the lab's "
        "live_dead_tokens.safetensors or omit --dead_mask_path") from None


def one_line(e: BaseException) -> str:
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
  if THAI_BLOCK[0] <= code <= THAI_BLOCK[1]:
    return "thai"
  if c.isascii() and c.isalpha():
    return "english"
  if "0" <= c <= "9":
    return "digit"
  if c.isspace():
    return "space"
  return "punct" if code < 128 else "other"
