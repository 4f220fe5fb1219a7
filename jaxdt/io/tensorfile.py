"""Streaming safetensors trajectories: the format, and the reader (the writer: `tensorwriter`).

A run's records go into ONE safetensors file with the lab's key names, so the
lab's `safetensors.torch.load_file` opens it unchanged. Unlike the lab (which
preallocated the whole history in RAM and called `save_file` at the end), the
file is written in place: the complete header first, then each chunk of rows
at its byte offset. Peak RAM is one chunk, whatever the number of steps.

Completion markers come last:
  trajectory   `<name>.partial` until `finalize()` renames it to `<name>`, and
               `metadata.json` says `"completed": true` only after that.
  checkpoint   `step_NNNNNN/arrays.safetensors`, then `meta.json` last.
Readers (`is_complete`, `latest_checkpoint`) skip anything without its marker.

Checksums: the writer hashes each tensor as its rows arrive in order (SHA-256,
`prefix_digests()` snapshots them for a checkpoint's marker); `seal()` reads
the whole file back once and returns the file's and every tensor's SHA-256,
refusing when the disk holds other bytes than were written. A reader given
those digests verifies each tensor in the pass it already makes over the rows
(`TrajectoryReader(path, digests=...)`, then `verify()`). A checkpoint's
marker carries the SHA-256 of its arrays file, checked on load.

safetensors layout (little-endian throughout):
  u64 N | N bytes of JSON header, space-padded to a multiple of 8 | data
  header = {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}
  data_offsets are [begin, end) relative to the data region, contiguous from 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import struct
from typing import Any, Mapping, NamedTuple, Optional

import ml_dtypes
import numpy as np

from jaxdt.io import disk
from jaxdt.io import untrusted


PARTIAL_SUFFIX = ".partial"  # a trajectory being written; renamed once sealed
# safetensors refuses headers above 100 MB; so do we, before allocating one.
MAX_HEADER_BYTES = 100_000_000

BF16 = np.dtype(ml_dtypes.bfloat16)
# safetensors dtype codes. U16 carries bf16 bits in trajectories (the lab's way);
# BF16 is used for checkpoint leaves so they restore with their own dtype.
_CODE_TO_DTYPE = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "BF16": BF16,
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}
_DTYPE_TO_CODE = {d: c for c, d in _CODE_TO_DTYPE.items()}

HEADER_DIGEST = "__header__"  # the header's key among a file's tensor digests

class Spec(NamedTuple):
  code: str  # safetensors dtype code
  dtype: np.dtype
  shape: tuple
  begin: int  # [begin, end) within the data region
  end: int


# --- safetensors layout -----------------------------------------------------


def dtype_code(dtype: Any, name: str) -> str:
  try:
    dtype = np.dtype(dtype)
  except TypeError:
    raise disk.StoreError(f"tensor {name!r} has dtype {dtype!r}, which is not a numpy dtype; "
                     "pass e.g. np.uint16") from None
  if dtype == np.float16:
    raise disk.StoreError(f"tensor {name!r} is float16: store bf16 as uint16 bits (or BF16) and "
                     "never as float16, which loses bf16's range; pass np.uint16")
  code = _DTYPE_TO_CODE.get(dtype)
  if code is None:
    raise disk.StoreError(f"tensor {name!r} has unsupported dtype {dtype}; use one of "
                     "uint16 (bf16 bits), float32, int32, int64, bool")
  return code


def _shape(shape: Any, name: str) -> tuple:
  try:
    shape = tuple(operator.index(n) for n in shape)
  except TypeError:
    raise disk.StoreError(f"tensor {name!r} has shape {shape!r}; pass a tuple of ints") from None
  if any(n < 0 for n in shape):
    raise disk.StoreError(f"tensor {name!r} has negative shape {shape}; sizes must be >= 0")
  return shape


def file_layout(specs: Mapping[str, tuple]) -> dict[str, Spec]:
  """Validates `specs` and assigns contiguous data offsets.

  Tensors are laid out by decreasing item size (stable in `specs` order), so
  with the 8-aligned header every tensor starts at a multiple of its item size
  and memory maps / torch views of it are aligned. The header lists them in
  `specs` order; readers go by the offsets.
  """
  if not isinstance(specs, Mapping) or not specs:
    raise disk.StoreError("specs must be a non-empty dict name -> (dtype, shape)")
  parsed = {}
  for name, spec in specs.items():
    if not isinstance(name, str) or not name or name == "__metadata__":
      raise disk.StoreError(f"tensor name {name!r} is not usable; use a non-empty str other "
                       "than '__metadata__'")
    try:
      dtype, shape = spec
    except (TypeError, ValueError):
      raise disk.StoreError(f"spec for {name!r} is {spec!r}; pass (dtype, shape)") from None
    code = dtype_code(dtype, name)
    parsed[name] = (code, _CODE_TO_DTYPE[code], _shape(shape, name))
  order = sorted(parsed, key=lambda n: -parsed[n][1].itemsize)  # stable sort
  out, offset = {}, 0
  for name in order:
    code, dtype, shape = parsed[name]
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    out[name] = Spec(code, dtype, shape, offset, offset + size)
    offset += size
  return {name: out[name] for name in parsed}


def check_metadata(metadata: Optional[Mapping[str, str]]) -> Optional[dict]:
  if metadata is None:
    return None
  bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
  if bad:
    raise disk.StoreError(f"safetensors metadata must map str to str; {bad[0]!r} does not "
                     "(json.dumps non-str values first)")
  return dict(metadata)


def header_bytes(layout: Mapping[str, Spec], metadata: Optional[dict]) -> bytes:
  """u64 length + JSON header, space-padded so the data region is 8-aligned."""
  header = {} if metadata is None else {"__metadata__": metadata}
  for name, s in layout.items():
    header[name] = {"dtype": s.code, "shape": list(s.shape), "data_offsets": [s.begin, s.end]}
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  if len(text) > MAX_HEADER_BYTES:
    raise disk.StoreError(f"safetensors header would be {len(text):,} bytes (limit "
                     f"{MAX_HEADER_BYTES:,}); store fewer tensors or less metadata")
  return struct.pack("<Q", len(text)) + text


def estimate_bytes(specs: Mapping[str, tuple], metadata: Optional[Mapping[str, str]] = None) -> int:
  """The exact size of the file `TrajectoryWriter(path, specs, metadata)` writes.

  Args:
    specs: ordered dict name -> (numpy dtype, shape tuple).
    metadata: the safetensors `__metadata__` (str -> str), or None.

  Returns:
    Header (with its 8-byte length) plus data, in bytes.
  """
  layout = file_layout(specs)
  data = max((s.end for s in layout.values()), default=0)
  return len(header_bytes(layout, check_metadata(metadata))) + data


MAX_DIMS = 32  # numpy's limit is 64; no trajectory or checkpoint has more than 4
_CODE_CHARS = 8  # the longest dtype code safetensors defines is 7 ("F8_E4M3")
# Parsing a JSON header takes several times its length in Python objects.
HEADER_PARSE_FACTOR = 16


def read_header(fd: int, path: str, budget: Optional[int] = None) -> tuple[dict, int]:
  """(header dict, data region start): the length checked against the file and the memory
  budget before the header is read, the JSON through `untrusted.loads`."""
  size = os.fstat(fd).st_size
  head = os.pread(fd, 8, 0)
  if len(head) < 8:
    raise disk.StoreError(f"{path} is not a safetensors file ({size} bytes, no header); "
                     "re-create it (an interrupted write?)")
  (n,) = struct.unpack("<Q", head)
  if n > MAX_HEADER_BYTES or 8 + n > size:
    raise disk.StoreError(f"{path} has a corrupt safetensors header length {n:,} for a "
                     f"{size:,}-byte file; re-create the file")
  budget = disk.memory_budget() if budget is None else budget
  if n * HEADER_PARSE_FACTOR > budget:
    raise disk.over_budget(path, f"parsing its {n:,}-byte safetensors header",
                           n * HEADER_PARSE_FACTOR, budget, "re-create the file")
  raw = os.pread(fd, n, 8)
  header = untrusted.loads(raw, f"{path}'s safetensors header", "re-create the file",
                           max_bytes=MAX_HEADER_BYTES)
  if not isinstance(header, dict):
    raise disk.StoreError(f"{path}'s safetensors header is {untrusted.kind_of(header)}, not a "
                          "JSON object; re-create the file")
  return header, 8 + n


def _entry_spec(name: str, e: Any, path: str) -> Spec:
  """One header entry, its kinds and ranges checked (Python ints: no overflow)."""
  fix = "re-create the file"
  where = f"{path}: tensor {untrusted.show(name)}"
  untrusted.expect(e, dict, "its entry", where, fix)
  code = untrusted.expect(e.get("dtype"), str, "its dtype", where, fix)
  shape = untrusted.expect(e.get("shape"), list, "its shape", where, fix)
  offsets = untrusted.expect(e.get("data_offsets"), list, "its data_offsets", where, fix)
  if len(code) > _CODE_CHARS or len(shape) > MAX_DIMS or len(offsets) != 2:
    raise disk.StoreError(f"{where} has dtype {untrusted.show(code, 20)}, {len(shape)} "
                          f"dimensions and {len(offsets)} data_offsets (a safetensors dtype, "
                          f"at most {MAX_DIMS} and [begin, end] are read); {fix}")
  for i, d in enumerate(shape):
    untrusted.expect_int(d, f"its shape[{i}]", where, fix)
  begin, end = (untrusted.expect_int(x, "its data_offsets", where, fix) for x in offsets)
  return Spec(code, _CODE_TO_DTYPE.get(code), tuple(shape), begin, end)


def _check_declared(name: str, s: Spec, path: str, budget: int) -> None:
  """Refuses a tensor whose bytes differ from its shape, or whose declared extent (zero
  dimensions counted as one) passes the memory budget while it holds no bytes."""
  itemsize = s.dtype.itemsize if s.dtype is not None else 1
  count = math.prod(s.shape)
  where = f"tensor {untrusted.show(name)}"
  if s.dtype is not None and s.end - s.begin != count * itemsize:
    raise disk.StoreError(f"{path}: {where} byte size does not match its shape "
                          f"{list(s.shape)[:8]} and dtype {s.code}; re-create the file")
  extent = math.prod(max(d, 1) for d in s.shape) * itemsize
  if count == 0 and extent > budget:
    raise disk.over_budget(path, f"{where} holds no bytes but declares shape "
                           f"{list(s.shape)[:8]}, which", extent, budget, "re-create the file")


def parse_entries(header: dict, data_start: int, size: int, path: str,
                  budget: Optional[int] = None) -> dict[str, Spec]:
  """Header entries as Spec (dtype None when unsupported); checks kinds and ranges, that
  the offsets tile the data and match the shapes, and declared extents against `budget`."""
  budget = disk.memory_budget() if budget is None else budget
  untrusted.check(header, {"__metadata__": dict, "__metadata__.*": str},
                  f"{path}'s safetensors header", "re-create the file")
  entries = {name: _entry_spec(name, e, path) for name, e in header.items()
             if name != "__metadata__"}
  cursor = 0
  for name, s in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
    if s.begin != cursor or s.end < s.begin:
      raise disk.StoreError(f"{path}: tensor {untrusted.show(name)} has data_offsets "
                            f"[{s.begin}, {s.end}] that do not tile the data region; "
                            "re-create the file")
    _check_declared(name, s, path, budget)
    cursor = s.end
  if data_start + cursor != size:
    raise disk.StoreError(f"{path} is {size:,} bytes but its header describes "
                     f"{data_start + cursor:,}; the file is truncated or padded, re-create it")
  return entries


def pread_into(fd: int, out: np.ndarray, offset: int, path: str) -> np.ndarray:
  view = memoryview(out.reshape(-1).view(np.uint8))
  while view.nbytes:
    n = os.preadv(fd, [view], offset)
    if n == 0:
      raise disk.StoreError(f"{path} ended early at byte {offset:,}; the file is truncated, "
                       "re-create it")
    view, offset = view[n:], offset + n
  return out

# --- Streaming reader -------------------------------------------------------


class TrajectoryReader:
  """Reads rows of tensors from a safetensors file without loading it whole.

  Works on jaxdt files and on the lab's (`safetensors.torch.save_file`). BF16
  tensors come back as their uint16 bits, like the lab's W.
  """

  def __init__(self, path: str | os.PathLike, digests: Optional[Mapping[str, str]] = None,
               budget: Optional[int] = None):
    """Opens `path` and parses its header.

    Args:
      path: the file.
      digests: the file's tensor digests (`seal()["tensors"]`, as the run's
        metadata.json records them), or None. Given them, the header is checked
        at once, every tensor is hashed as its bytes are read, and `verify()`
        hashes what the pass did not read and compares.
      budget: the bytes one `rows`/`read` may allocate, and the bound on what
        the header may declare (default `disk.memory_budget()`).

    Raises:
      StoreError: missing file, a header that does not describe the file, or
        (with digests) a header other than the recorded one.
    """
    self.path = os.fspath(path)
    self._fd = None
    self._digests = None if digests is None else dict(digests)
    self._hashing = {}  # name -> [sha256, bytes hashed from the tensor's start]
    self.budget = disk.memory_budget() if budget is None else int(budget)
    try:
      self._fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      hint = " (the run is unfinished)" if os.path.exists(self.path + PARTIAL_SUFFIX) else ""
      raise disk.StoreError(f"{self.path} not found{hint}; pass a finished .safetensors file") from None
    except OSError as e:
      raise disk.StoreError(f"{self.path} cannot be opened ({e.strerror}); pass a readable "
                            ".safetensors file") from None
    try:
      header, self._data_start = read_header(self._fd, self.path, self.budget)
      self._entries = parse_entries(header, self._data_start, os.fstat(self._fd).st_size,
                                     self.path, self.budget)
      self.metadata = dict(header.get("__metadata__") or {})
      if self._digests is not None:
        self._check_header()
    except BaseException:
      self.close()
      raise

  def _corrupt(self, what: str) -> disk.StoreError:
    return disk.StoreError(f"{self.path} is corrupt: {what} does not match the SHA-256 recorded when "
                      "the run finished; restore the file from a copy, or re-run the experiment "
                      "into a new --output_dir")

  def _check_header(self) -> None:
    names = set(self._digests) - {HEADER_DIGEST}
    if names != set(self._entries):
      raise self._corrupt("its list of tensors")
    raw = os.pread(self._fd, self._data_start, 0)
    if hashlib.sha256(raw).hexdigest() != self._digests.get(HEADER_DIGEST):
      raise self._corrupt("its header")
    self._hashing = {name: [hashlib.sha256(), 0] for name in self._entries}

  def _track(self, name: str, offset: int, out: np.ndarray) -> None:
    """Feeds bytes just read at `offset` (from the tensor's start) to its digest."""
    h = self._hashing.get(name)
    if h is None:
      return
    raw = memoryview(out.reshape(-1).view(np.uint8))
    if offset <= h[1] < offset + raw.nbytes:
      h[0].update(raw[h[1] - offset:])
      h[1] = offset + raw.nbytes

  def verify(self) -> bool:
    """Completes every tensor's digest (reading what the pass skipped) and compares.

    Returns:
      True when the file was opened with digests and matches them; False when
      there is nothing to verify against (a lab file, or an older run).

    Raises:
      StoreError: a tensor differs from its recorded SHA-256.
    """
    if self._digests is None:
      return False
    for name, e in self._entries.items():
      h = self._hashing[name]
      start = self._data_start + e.begin
      disk.hash_range(self._fd, start + h[1], start + e.end - e.begin, self.path, h[0])
      h[1] = e.end - e.begin
      if h[0].hexdigest() != self._digests[name]:
        raise self._corrupt(f"tensor {name!r}")
    return True

  def keys(self) -> list[str]:
    """Tensor names in header order."""
    return list(self._entries)

  def _entry(self, name: str) -> Spec:
    entry = self._entries.get(name)
    if entry is None:
      raise disk.StoreError(f"{self.path} has no tensor {name!r}; it has "
                            f"{untrusted.show(self.keys(), 200)}")
    if entry.dtype is None:
      raise disk.StoreError(f"{self.path}: tensor {untrusted.show(name)} has dtype "
                            f"{untrusted.show(entry.code)}, which jaxdt does not read; convert "
                            "the file")
    return entry

  def raw_dtype(self, name: str) -> str:
    """The safetensors dtype code, e.g. "U16" or "BF16"."""
    return self._entry(name).code

  def dtype(self, name: str) -> np.dtype:
    """The numpy dtype `rows`/`read` return (uint16 for BF16)."""
    dtype = self._entry(name).dtype
    return np.dtype(np.uint16) if dtype == BF16 else dtype

  def shape(self, name: str) -> tuple:
    """The tensor's shape."""
    return self._entry(name).shape

  def rows(self, name: str, start: int, stop: Optional[int] = None) -> np.ndarray:
    """Rows [start, stop) along axis 0, read from disk into a new array.

    Args:
      name: tensor name.
      start: first row (0 <= start <= stop).
      stop: one past the last row; None = to the end.

    Returns:
      An array of shape (stop - start, *shape[1:]) and dtype `dtype(name)`.
    """
    e = self._entry(name)
    if not e.shape:
      raise disk.StoreError(f"tensor {name!r} of {self.path} is 0-d; use read()")
    n = e.shape[0]
    stop = n if stop is None else operator.index(stop)
    start = operator.index(start)
    if not 0 <= start <= stop <= n:
      raise disk.StoreError(f"rows [{start}, {stop}) of {name!r} in {self.path} are out of range: "
                       f"it has {n} rows")
    row_bytes = (e.end - e.begin) // n if n else 0
    self._check_budget(name, f"rows [{start:,}, {stop:,}) of", (stop - start) * row_bytes)
    out = np.empty((stop - start,) + e.shape[1:], self.dtype(name))
    pread_into(self._fd, out, self._data_start + e.begin + start * row_bytes, self.path)
    self._track(name, start * row_bytes, out)
    return out

  def read(self, name: str) -> np.ndarray:
    """The whole tensor (for small ones: masks, indices, scalars)."""
    e = self._entry(name)
    self._check_budget(name, "all of", e.end - e.begin)
    out = np.empty(e.shape, self.dtype(name))
    pread_into(self._fd, out, self._data_start + e.begin, self.path)
    self._track(name, 0, out)
    return out

  def _check_budget(self, name: str, what: str, nbytes: int) -> None:
    if nbytes > self.budget:
      raise disk.over_budget(self.path, f"reading {what} tensor {untrusted.show(name)}", nbytes,
                             self.budget, "re-create the file, or raise the budget if the "
                             "machine has the memory")

  def close(self) -> None:
    """Closes the file."""
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "TrajectoryReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass
