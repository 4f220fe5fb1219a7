"""Writing a streaming safetensors trajectory in place: rows at their offsets, checksums, one rename.

The format, the header and the reader are `tensorfile`'s; `TrajectoryWriter`
writes the complete header first, then each chunk of rows at its byte offset
(peak RAM: one chunk), hashes each tensor as its rows arrive in order, seals
(fsync, read back, per-tensor SHA-256) and renames `.partial` to the final name.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from typing import Any, Mapping, Optional

import numpy as np

from jaxdt.io import disk
from jaxdt.io import tensorfile


def pwrite_all(fd: int, array: np.ndarray, offset: int) -> None:
  """Writes the bytes of a C-contiguous array at `offset` (no temporary file-sized buffers)."""
  view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  while view.nbytes:
    n = os.pwrite(fd, view, offset)  # may write less than asked (e.g. > 2 GiB on Linux)
    view, offset = view[n:], offset + n


class TrajectoryWriter:
  """Writes one safetensors file in place, chunk by chunk, then renames it done.

  The header and a sparse, preallocated data region go to `path + ".partial"`
  at construction; rows land at their byte offsets with `os.pwrite`, so memory
  use is one chunk. `finalize()` fsyncs and renames to `path`. A writer that is
  closed, garbage-collected or left by an exception leaves the `.partial`
  behind, visibly unfinished. Rows never written read back as zeros.

  Durable resume: call `sync()` after writing the rows up to step s and before
  saving the checkpoint of step s; a run resumed from that checkpoint reopens
  with `resume=True` and rewrites rows s+1.. with the same bytes.

  Attributes:
    path: the final file name.
    partial_path: `path + ".partial"`, where the bytes go until `finalize()`.
    nbytes: the file's exact size (header + data), as `estimate_bytes` gives.
  """

  def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple],
               metadata: Optional[Mapping[str, str]] = None, resume: bool = False,
               *, overwrite: bool = False):
    """Creates (or, with `resume`, reopens) `path + ".partial"`.

    Args:
      path: the final file name, e.g. `out/crucible_1_trajectory.safetensors`.
      specs: ordered dict name -> (numpy dtype, shape tuple). Dtypes: uint16
        (bf16 bits), float32, int32, int64, bool (also bfloat16 as tensorfile.BF16, and the
        other integer/float safetensors types except float16).
      metadata: the safetensors `__metadata__`, str -> str.
      resume: reopen an existing `.partial` whose header equals what these
        specs and metadata give, and keep its rows.
      overwrite: allow starting afresh where a finished `path` already exists
        (it is deleted at once, so it cannot be mistaken for this run's output).

    Raises:
      StoreError: bad specs or metadata, a header mismatch on resume, a
        missing `.partial` on resume, or an existing finished file.
    """
    self.path = os.fspath(path)
    self.partial_path = self.path + tensorfile.PARTIAL_SUFFIX
    self._layout = tensorfile.file_layout(specs)
    self._header = tensorfile.header_bytes(self._layout, tensorfile.check_metadata(metadata))
    self.nbytes = len(self._header) + max(s.end for s in self._layout.values())
    self._data_start = len(self._header)
    self._fd = None
    self._finalized = False
    # name -> [running sha256, rows hashed] while rows arrive in order; None
    # once a tensor is written out of order (its digest then comes from seal()).
    self._running = {name: [hashlib.sha256(), 0] for name in self._layout}
    if resume:
      self._fd = self._reopen()
    else:
      self._fd = self._create(overwrite)

  def _create(self, overwrite: bool) -> int:
    if os.path.exists(self.path):
      if not overwrite:
        raise disk.StoreError(f"{self.path} already exists (a finished run); choose another "
                         "--output_dir or delete it first")
      os.remove(self.path)
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      os.pwrite(fd, self._header, 0)
      os.ftruncate(fd, self.nbytes)  # sparse: blocks are allocated as rows arrive
    except BaseException:
      os.close(fd)
      raise
    return fd

  def _reopen(self) -> int:
    if not os.path.exists(self.partial_path):
      done = " (the run already finished)" if os.path.exists(self.path) else ""
      raise disk.StoreError(f"cannot resume: {self.partial_path} does not exist{done}; "
                       "start the run without resume")
    fd = os.open(self.partial_path, os.O_RDWR)
    try:
      self._check_resumable(fd)
    except BaseException:
      os.close(fd)
      raise
    return fd

  def _check_resumable(self, fd: int) -> None:
    fix = "resume with the settings the run started with, or delete it and start without resume"
    header, start = tensorfile.read_header(fd, self.partial_path)
    on_disk = os.pread(fd, start, 0)
    if on_disk == self._header:
      size = os.fstat(fd).st_size
      if size != self.nbytes:
        raise disk.StoreError(f"cannot resume {self.partial_path}: {size:,} bytes, expected "
                         f"{self.nbytes:,}; {fix}")
      return
    mine = json.loads(self._header[8:].decode("utf-8"))
    diff = next((k for k in list(mine) + list(header) if mine.get(k) != header.get(k)), None)
    if diff is None:
      what = "same entries in another order"
    else:
      label = "metadata" if diff == "__metadata__" else f"tensor {diff!r}"
      what = f"{label}: file has {header.get(diff)}, run wants {mine.get(diff)}"
    raise disk.StoreError(f"cannot resume {self.partial_path}: its header differs from this run's "
                     f"specs ({what}); {fix}")

  def _target(self, name: str, array: Any) -> tuple[tensorfile.Spec, np.ndarray]:
    if self._fd is None:
      if self._finalized:
        raise disk.StoreError(f"writer for {self.path} is finalized; the file is finished, "
                         "write before finalize()")
      raise disk.StoreError(f"writer for {self.path} is closed; reopen it with resume=True")
    spec = self._layout.get(name)
    if spec is None:
      raise disk.StoreError(f"{self.path} has no tensor {name!r}; its tensors are "
                       f"{list(self._layout)}")
    array = np.asarray(array)
    # uint16 and bfloat16 are the same bits: accept either for a 16-bit bf16 slot.
    if {array.dtype, spec.dtype} == {np.dtype(np.uint16), tensorfile.BF16}:
      array = array.view(spec.dtype)
    if array.dtype != spec.dtype:
      raise disk.StoreError(f"tensor {name!r} of {self.path} is {spec.dtype}, got {array.dtype}; "
                       "cast explicitly before writing")
    return spec, array

  def write_rows(self, name: str, first_row: int, array: Any) -> None:
    """Writes rows [first_row, first_row + len(array)) of tensor `name` along axis 0.

    Args:
      name: a tensor in `specs`.
      first_row: index of the first row to write.
      array: numpy or JAX array with the tensor's dtype (bf16 accepted for a
        uint16 slot, as bits) and shape (n, *shape[1:]).

    Raises:
      StoreError: unknown name, wrong dtype or trailing shape, rows out of range,
        a 0-d tensor (use `write`), or a closed writer.
    """
    spec, array = self._target(name, array)
    if not spec.shape:
      raise disk.StoreError(f"tensor {name!r} of {self.path} is 0-d; write it with write()")
    if array.ndim != len(spec.shape) or array.shape[1:] != spec.shape[1:]:
      want = "(n" + "".join(f", {d}" for d in spec.shape[1:]) + ("" if spec.shape[1:] else ",")
      raise disk.StoreError(f"rows for {name!r} of {self.path} must have shape {want}), "
                       f"got {array.shape}")
    first_row = operator.index(first_row)
    if first_row < 0 or first_row + array.shape[0] > spec.shape[0]:
      raise disk.StoreError(f"rows [{first_row}, {first_row + array.shape[0]}) of {name!r} in "
                       f"{self.path} are out of range: it has {spec.shape[0]} rows")
    row_bytes = (spec.end - spec.begin) // spec.shape[0] if spec.shape[0] else 0
    pwrite_all(self._fd, array, self._data_start + spec.begin + first_row * row_bytes)
    running = self._running.get(name)
    if running is not None:
      if first_row == running[1]:
        running[0].update(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        running[1] += array.shape[0]
      elif first_row < running[1]:  # rows rewritten: hash them again from the file
        self._running[name] = None

  def write(self, name: str, array: Any) -> None:
    """Writes a whole tensor (masks, indices, last_motion_step, scalars).

    Args:
      name: a tensor in `specs`.
      array: numpy or JAX array with exactly the tensor's dtype and shape.

    Raises:
      StoreError: unknown name, wrong dtype or shape, or a closed writer.
    """
    spec, array = self._target(name, array)
    if array.shape != spec.shape:
      raise disk.StoreError(f"tensor {name!r} of {self.path} has shape {spec.shape}, got "
                       f"{array.shape}")
    pwrite_all(self._fd, array, self._data_start + spec.begin)
    h = hashlib.sha256(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
    self._running[name] = [h, spec.shape[0] if spec.shape else 1]

  def sync(self) -> None:
    """Flushes written rows to disk (call before saving a checkpoint)."""
    if self._fd is not None:
      os.fsync(self._fd)

  def prefix_digests(self) -> dict:
    """{name: {"rows": k, "sha256": hex}}: the digest of rows [0, k) of each tensor
    written in order so far (k = 0 for one not yet written)."""
    return {name: {"rows": r[1], "sha256": r[0].copy().hexdigest()}
            for name, r in self._running.items() if r is not None}

  def rehash_prefix(self, name: str, rows: int) -> str:
    """Reads rows [0, rows) of `name` back from the file, restarts the running
    digest from them (for a resume), and returns their SHA-256."""
    spec = self._layout[name]
    n = spec.shape[0] if spec.shape else 1
    row_bytes = (spec.end - spec.begin) // n if n else 0
    h = hashlib.sha256()
    begin = self._data_start + spec.begin
    disk.hash_range(self._fd, begin, begin + rows * row_bytes, self.partial_path, h)
    self._running[name] = [h.copy(), rows]
    return h.hexdigest()

  def seal(self) -> dict:
    """Fsyncs, reads the file back once, and returns its checksums (no rename).

    Returns:
      {"file": sha256 of the whole file, "tensors": {tensorfile.HEADER_DIGEST: ..., name:
      ...}} as hex strings.

    Raises:
      StoreError: the bytes on disk differ from the bytes written (a tensor
        whose rows all arrived in order hashes otherwise when read back).
    """
    if self._fd is None:
      raise disk.StoreError(f"writer for {self.path} was closed unfinished; reopen with "
                       "resume=True to finish it")
    os.fsync(self._fd)
    whole = hashlib.sha256()
    bounds = sorted(((self._data_start + s.begin, self._data_start + s.end, n)
                     for n, s in self._layout.items()))
    regions = [(0, self._data_start, tensorfile.HEADER_DIGEST)] + bounds
    tensors = {}
    for begin, end, name in regions:
      h = hashlib.sha256()
      disk.hash_range(self._fd, begin, end, self.partial_path, h, whole)
      tensors[name] = h.hexdigest()
    for name, running in self._running.items():
      spec = self._layout[name]
      full = spec.shape[0] if spec.shape else 1
      if running is not None and running[1] == full and running[0].hexdigest() != tensors[name]:
        raise disk.StoreError(f"{self.partial_path}: tensor {name!r} reads back other bytes than "
                         "were written (disk fault?); continue with --resume to rewrite it")
    return {"file": whole.hexdigest(), "tensors": tensors}

  def commit(self) -> str:
    """Renames `.partial` to the final name and makes the rename durable.

    Returns:
      The final path.
    """
    if self._finalized:
      return self.path
    if self._fd is None:
      raise disk.StoreError(f"writer for {self.path} was closed unfinished; reopen with "
                       "resume=True to finish it")
    os.fsync(self._fd)
    os.close(self._fd)
    self._fd = None
    os.replace(self.partial_path, self.path)
    disk.fsync_dir(os.path.dirname(self.path))
    self._finalized = True
    return self.path

  def finalize(self) -> str:
    """`seal()` then `commit()`; a second call does nothing.

    Returns:
      The final path.
    """
    if not self._finalized:
      self.seal()
    return self.commit()

  def close(self) -> None:
    """Closes without finalizing: the `.partial` stays, resumable."""
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "TrajectoryWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()  # never finalizes: completion is an explicit act

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown; nothing useful to do
      pass


# --- Streaming reader -------------------------------------------------------
