"""The one reader for JSON that comes from a file: bounded, strict, and shape-checked.

Every JSON document jaxdt reads goes through here: safetensors headers
(`tensorfile`), metadata.json (`metadata`), checkpoint markers
(`checkpoints`), data manifests and caches (`data`), summaries (`report`).
A file is hostile until checked:

  * size: refused above a bound before it is read (and a FIFO or a folder is
    not read at all);
  * nesting: the bracket depth is counted by a linear scan BEFORE `json.loads`
    runs, so deep nesting is refused in one line instead of a RecursionError;
  * numbers: NaN, Infinity and floats that overflow to inf are refused, and so
    are integers beyond 64 bits;
  * shape: `check` holds a document against a schema of dotted paths
    ("config.store.trajectory_name": str, "hosts[].from_step": int,
    "tensor_sha256.*": str), so code after it can index without TypeError.

Every refusal is a `disk.StoreError`: one line naming the file, what is wrong,
and the fix. Values from the file never appear in a message unless shortened
by `show` (a key or value may hold newlines or megabytes).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from jaxdt.io import disk

MAX_BYTES = 16 << 20  # a metadata.json or marker is KBs; anything near this is not ours
MAX_DEPTH = 64  # ours nest 4 deep; json.loads recurses about 1000 deep before failing
INT_LIMIT = 1 << 64  # |int| at or above this is refused (no count or offset is that big)

_SCAN_BLOCK = 1 << 20  # bytes per step of the depth scan (its arrays: ~20x this)
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1

def show(value: Any, limit: int = 60) -> str:
  """A value from a file as a message may quote it: repr (no newlines), shortened."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def nesting_depth(raw: bytes) -> int:
  """The deepest bracket nesting json.loads could reach on UTF-8 `raw`, strings skipped.

  Vectorised and linear, in blocks (memory ~20 x `_SCAN_BLOCK` whatever the
  size). A quote is escaped when an odd run of backslashes precedes it (the
  JSON rule inside strings; outside them json.loads stops at the backslash);
  a bracket counts when an even number of unescaped quotes precedes it. UTF-8
  multi-byte sequences hold no ASCII bytes, so bytes are enough.
  """
  depth = deepest = 0
  run = 0  # backslashes ending the previous block
  inside = 0  # 1: the previous block ended inside a string
  for begin in range(0, len(raw), _SCAN_BLOCK):
    a = np.frombuffer(raw, np.uint8, min(_SCAN_BLOCK, len(raw) - begin), begin)
    quotes = a == _QUOTE
    slashes = a == _BACKSLASH
    if run or slashes.any():
      idx = np.arange(a.size, dtype=np.int32)
      last = np.maximum.accumulate(np.where(slashes, -1 - run, idx))  # last non-backslash
      before = np.empty_like(last)  # backslashes just before byte i (a carried run too)
      before[0], before[1:] = run, idx[:-1] - last[:-1]
      quotes &= (before & 1) == 0
      run = int(a.size - 1 - last[-1])
    else:
      run = 0
    parity = (np.cumsum(quotes, dtype=np.int32) + inside) & 1  # 1: in a string (or its quote)
    step = _OPEN[a]
    step[parity == 1] = 0
    moves = step[step != 0].astype(np.int32)
    if moves.size:
      level = depth + np.cumsum(moves)
      deepest, depth = max(deepest, int(level.max())), int(level[-1])
    inside = int(parity[-1])
  return deepest


class _Refused(ValueError):
  """A number json.loads must not return (raised from its hooks)."""


def _no_constant(name: str) -> Any:
  raise _Refused(f"holds the non-finite number {name}")


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise _Refused(f"holds the number {show(text, 30)}, which overflows a float")
  return value


def _bounded_int(text: str) -> int:
  if len(text) > 21:  # more digits than any 64-bit int (sign included)
    raise _Refused(f"holds an integer of {len(text)} digits")
  value = int(text)
  if abs(value) >= INT_LIMIT:
    raise _Refused(f"holds the integer {value}, beyond 64 bits")
  return value


def loads(raw: bytes | str, where: str, fix: str, *, max_bytes: int = MAX_BYTES,
          max_depth: int = MAX_DEPTH) -> Any:
  """Parses untrusted JSON text.

  Args:
    raw: the document (UTF-8 bytes or str).
    where: what the messages name, e.g. the file's path.
    fix: what the messages advise, e.g. "re-create the file".
    max_bytes: refuse a longer document.
    max_depth: refuse deeper nesting (checked before parsing).

  Raises:
    StoreError: too long, not UTF-8, too deep, not JSON, or a non-finite or
      oversized number (one line).
  """
  if len(raw) > max_bytes:
    raise disk.StoreError(f"{where} holds {len(raw):,} bytes of JSON, more than the "
                          f"{max_bytes:,} it may have; {fix}")
  raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise disk.StoreError(f"{where} is not UTF-8 text; {fix}") from None
  opening = raw.count(b"[") + raw.count(b"{")  # the depth cannot exceed it: no scan needed
  depth = nesting_depth(raw) if opening > max_depth else opening
  if depth > max_depth:
    raise disk.StoreError(f"{where} nests JSON {depth} deep, more than the {max_depth} "
                          f"jaxdt reads; {fix}")
  try:
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                      parse_int=_bounded_int)
  except _Refused as e:
    raise disk.StoreError(f"{where} {e}; {fix}") from None
  except (ValueError, RecursionError) as e:
    reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    raise disk.StoreError(f"{where} is not valid JSON ({reason}); {fix}") from None


