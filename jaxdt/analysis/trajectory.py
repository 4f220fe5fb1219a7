"""Trajectory files, ours and the lab's, opened for analysis (docs/definitions.md §Steps and files).

`open_trajectory(path)` takes a .safetensors file or a run folder, works out
its layout (our keys and metadata.json, or the lab's key names: `W` or
`embeddings`, `loss` or `losses`, `m`/`momentum_W`/`momentum`, ...), which rows
to analyse (the dead rows when a file records every row and has a dead_mask),
and returns a `Trajectory` that reads blocks of W and ΔW′. `run_info` reads the
backend facts from metadata.json.

The numpy lattice helpers come first: the lab's ΔW′ formula op for op in
numpy f32 (for bf16 W) and its f32-spacing twin (for f32 W).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import ml_dtypes
import numpy as np

from jaxdt import config as config_lib
from jaxdt import probes
from jaxdt.io import disk
from jaxdt.io import hosts
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import results
from jaxdt.io import locks
from jaxdt.io import tensorfile
from jaxdt.io import untrusted


class AnalysisError(ValueError):
  """A file or path that cannot be analysed; the message is one line with the fix."""


# --- Lattice displacement in numpy (the lab's formula) -----------------------


def np_bf16_to_f32(bits: np.ndarray) -> np.ndarray:
  """bf16 bit patterns (uint16) as their exact f32 values."""
  return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def np_as_float64(x: np.ndarray, code: str) -> np.ndarray:
  """A stored tensor's values as f64: bf16 bit patterns (safetensors code U16/BF16)
  by their bf16 value, every other numeric code by its own value."""
  if code in ("U16", "BF16"):
    return np_bf16_to_f32(x).astype(np.float64)
  return x.astype(np.float64)


def np_ulp(bits: np.ndarray) -> np.ndarray:
  """The lab's bf16 ULP 2^(max(E,1) - 134) of bf16 bit patterns, as f32 (exact)."""
  e = (np.asarray(bits, np.uint16).astype(np.int32) >> 7) & 0xFF
  return np.ldexp(np.float32(1), np.maximum(e, 1) - 134).astype(np.float32)


def np_lattice_displacement(prev_bits: np.ndarray, next_bits: np.ndarray) -> np.ndarray:
  """ΔW′ = (W[t].float() − W[t-1].float()) / ULP(W[t-1]) in numpy f32.

  This is the lab's formula op for op. numpy keeps f32 subnormals (as the
  lab's device did), so it gives the lab's bits; `lattice.lattice_displacement`
  gives the same bits under XLA:CPU, which flushes them (a test checks both).

  Args:
    prev_bits, next_bits: uint16 bf16 bit patterns of W[t-1] and W[t].

  Returns:
    f32 array in cells (±inf where the lab's value overflows).
  """
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    return (np_bf16_to_f32(next_bits) - np_bf16_to_f32(prev_bits)) / np_ulp(prev_bits)


def np_f32_cells(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
  """ΔW′ for f32 W (fp32/mixed runs): the difference in cells of f32 spacing at W[t-1]."""
  prev = np.asarray(prev, np.float32)
  e = ((prev.view(np.uint32) >> 23) & 0xFF).astype(np.int32)
  spacing = np.ldexp(np.float32(1), np.maximum(e, 1) - 150).astype(np.float32)
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    return (np.asarray(nxt, np.float32) - prev) / spacing


# --- Opening files: our layout and the lab's ---------------------------------

# The file keys by role come from `jaxdt.probes` (jaxdt's names first, then the
# lab's: W/embeddings, loss/losses, m/momentum_W/momentum, ...).


def role_key(keys, role: str) -> Optional[str]:
  """The file's key for `role` ("weights", "loss", "momentum", ...), or None."""
  return first_key(keys, probes.keys_with_role(role))


def accounting_keys() -> tuple:
  """The in-scan Adam accounting's file keys (adam_replay_match, ...), in order."""
  return probes.keys_with_role("accounting")


# Hyperparameters: (metadata.json key, the Thimble 1 file's scalar tensor key).
_HYPER_KEYS = {"learning_rate": ("learning_rate", "learning_rate"),
               "b1": ("beta1", "adam_beta1"), "b2": ("beta2", "adam_beta2"),
               "eps": ("epsilon", "adam_epsilon"), "weight_decay": ("weight_decay", "weight_decay")}


def read_state(reader: tensorfile.TrajectoryReader, key: str, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of a recorded tensor in its training dtype: bf16 (ml_dtypes) for
  U16/BF16 bits, else as stored (f32 copies of bf16 m/v keep their values exactly)."""
  rows = reader.rows(key, start, stop)
  return rows.view(ml_dtypes.bfloat16) if reader.raw_dtype(key) in ("U16", "BF16") else rows


def first_key(keys, candidates) -> Optional[str]:
  """The first of `candidates` that is in `keys`, or None."""
  return next((k for k in candidates if k in keys), None)


def state_keys(keys) -> tuple:
  """(m key, v key): the file's names for Adam's recorded state, None if absent."""
  return role_key(keys, "momentum"), role_key(keys, "variance")


def is_compact(keys) -> bool:
  """A compact freeze record (`--probes=freeze`): per-step counts instead of W and ΔW′."""
  return "n_frozen" in keys and "n_moving" in keys


def resolve_path(path: str) -> str:
  """The trajectory file of PATH: a .safetensors file, or a run folder holding one.

  Raises:
    AnalysisError: nothing usable at PATH (one line naming what to pass).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    meta = _read_json(os.path.join(path, metadata_lib.METADATA_FILE))
    name = ((meta.get("config") or {}).get("store") or {}).get("trajectory_name")
    if name and os.path.basename(name) == name and os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
      return os.path.join(path, found[0])
    partial = [f for f in os.listdir(path) if f.endswith(".safetensors" + tensorfile.PARTIAL_SUFFIX)]
    if not found and partial:
      raise AnalysisError(f"{path} holds only the unfinished {partial[0]}; "
                          f"{locks.unfinished_advice(path)}")
    if not found:
      raise AnalysisError(f"{path} has no .safetensors trajectory; pass a run folder or a "
                          ".safetensors file")
    raise AnalysisError(f"{path} holds several trajectories ({', '.join(found)}); pass one file")
  if os.path.isfile(path):
    if path.endswith(".h5"):
      raise AnalysisError(f"{path} is HDF5 (Thimble 6/7); convert it to safetensors (uint16 W) "
                          "first")
    if not path.endswith((".safetensors", tensorfile.PARTIAL_SUFFIX)):
      raise AnalysisError(f"{path} is not a .safetensors trajectory; pass its run folder or the "
                          ".safetensors file")
    return path
  if os.path.exists(path + tensorfile.PARTIAL_SUFFIX):
    raise AnalysisError(f"{path} is unfinished (only {os.path.basename(path)}.partial exists); "
                        f"{locks.unfinished_advice(os.path.dirname(os.path.abspath(path)))}")
  raise AnalysisError(f"{path} does not exist; pass a run folder or a .safetensors file")


def _read_json(path: str) -> dict:
  """metadata.json as far as finding the trajectory goes ({} when unreadable: `open_result`
  refuses it afterwards, in one line)."""
  try:
    return metadata_lib.read_json_object(path) or {}
  except disk.StoreError:
    return {}


# What a streaming pass keeps besides one block (stream.Scan, the series metrics derives
# from it, the accounting metrics, the plots), generously: the check errs on refusing.
PASS_STEP_BYTES = 512  # per step: counts, classes, means, radii, accounting, series
PASS_STEP_HIDDEN_BYTES = 32  # per step and hidden unit: the f64 centroid and its copies
PASS_ROW_BYTES = 128  # per analysed row: the last-step arrays, stored per-row tensors
BLOCK_ELEMENT_BYTES = 40  # per W element of one block's working arrays


def pass_bytes(steps: int, n: int, hidden: int) -> int:
  """The bytes a pass over `steps` steps of `n` rows of `hidden` keeps, with one step's block."""
  return ((steps + 1) * (PASS_STEP_BYTES + PASS_STEP_HIDDEN_BYTES * hidden)
          + n * PASS_ROW_BYTES + BLOCK_ELEMENT_BYTES * n * max(hidden, 1))


@dataclasses.dataclass
class Trajectory:
  """A trajectory file seen through the lab's key names (our files and theirs).

  Attributes:
    path: the .safetensors file.
    reader: its `tensorfile.TrajectoryReader`.
    metadata: the metadata.json beside it (ours or the lab's), {} if none.
    layout: "jaxdt" (our metadata or adam_* keys) or "lab".
    w_key: "W"/"embeddings", or None.
    w_format: "bf16" (uint16 or BF16 bits) or "f32".
    loss_key: "loss"/"losses", or None.
    rows: indices of the analysed rows among the recorded ones (the dead
      rows when a file records every row and has a dead_mask), or None = all.
    steps: T.
    n_rows: rows analysed.
    hidden: D.
    notes: what was inferred about the layout, for the printed summary.
    steps_key: the tensor whose rows give T (named when a pass is refused).
  """

  path: str
  reader: tensorfile.TrajectoryReader
  metadata: dict
  layout: str
  w_key: Optional[str]
  w_format: Optional[str]
  loss_key: Optional[str]
  rows: Optional[np.ndarray]
  steps: int
  n_rows: int
  hidden: int
  notes: list
  steps_key: Optional[str] = None  # the tensor whose rows give `steps`

  def has(self, key: str) -> bool:
    return key in self.reader.keys()

  def check_memory(self, steps: Optional[int] = None) -> None:
    """Refuses, before anything is allocated, a pass over `steps` (default T) whose kept
    state (`pass_bytes`) would pass the reader's memory budget.

    Raises:
      AnalysisError: one line naming the file, the tensor and the budget.
    """
    steps = self.steps if steps is None else steps
    need = pass_bytes(steps, self.n_rows, self.hidden)
    if need > self.reader.budget:
      what = (f"a streaming pass over tensor {self.steps_key or self.w_key!r} ({steps + 1:,} "
              f"rows of {self.n_rows:,} x {self.hidden:,})")
      raise AnalysisError(str(disk.over_budget(
          self.path, what, need, self.reader.budget, "re-create the file if its header lies, "
          f"or raise {disk.BUDGET_ENV} if the machine has the memory")))

  def verify(self) -> bool:
    """Ends the pass: every tensor against its recorded SHA-256 (False: none recorded).

    Raises:
      AnalysisError: the file differs from what its run recorded.
    """
    try:
      return self.reader.verify()
    except disk.StoreError as e:
      raise AnalysisError(str(e)) from None

  def select(self, a: np.ndarray) -> np.ndarray:
    """The analysed rows of a block of recorded rows ([b, recorded, ...])."""
    return a if self.rows is None else a[:, self.rows]

  def w_rows(self, start: int, stop: int) -> np.ndarray:
    """W rows [start, stop) of the analysed rows: uint16 bits (bf16) or f32."""
    return self.select(self.reader.rows(self.w_key, start, stop))

  def dwp_rows(self, start: int, stop: int) -> np.ndarray:
    """ΔW′ of steps start+1..stop: stored rows, or computed from W."""
    if self.has("delta_W_prime"):
      return self.select(self.reader.rows("delta_W_prime", start, stop)).astype(np.float32)
    return self.cells(self.w_rows(start, stop + 1))

  def cells(self, w: np.ndarray) -> np.ndarray:
    """ΔW′ between consecutive rows of a W block (len(w) - 1 steps)."""
    if self.w_format == "bf16":
      return np_lattice_displacement(w[:-1], w[1:])
    return np_f32_cells(w[:-1], w[1:])

  def values(self, w: np.ndarray) -> np.ndarray:
    """A W block as f32 values."""
    return np_bf16_to_f32(w) if self.w_format == "bf16" else np.asarray(w, np.float32)

  def stored_rows(self, key: str) -> np.ndarray:
    """A per-row tensor (e.g. last_motion_step) restricted to the analysed rows."""
    a = self.reader.read(key)
    recorded = self.reader.shape(self.w_key)[1]
    return a if self.rows is None or a.shape[0] != recorded else a[self.rows]

  def hyper(self):
    """AdamW hyperparameters from metadata.json or the file's scalars; None if unknown.

    Thimble 1 stores them as f32 tensors; each is read back as the shortest
    decimal that rounds to it (0.001, not 0.0010000000474974513), the value
    the lab typed, since the step scalars are computed from it in float64.
    """
    got = {}
    for name, (meta_key, file_key) in _HYPER_KEYS.items():
      if self.metadata.get(meta_key) is not None:
        got[name] = float(self.metadata[meta_key])
      elif self.has(file_key) and self.reader.shape(file_key) in ((), (1,)):
        value = np.asarray(self.reader.read(file_key)).reshape(-1)[0]
        got[name] = float(str(value)) if value.dtype == np.float32 else float(value)
    if len(got) < len(_HYPER_KEYS):
      return None
    return config_lib.OptimConfig(got["learning_rate"], got["b1"], got["b2"], got["eps"], got["weight_decay"])


def _dims(reader: tensorfile.TrajectoryReader, path: str, key: str, ndim: int) -> tuple:
  """The shape of `key`, refused in one line unless it has `ndim` dimensions."""
  shape = reader.shape(key)
  if len(shape) != ndim:
    raise AnalysisError(f"{path}: {key!r} has shape {list(shape)[:8]}; expected {ndim} "
                        "dimensions (re-create the file, or split stacked runs into one file each)")
  return shape


def _w_layout(reader: tensorfile.TrajectoryReader, path: str, keys) -> tuple:
  """(w_key, w_format, recorded rows, hidden) of a file."""
  w_key = role_key(keys, "weights")
  if w_key is not None:
    shape, code = _dims(reader, path, w_key, 3), reader.raw_dtype(w_key)
    if code not in ("U16", "BF16", "F32"):
      raise AnalysisError(f"{path}: {w_key!r} is {code}; expected uint16/BF16 bf16 bits or F32")
    return w_key, "f32" if code == "F32" else "bf16", shape[1], shape[2]
  if "delta_W_prime" in keys:
    return None, None, *_dims(reader, path, "delta_W_prime", 3)[1:]
  if is_compact(keys) and "last_motion_step" in keys:  # the compact freeze record
    return None, None, int(np.prod(reader.shape("last_motion_step"))), 0
  return None, None, 0, 0


def _steps(reader: tensorfile.TrajectoryReader, path: str, keys, w_key, loss_key) -> tuple:
  """(T, the tensor whose rows give it) of a file."""
  for key, extra in ((w_key, 1), ("delta_W_prime", 0), ("n_frozen" if is_compact(keys) else None,
                                                          0), (loss_key, 1)):
    if key is not None and key in keys:
      shape = reader.shape(key)
      if not shape or shape[0] < extra:
        raise AnalysisError(f"{path}: {key!r} has shape {list(shape)[:8]}, no rows of steps; "
                            "re-create the file")
      return shape[0] - extra, key
  raise AnalysisError(f"{path} has none of W, delta_W_prime, loss "
                      f"({untrusted.show(', '.join(keys), 120)}); nothing to analyse")


# role -> (dimensions, rows beyond T it needs; None: any) of what the analyses read.
_ROLE_SHAPES = {"loss": (1, 1), "centroid_norm": (1, 1), "frozen_count": (1, 0),
                "moving_count": (1, 0), "displacement_norm_mean": (1, 0), "accounting": (1, 0),
                "last_motion": (1, None), "centroid": (2, 1), "displacement": (3, 0),
                "momentum": (3, 1), "variance": (3, 1)}


def _check_shapes(reader: tensorfile.TrajectoryReader, path: str, keys, steps: int,
                  trailing: tuple) -> None:
  """Refuses tensors whose shapes do not fit the T steps and [rows, D] of the file's W (or
  ΔW′): every analysis can then index what it reads."""
  for role, (ndim, extra) in _ROLE_SHAPES.items():
    for key in probes.keys_with_role(role):
      if key not in keys:
        continue
      shape = _dims(reader, path, key, ndim)
      if extra is not None and shape[0] < steps + extra:
        raise AnalysisError(f"{path}: {key!r} has {shape[0]:,} rows, fewer than the "
                            f"{steps + extra:,} of its {steps:,} steps; re-create the file")
      tail = trailing[-(ndim - 1):] if ndim > 1 else ()
      if ndim > 1 and trailing and tuple(shape[1:]) != tail:
        raise AnalysisError(f"{path}: {key!r} has shape {list(shape)}, not [T, "
                            f"{', '.join(map(str, tail))}] like W; re-create the file")


def open_trajectory(path: str) -> Trajectory:
  """Opens a trajectory file (or the one in a run folder) and works out its layout.

  Checks what a streaming pass over it keeps against the memory budget
  (`Trajectory.check_memory`) before anything is allocated.

  Raises:
    AnalysisError: unreadable file, W of an unsupported shape or dtype, or a
      pass beyond the memory budget (one line naming the file and the tensor).
  """
  path = resolve_path(path)
  try:
    reader, meta, integrity = results.open_result(path)
  except (disk.StoreError, OSError) as e:
    raise AnalysisError(str(e)) from None
  try:
    return _layout(path, reader, meta, integrity)
  except disk.StoreError as e:
    reader.close()
    raise AnalysisError(str(e)) from None
  except BaseException:
    reader.close()
    raise


def _layout(path: str, reader: tensorfile.TrajectoryReader, meta: dict, notes: list):
  keys = reader.keys()
  w_key, w_format, recorded, hidden = _w_layout(reader, path, keys)
  loss_key = role_key(keys, "loss")
  steps, steps_key = _steps(reader, path, keys, w_key, loss_key)
  _check_shapes(reader, path, keys, steps, (recorded, hidden) if hidden else ())
  rows, notes = None, list(notes)
  if w_key is None and is_compact(keys):
    pass  # counts only: the rows are the recorded (dead) rows, nothing to select
  elif recorded and "dead_mask" in keys:
    mask = reader.read("dead_mask").astype(bool).reshape(-1)
    if mask.size == recorded and mask.sum() < recorded:
      rows = np.flatnonzero(mask)
      notes.insert(0, f"W holds all {recorded} rows; analysing the {rows.size} dead rows "
                   "(dead_mask)")
  elif recorded:
    notes.insert(0, f"no dead_mask: all {recorded} recorded rows are analysed as one cloud")
  n = recorded if rows is None else rows.size
  rowwise = w_key or "delta_W_prime" in keys or (is_compact(keys) and "last_motion_step" in keys)
  if rowwise and (n == 0 or (hidden == 0 and not is_compact(keys))):
    raise AnalysisError(f"{path} records {n} rows of {hidden} hidden units "
                        f"({'W or delta_W_prime' if hidden == 0 else 'after dead_mask'}): "
                        "nothing to analyse; pass a file that records rows")
  ours = "config" in meta or any(k in keys for k in accounting_keys())
  traj = Trajectory(path, reader, meta, "jaxdt" if ours else "lab", w_key, w_format, loss_key,
                    rows, steps, n, hidden, notes, steps_key)
  traj.check_memory()
  return traj


@contextlib.contextmanager
def malformed(path: str):
  """The last guard of an analysis of a file nobody vouches for: an error its tensors cause
  deep in an analysis (an empty reduction, an index past a short tensor) becomes one line
  naming the file. The shape checks of `open_trajectory` refuse what they know first."""
  try:
    yield
  except (AnalysisError, disk.StoreError):
    raise
  except (ArithmeticError, LookupError, TypeError, ValueError) as e:
    raise AnalysisError(f"{path}: its tensors do not fit the analyses ({type(e).__name__}: "
                        f"{untrusted.show(str(e), 100)}); check the file (a jaxdt run never "
                        "does this: report it)") from None


# --- Run facts from metadata.json ---------------------------------------------

RUN_INFO_KEYS = ("experiment", "framework", "backend", "device", "device_kind", "cpu_threads",
                 "xla_flags", "gemm_path", "jax_version", "jaxlib_version", "torch_version",
                 "torch_threads", "cpu_model", "cpu_features", "arithmetic_fingerprint", "date",
                 "completed")


def run_info(metadata: dict) -> dict:
  """The backend facts a comparison needs, from metadata.json (absent keys: None; the host's
  from the last of `hosts`, where newer runs keep them once)."""
  host = hosts.host_of(metadata)
  return {k: metadata.get(k, host.get(k)) for k in RUN_INFO_KEYS}