def read_bytes(path: str, fix: str, *, max_bytes: int = MAX_BYTES,
               missing_ok: bool = False) -> Optional[bytes]:
  """A whole regular file of at most `max_bytes` (None if missing and `missing_ok`).

  Never blocks on a FIFO and never reads a device or a folder.

  Raises:
    StoreError: missing (unless `missing_ok`), not a regular file, unreadable,
      or larger than `max_bytes`.
  """
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except FileNotFoundError:
    if missing_ok:
      return None
    raise disk.StoreError(f"{path} not found; {fix}") from None
  except OSError as e:
    raise disk.StoreError(f"{path} cannot be read ({e.strerror}); {fix}") from None
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise disk.StoreError(f"{path} is not a regular file; {fix}")
    if st.st_size > max_bytes:
      raise disk.StoreError(f"{path} is {st.st_size:,} bytes, more than the {max_bytes:,} "
                            f"such a file may have; {fix}")
    chunks, total = [], 0
    while total <= max_bytes:
      block = os.read(fd, max_bytes + 1 - total)
      if not block:
        break
      chunks.append(block)
      total += len(block)
  except OSError as e:
    raise disk.StoreError(f"{path} cannot be read ({e.strerror}); {fix}") from None
  finally:
    os.close(fd)
  data = b"".join(chunks)
  if len(data) > max_bytes:
    raise disk.StoreError(f"{path} grew past {max_bytes:,} bytes while being read; {fix}")
  return data


def read_object(path: str, fix: str, *, schema: Optional[Mapping[str, Any]] = None,
                required: Sequence[str] = (), max_bytes: int = MAX_BYTES,
                missing_ok: bool = False) -> Optional[dict]:
  """A JSON object file, checked against `schema` (None if missing and `missing_ok`).

  Raises:
    StoreError: see `read_bytes`, `loads` and `check`.
  """
  raw = read_bytes(path, fix, max_bytes=max_bytes, missing_ok=missing_ok)
  if raw is None:
    return None
  out = loads(raw, path, fix, max_bytes=max_bytes)
  if not isinstance(out, dict):
    raise disk.StoreError(f"{path} holds {kind_of(out)}, not a JSON object; {fix}")
  check(out, schema or {}, path, fix, required)
  return out


# --- Shapes ------------------------------------------------------------------------

_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", bool: "true or false", type(None): "null"}


def kind_of(value: Any) -> str:
  """"an object", "a list", "a string", ... (the JSON kind of a parsed value)."""
  if isinstance(value, bool):
    return _KIND_NAMES[bool]
  return _KIND_NAMES.get(type(value), type(value).__name__)


def is_kind(value: Any, kind: type) -> bool:
  """JSON kinds: int excludes true/false; float is any number (int or float)."""
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, kind)


def expect(value: Any, kind: type, what: str, where: str, fix: str) -> Any:
  """`value` when it is of JSON `kind`, else a one-line StoreError naming `what`."""
  if not is_kind(value, kind):
    raise disk.StoreError(f"{where}: {what} is {kind_of(value)}, expected "
                          f"{_KIND_NAMES[kind]}; {fix}")
  return value


def expect_int(value: Any, what: str, where: str, fix: str, lo: int = 0,
               hi: int = INT_LIMIT - 1) -> int:
  """An integer in [lo, hi], else a one-line StoreError naming `what`."""
  expect(value, int, what, where, fix)
  if not lo <= value <= hi:
    raise disk.StoreError(f"{where}: {what} is {show(value)}, outside [{lo}, {hi:,}]; {fix}")
  return value


_PARTS = re.compile(r"\[\]|[^.\[\]]+")


def _found(obj: Any, parts: Sequence[str], shown: str) -> Iterator[tuple[Any, str]]:
  if not parts:
    yield obj, shown
    return
  head, rest = parts[0], parts[1:]
  if head == "[]":
    if isinstance(obj, list):
      for i, v in enumerate(obj):
        yield from _found(v, rest, f"{shown}[{i}]")
  elif head == "*":
    if isinstance(obj, dict):
      for k, v in obj.items():
        yield from _found(v, rest, f"{shown}[{show(k, 40)}]")
  elif isinstance(obj, dict) and head in obj:
    yield from _found(obj[head], rest, f"{shown}.{head}" if shown else head)


def check(obj: Any, schema: Mapping[str, Any], where: str, fix: str,
          required: Sequence[str] = ()) -> None:
  """Holds a parsed document against a schema of dotted paths.

  Args:
    obj: the parsed document.
    schema: path -> JSON kind (dict, list, str, int, float = any number, bool)
      or a tuple of kinds. Paths: "a.b" (a key), "a.*" (every value of an
      object), "a[]" (every item of a list). A key that is absent or null
      passes (readers treat both as "not recorded"); an item never is null.
    where: what the messages name (the file).
    fix: what they advise.
    required: top-level keys that must be present and not null.

  Raises:
    StoreError: the first value of another kind (one line: its path, what it
      is, what belongs there).
  """
  for key in required:
    if not isinstance(obj, dict) or obj.get(key) is None:
      raise disk.StoreError(f"{where} has no {key!r}; {fix}")
  for path, kinds in schema.items():
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    parts = _PARTS.findall(path)
    nullable = parts[-1] not in ("[]", "*")  # an item of a list or object is never null
    for value, shown in _found(obj, parts, ""):
      if (value is not None or not nullable) and not any(is_kind(value, k) for k in kinds):
        want = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise disk.StoreError(f"{where}: {shown} is {kind_of(value)} where {want} belongs; "
                              f"{fix}")
