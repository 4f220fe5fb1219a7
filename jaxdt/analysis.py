"""The lab's analyses (REFERENCE §3), in numpy, streaming over trajectory files.

Each analysis is a pure function of arrays plus a small streaming driver that
reads a file in row blocks, so files larger than memory work. Printing lives
in `report`-style functions that reproduce the seeds' printed text (the two
seed blocks are here; `jaxdt.report` formats the rest).

Conventions (REFERENCE §2.3, §3):
  step t = 1..T; W row t is the state after step t (row 0: before any step);
  ΔW′ row t-1 holds step t. Every step number printed or saved is 1-based,
  so the lab's "0-based ΔW′ index" 559 is our step 560.
  Motion of row i at step t: ‖ΔW′_i‖₂ ≥ threshold (0.1, Crucible 1).
  "Never" is -1 in every per-row step array (as in `last_motion_step`).

The one pass (`scan`) reads W (and ΔW′ when stored; otherwise computes it
from W with `np_lattice_displacement`, bit for bit the lab's formula) in
blocks of steps and keeps O(T + rows) state: per-step counts and per-row
last-exit steps. Everything else is computed from those.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator, NamedTuple, Optional

import numpy as np

from jaxdt import store

BLOCK_BYTES = 64 << 20  # rows read per block: about this many bytes
MOTION_THRESHOLD = 0.1  # the Crucible 1 default when the file's metadata has none
MILESTONES = (50, 90, 99, 100)  # per-step frozen-fraction milestones, percent
HYPERNOVA = 1000.0  # ‖ΔW′‖₂ above this: Hypernova (REFERENCE §3.4b)
ACCOUNTING_SAMPLE_STEPS = (1, 10, 50, 100, 200, 500, 800)  # Thimble 1's validation steps
SAMPLE_STEPS = (1, 10, 100, 500, 1000, 2000, 5000, 10000)


class AnalysisError(ValueError):
  """A file or path that cannot be analysed; the message is one line with the fix."""


def torch_median(x: np.ndarray) -> float:
  """torch.median: the lower of the two middle values for an even count."""
  s = np.sort(np.asarray(x).ravel())
  return float(s[(s.size - 1) // 2])


def fimbulwinter_check(last_motion_step: np.ndarray, total_steps: int) -> dict:
  """Crucible 1's FIMBULWINTER CHECK numbers (REFERENCE §3.2)."""
  lms = np.asarray(last_motion_step)
  global_last = int(lms.max())
  return {
      "global_last_motion": global_last,
      "fimbulwinter_duration": int(total_steps - global_last),
      "fimbulwinter_fraction": (total_steps - global_last) / total_steps,
      "earliest_freeze": int(lms.min()),
      "median_freeze": torch_median(lms.astype(np.float32)),
      "latest_freeze": global_last,
      "never_moved": int((lms == -1).sum()),
      "n_rows": int(lms.size),
  }


def format_fimbulwinter_check(r: dict) -> str:
  """The seed's printed FIMBULWINTER CHECK block."""
  lines = ["=" * 60, "FIMBULWINTER CHECK", "=" * 60,
           f"Last motion (any token): step {r['global_last_motion']}",
           f"Fimbulwinter duration: {r['fimbulwinter_duration']} steps",
           f"Fimbulwinter fraction: {r['fimbulwinter_fraction']:.1%}",
           "", "Freeze time distribution:",
           f"  Earliest freeze: step {r['earliest_freeze']}",
           f"  Median freeze: step {r['median_freeze']:.0f}",
           f"  Latest freeze: step {r['latest_freeze']}"]
  if r["never_moved"] > 0:
    lines += ["", f"⚠️  {r['never_moved']} tokens never moved (unexpected!)"]
  else:
    lines += ["", f"✓ All {r['n_rows']} tokens moved at least once"]
  return "\n".join(lines)


def step_blocks(n_steps: int, row_bytes: int) -> Iterator[tuple]:
  """(start, stop) blocks of steps of about BLOCK_BYTES each."""
  per = max(1, BLOCK_BYTES // max(row_bytes, 1))
  for s in range(0, n_steps, per):
    yield s, min(n_steps, s + per)


def any_motion_per_step(reader, threshold: float = 0.1, key: str = "delta_W_prime") -> np.ndarray:
  """bool [T]: did any row move at step t (‖ΔW′_i‖₂ ≥ threshold), streamed from a file."""
  n, rows, dim = reader.shape(key)
  out = np.zeros(n, bool)
  for s, e in step_blocks(n, rows * dim * 4):
    d = reader.rows(key, s, e).astype(np.float32)
    out[s:e] = (np.sqrt(np.sum(d * d, axis=2)) >= threshold).any(axis=1)
  return out


def stillness_runs(any_motion: np.ndarray) -> list:
  """Maximal runs of steps with no motion, longest first (the seed's loop)."""
  runs, current = [], 0
  for m in np.asarray(any_motion, bool):
    if not m:
      current += 1
    else:
      if current > 0:
        runs.append(current)
      current = 0
  if current > 0:
    runs.append(current)
  return sorted(runs, reverse=True)


def format_stillness(runs: list) -> str:
  """The seed's printed STILLNESS PERIOD ANALYSIS block."""
  lines = ["=" * 60, "STILLNESS PERIOD ANALYSIS", "=" * 60,
           f"Total stillness periods: {len(runs)}", "", "Longest 10:"]
  lines += [f"  {i + 1}. {r} steps" for i, r in enumerate(runs[:10])]
  if len(runs) >= 2:
    lines += ["", f"Final vs second-longest: {runs[0]} / {runs[1]} = {runs[0] / runs[1]:.1f}x"]
  if runs:
    lines += ["", f"Mean stillness: {sum(runs) / len(runs):.1f} steps",
              f"Median stillness: {sorted(runs)[len(runs) // 2]} steps"]
  else:
    lines += ["", "No stillness: some token moved at every step."]
  return "\n".join(lines)


# --- Lattice displacement in numpy (the lab's formula, literally) -----------


def np_bf16_to_f32(bits: np.ndarray) -> np.ndarray:
  """bf16 bit patterns (uint16) as their exact f32 values."""
  return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


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

W_KEYS = ("W", "embeddings")  # Crucible/Thimble/ours; Flannel 1-3
LOSS_KEYS = ("loss", "losses")  # Crucible/Thimble 8/9/ours; Flannel/Thimble 1-5
M_KEYS = ("m", "momentum_W", "momentum")
V_KEYS = ("v", "variance_W", "variance")
ACCOUNTING_KEYS = ("adam_replay_match", "adam_cosine", "adam_norm_ratio", "adam_swallowed",
                   "adam_max_ulp_error")
# Hyperparameters: (metadata.json key, the Thimble 1 file's scalar tensor key).
_HYPER_KEYS = {"learning_rate": ("learning_rate", "learning_rate"),
               "b1": ("beta1", "adam_beta1"), "b2": ("beta2", "adam_beta2"),
               "eps": ("epsilon", "adam_epsilon"), "weight_decay": ("weight_decay", "weight_decay")}


def _first(keys, candidates) -> Optional[str]:
  return next((k for k in candidates if k in keys), None)


def resolve_path(path: str) -> str:
  """The trajectory file of PATH: a .safetensors file, or a run folder holding one.

  Raises:
    AnalysisError: nothing usable at PATH (one line naming what to pass).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    meta = _read_json(os.path.join(path, store.METADATA_FILE))
    name = ((meta.get("config") or {}).get("store") or {}).get("trajectory_name")
    if name and os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
      return os.path.join(path, found[0])
    partial = [f for f in os.listdir(path) if f.endswith(".safetensors" + store.PARTIAL_SUFFIX)]
    if not found and partial:
      raise AnalysisError(f"{path} holds only the unfinished {partial[0]}; finish the run with "
                          "--resume first")
    if not found:
      raise AnalysisError(f"{path} has no .safetensors trajectory; pass a run folder or a "
                          ".safetensors file")
    raise AnalysisError(f"{path} holds several trajectories ({', '.join(found)}); pass one file")
  if os.path.isfile(path):
    if path.endswith(".h5"):
      raise AnalysisError(f"{path} is HDF5 (Thimble 6/7); convert it to safetensors (uint16 W) "
                          "first")
    return path
  if os.path.exists(path + store.PARTIAL_SUFFIX):
    raise AnalysisError(f"{path} is unfinished (only {os.path.basename(path)}.partial exists); "
                        "finish the run with --resume first")
  raise AnalysisError(f"{path} does not exist; pass a run folder or a .safetensors file")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
    return out if isinstance(out, dict) else {}
  except (OSError, ValueError):
    return {}


@dataclasses.dataclass
class Trajectory:
  """A trajectory file seen through the lab's key names (our files and theirs).

  Attributes:
    path: the .safetensors file.
    reader: its `store.TrajectoryReader`.
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
  """

  path: str
  reader: store.TrajectoryReader
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

  def has(self, key: str) -> bool:
    return key in self.reader.keys()

  def _select(self, a: np.ndarray) -> np.ndarray:
    return a if self.rows is None else a[:, self.rows]

  def w_rows(self, start: int, stop: int) -> np.ndarray:
    """W rows [start, stop) of the analysed rows: uint16 bits (bf16) or f32."""
    return self._select(self.reader.rows(self.w_key, start, stop))

  def dwp_rows(self, start: int, stop: int) -> np.ndarray:
    """ΔW′ of steps start+1..stop: stored rows, or computed from W."""
    if self.has("delta_W_prime"):
      return self._select(self.reader.rows("delta_W_prime", start, stop)).astype(np.float32)
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
    from jaxdt import optim
    got = {}
    for name, (meta_key, file_key) in _HYPER_KEYS.items():
      if self.metadata.get(meta_key) is not None:
        got[name] = float(self.metadata[meta_key])
      elif self.has(file_key) and self.reader.shape(file_key) in ((), (1,)):
        value = np.asarray(self.reader.read(file_key)).reshape(-1)[0]
        got[name] = float(str(value)) if value.dtype == np.float32 else float(value)
    if len(got) < len(_HYPER_KEYS):
      return None
    return optim.Hyper(got["learning_rate"], got["b1"], got["b2"], got["eps"], got["weight_decay"])


def open_trajectory(path: str) -> Trajectory:
  """Opens a trajectory file (or the one in a run folder) and works out its layout.

  Raises:
    AnalysisError: unreadable file, or W of an unsupported shape or dtype.
  """
  path = resolve_path(path)
  try:
    reader = store.TrajectoryReader(path)
  except store.StoreError as e:
    raise AnalysisError(str(e)) from None
  keys = reader.keys()
  meta = _read_json(os.path.join(os.path.dirname(os.path.abspath(path)), store.METADATA_FILE))
  notes = []
  w_key, loss_key = _first(keys, W_KEYS), _first(keys, LOSS_KEYS)
  w_format, rows, recorded, hidden = None, None, 0, 0
  if w_key is not None:
    shape, code = reader.shape(w_key), reader.raw_dtype(w_key)
    if len(shape) != 3:
      raise AnalysisError(f"{path}: {w_key!r} has shape {list(shape)}; expected [T+1, rows, D] "
                          "(stacked multi-run files: split them into one file per run)")
    if code not in ("U16", "BF16", "F32"):
      raise AnalysisError(f"{path}: {w_key!r} is {code}; expected uint16/BF16 bf16 bits or F32")
    w_format = "f32" if code == "F32" else "bf16"
    recorded, hidden = shape[1], shape[2]
  elif "delta_W_prime" in keys:
    recorded, hidden = reader.shape("delta_W_prime")[1:]
  if recorded and "dead_mask" in keys:
    mask = reader.read("dead_mask").astype(bool).reshape(-1)
    if mask.size == recorded and mask.sum() < recorded:
      rows = np.flatnonzero(mask)
      notes.append(f"W holds all {recorded} rows; analysing the {rows.size} dead rows (dead_mask)")
  elif recorded:
    notes.append(f"no dead_mask: all {recorded} recorded rows are analysed as one cloud")
  if w_key is not None:
    steps = reader.shape(w_key)[0] - 1
  elif "delta_W_prime" in keys:
    steps = reader.shape("delta_W_prime")[0]
  elif loss_key is not None:
    steps = reader.shape(loss_key)[0] - 1
  else:
    raise AnalysisError(f"{path} has none of W, delta_W_prime, loss ({', '.join(keys)}); "
                        "nothing to analyse")
  ours = "config" in meta or any(k in keys for k in ACCOUNTING_KEYS)
  return Trajectory(path, reader, meta, "jaxdt" if ours else "lab", w_key, w_format, loss_key,
                    rows, steps, recorded if rows is None else rows.size, hidden, notes)


# --- The one streaming pass ---------------------------------------------------


class Scan(NamedTuple):
  """What one pass over a trajectory keeps: per-step counts and per-row last steps.

  Per step t = 1..T (index t-1): any_motion, n_frozen (‖ΔW′_i‖₂ < threshold),
  classes (instantaneous: Early ‖ΔW′‖₂ > √D; Midlife L∞ > 1; Late L∞ ≤ 1 and
  L1 > 0; Still L1 = 0), mean_l2 (over finite norms), global_frozen (W[t] ==
  W[t-1] bitwise for every row; None without W).
  Per row (-1 = never): last_motion (‖ΔW′‖₂ ≥ threshold), last_early, last_midlife,
  last_l1 (L1 > 0), last_hypernova (‖ΔW′‖₂ > 1000), last_spherical (L1 > 1).
  cold_to_hot / hot_to_cold: row-level changes of "frozen" between steps.
  Per W row 0..T (None without W/centroid): centroid (f64 [T+1, D]), radius
  (mean ‖w_i − c‖), radius_origin (mean ‖w_i‖), max_radius (max ‖w_i − c‖).
  """

  steps: int
  n: int
  hidden: int
  threshold: float
  any_motion: np.ndarray
  n_frozen: np.ndarray
  classes: np.ndarray
  mean_l2: np.ndarray
  global_frozen: Optional[np.ndarray]
  last_motion: np.ndarray
  last_early: np.ndarray
  last_midlife: np.ndarray
  last_l1: np.ndarray
  last_hypernova: np.ndarray
  last_spherical: np.ndarray
  cold_to_hot: int
  hot_to_cold: int
  centroid: Optional[np.ndarray]
  radius: Optional[np.ndarray]
  radius_origin: Optional[np.ndarray]
  max_radius: Optional[np.ndarray]
  centroid_source: str


def _last_step(last: np.ndarray, hit: np.ndarray, first_step: int) -> np.ndarray:
  """Per-row running max of the step numbers where `hit` [b, n] holds."""
  steps = np.arange(first_step, first_step + hit.shape[0], dtype=np.int64)[:, None]
  return np.maximum(last, np.where(hit, steps, -1).max(axis=0, initial=-1))


def _bits(a: np.ndarray) -> np.ndarray:
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def default_block_steps(n: int, hidden: int) -> int:
  """Steps per block so that a block's working arrays take about BLOCK_BYTES."""
  return max(1, BLOCK_BYTES // max(1, 40 * n * hidden))


def scan(traj: Trajectory, threshold: float = MOTION_THRESHOLD, block_steps: Optional[int] = None,
         max_steps: Optional[int] = None) -> Scan:
  """One pass over steps 1..T in blocks; memory is one block plus O(T + rows).

  Args:
    traj: an opened trajectory with W or delta_W_prime.
    threshold: the motion threshold on ‖ΔW′_i‖₂.
    block_steps: steps per block (default: about BLOCK_BYTES of work per block).
    max_steps: analyse only steps 1..max_steps.

  Returns:
    Scan.
  """
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  n, D = traj.n_rows, traj.hidden
  block = block_steps or default_block_steps(n, D)
  has_w = traj.w_key is not None
  stored_c = traj.has("centroid") and traj.rows is None
  never = lambda: np.full(n, -1, np.int64)
  any_motion, n_frozen = np.zeros(T, bool), np.zeros(T, np.int64)
  classes, mean_l2 = np.zeros((T, 4), np.int64), np.zeros(T)
  global_frozen = np.zeros(T, bool) if has_w else None
  last = {k: never() for k in ("motion", "early", "midlife", "l1", "hypernova", "spherical")}
  cold_to_hot = hot_to_cold = 0
  prev_frozen = None
  with_c = has_w or stored_c
  centroid = np.zeros((T + 1, D)) if with_c else None
  radii = [np.full(T + 1, np.nan) for _ in range(3)] if has_w else [None] * 3
  sqrt_d = math.sqrt(D)
  for s in range(0, T, block):
    e = min(T, s + block)
    w = traj.w_rows(s, e + 1) if has_w else None  # (b+1, n, D)
    d = traj.dwp_rows(s, e) if w is None or traj.has("delta_W_prime") else traj.cells(w)
    with np.errstate(over="ignore", invalid="ignore"):
      a = np.abs(d)
      l1 = a.sum(axis=-1, dtype=np.float64)  # (b, n)
      linf = a.max(axis=-1, initial=0)
      l2 = np.sqrt(np.square(d, dtype=np.float64).sum(axis=-1))
    moving = l2 >= threshold
    frozen = ~moving
    any_motion[s:e] = moving.any(axis=1)
    n_frozen[s:e] = frozen.sum(axis=1)
    early, mid, warm = l2 > sqrt_d, linf > 1, l1 > 0
    classes[s:e] = np.stack([early.sum(1), (mid & ~early).sum(1), (warm & ~mid).sum(1),
                             (l1 == 0).sum(1)], axis=1)
    finite = np.isfinite(l2)
    mean_l2[s:e] = np.where(finite, l2, 0).sum(1) / np.maximum(finite.sum(1), 1)
    for key, hit in (("motion", moving), ("early", early), ("midlife", mid), ("l1", warm),
                     ("hypernova", l2 > HYPERNOVA), ("spherical", l1 > 1)):
      last[key] = _last_step(last[key], hit, s + 1)
    chain = frozen if prev_frozen is None else np.concatenate([prev_frozen[None], frozen])
    cold_to_hot += int((chain[:-1] & ~chain[1:]).sum())
    hot_to_cold += int((~chain[:-1] & chain[1:]).sum())
    prev_frozen = frozen[-1]
    if has_w:
      bits = _bits(w)
      global_frozen[s:e] = (bits[1:] == bits[:-1]).all(axis=(1, 2))
      k = e + 1 - s if e == T else e - s  # W rows s..e-1, and row T in the last block
      x = traj.values(w[:k]).astype(np.float64)  # (k, n, D)
      c = (traj.reader.rows("centroid", s, s + k).astype(np.float64) if stored_c
           else x.mean(axis=1))
      centroid[s:s + k] = c
      r = np.sqrt(np.square(x - c[:, None]).sum(-1))  # (k, n)
      radii[0][s:s + k] = r.mean(1)
      radii[1][s:s + k] = np.sqrt(np.square(x).sum(-1)).mean(1)
      radii[2][s:s + k] = r.max(1, initial=0)
  if with_c and not has_w:
    centroid = traj.reader.rows("centroid", 0, T + 1).astype(np.float64)
  if with_c and T == 0 and has_w:  # no steps: only row 0
    x = traj.values(traj.w_rows(0, 1)).astype(np.float64)
    centroid[0] = x.mean(axis=1)[0]
  source = ("stored 'centroid'" if stored_c else "mean of W rows (f64)") if with_c else "none"
  return Scan(T, n, D, float(threshold), any_motion, n_frozen, classes, mean_l2, global_frozen,
              last["motion"], last["early"], last["midlife"], last["l1"], last["hypernova"],
              last["spherical"], cold_to_hot, hot_to_cold, centroid, *radii, source)


# --- Analyses: pure functions of arrays ---------------------------------------


def sample_steps(total: int) -> list:
  """The steps a summary quotes values at: SAMPLE_STEPS below T, then T."""
  return [t for t in SAMPLE_STEPS if t < total] + ([total] if total else [])


def runs_of(mask: np.ndarray) -> list:
  """Maximal runs of True as (first index, length), in order."""
  m = np.concatenate([[0], np.asarray(mask, bool).astype(np.int8), [0]])
  edges = np.diff(m)
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  return [(int(a), int(b - a)) for a, b in zip(starts, ends)]


def stillness_summary(any_motion: np.ndarray) -> dict:
  """STILLNESS PERIOD ANALYSIS numbers with the seed's own formulas.

  mean = sum/len; median = sorted(runs)[len // 2] (the upper middle value).
  """
  runs = stillness_runs(any_motion)
  return {
      "count": len(runs), "runs": runs, "longest_10": runs[:10],
      "mean": sum(runs) / len(runs) if runs else None,
      "median": sorted(runs)[len(runs) // 2] if runs else None,
      "final_vs_second": runs[0] / runs[1] if len(runs) >= 2 else None,
  }


def window_steps(total: int) -> int:
  """Window length for "frozen fraction by window": 1000 steps from 2000 on, else a fifth."""
  return 1000 if total >= 2000 else max(1, -(-total // 5))


def global_freeze(frozen: np.ndarray, window: Optional[int] = None) -> dict:
  """Global freeze fraction and freeze/thaw cycles (`1.29c`, REFERENCE §3.3).

  Args:
    frozen: bool [T]; frozen[t-1] says W[t] == W[t-1] bitwise for every row.
    window: steps per window for the windowed fractions (default `window_steps`).

  Returns:
    dict: frozen_steps, total_steps, fraction, cycles (maximal frozen runs),
    longest {start, end, length} (steps, inclusive; the earliest of equal
    lengths), mean_run, median_run (np.median), first_frozen_step,
    final_run_to_end, windows [{start, end, fraction}].
  """
  frozen = np.asarray(frozen, bool)
  T = frozen.size
  runs = runs_of(frozen)
  lengths = [n for _, n in runs]
  best = max(runs, key=lambda r: r[1]) if runs else None  # max() keeps the first of ties
  window = window or window_steps(T)
  return {
      "frozen_steps": int(frozen.sum()), "total_steps": T,
      "fraction": float(frozen.mean()) if T else None, "cycles": len(runs),
      "longest": None if best is None else {"start": best[0] + 1, "end": best[0] + best[1],
                                            "length": best[1]},
      "mean_run": float(np.mean(lengths)) if runs else None,
      "median_run": float(np.median(lengths)) if runs else None,
      "first_frozen_step": runs[0][0] + 1 if runs else None,
      "final_run_to_end": bool(runs) and runs[-1][0] + runs[-1][1] == T,
      "windows": [{"start": a + 1, "end": min(T, a + window),
                   "fraction": float(frozen[a:a + window].mean())} for a in range(0, T, window)],
  }


def first_step_reaching(count: np.ndarray, n: int, percent: float) -> Optional[int]:
  """First step t (1-based) with count[t-1] / n ≥ percent/100, exactly; None if never."""
  hit = np.flatnonzero(np.asarray(count, np.int64) * 100 >= percent * n)
  return int(hit[0]) + 1 if hit.size else None


def frozen_fraction(n_frozen: np.ndarray, n: int, cold_to_hot: int = 0,
                    hot_to_cold: int = 0) -> dict:
  """Per-step frozen fraction (‖ΔW′_i‖₂ < threshold) and its milestones (REFERENCE §3.4b).

  Returns:
    dict: milestones {"50%": step or None, ...}, first_frozen_token_step,
    moving_at {step: rows still moving}, final_fraction, reheat {cold_to_hot,
    hot_to_cold, transitions (= n·(T−1)), and their fractions}.
  """
  n_frozen = np.asarray(n_frozen, np.int64)
  T = n_frozen.size
  first = np.flatnonzero(n_frozen > 0)
  samples = sample_steps(T)
  transitions = n * max(T - 1, 0)
  return {
      "milestones": {f"{p}%": first_step_reaching(n_frozen, n, p) for p in MILESTONES},
      "first_frozen_token_step": int(first[0]) + 1 if first.size else None,
      "moving_at": {str(t): int(n - n_frozen[t - 1]) for t in samples},
      "final_fraction": float(n_frozen[-1] / n) if T and n else None,
      "reheat": {"cold_to_hot": int(cold_to_hot), "hot_to_cold": int(hot_to_cold),
                 "transitions": transitions,
                 "cold_to_hot_fraction": cold_to_hot / transitions if transitions else None,
                 "hot_to_cold_fraction": hot_to_cold / transitions if transitions else None},
  }


def _stats(x: np.ndarray) -> Optional[dict]:
  """mean, median (torch.median: lower middle), min, max, count; None when empty."""
  x = np.asarray(x)
  if not x.size:
    return None
  return {"mean": float(x.mean()), "median": torch_median(x), "min": int(x.min()),
          "max": int(x.max()), "count": int(x.size)}


def nested_boundaries(last_early, last_midlife, last_l1) -> tuple:
  """The three last-exit steps as nested per-row boundaries (0 = never).

  ‖ΔW′‖₂ > √D implies L∞ > 1 (‖x‖₂ ≤ √D·‖x‖∞), which implies L1 > 0, so the
  raw last steps already nest; the maxima only guard non-finite rows.
  """
  le = np.maximum(np.asarray(last_early), 0)
  lm = np.maximum(np.asarray(last_midlife), le)
  ll = np.maximum(np.asarray(last_l1), lm)
  return le, lm, ll


def lifecycle(last_early, last_midlife, last_l1, total_steps: int, *, last_hypernova=None,
              last_spherical=None) -> dict:
  """Lifecycle phases by the last-exit rule (REFERENCE §3.4a, `A:lore/lifecycle-phases.md`).

  A row is Early up to the last step with ‖ΔW′‖₂ > √D, Midlife up to the last
  step with L∞ > 1, Late up to the last step with L1 > 0, and in Fimbulwinter
  (L1 = 0 sustained) from the step after that to the end.

  Args:
    last_early, last_midlife, last_l1: per-row last steps (-1 = never).
    total_steps: T.
    last_hypernova, last_spherical: optional per-row last ‖ΔW′‖₂ > 1000 and
      last L1 > 1 steps (REFERENCE §3.4b vocabulary).

  Returns:
    dict: boundaries {last_early, last_midlife, last_motion, fimbulwinter_onset:
    stats over rows that ever met the criterion, + never}, durations {early,
    midlife, late, fimbulwinter: stats over all rows}, and when given
    last_hypernova, last_spherical and stumbling (last motion − last L1 > 1).
  """
  raw = {"last_early": np.asarray(last_early), "last_midlife": np.asarray(last_midlife),
         "last_motion": np.asarray(last_l1)}
  boundaries = {}
  for k, b in raw.items():
    boundaries[k] = _stats(b[b >= 0])
    boundaries[k + "_never"] = int((b < 0).sum())
  ll = raw["last_motion"]
  boundaries["fimbulwinter_onset"] = _stats(ll[ll >= 0] + 1)
  le, lm, ll0 = nested_boundaries(last_early, last_midlife, last_l1)
  durations = {"early": _stats(le), "midlife": _stats(lm - le), "late": _stats(ll0 - lm),
               "fimbulwinter": _stats(total_steps - ll0)}
  out = {"boundaries": boundaries, "durations": durations}
  if last_hypernova is not None:
    h = np.asarray(last_hypernova)
    out["last_hypernova"] = _stats(h[h >= 0])
  if last_spherical is not None:
    sp = np.asarray(last_spherical)
    out["last_spherical"] = _stats(sp[sp >= 0])
    out["stumbling"] = _stats(ll0 - np.minimum(np.maximum(sp, 0), ll0))
  return out


def _count_at_least(b: np.ndarray, total_steps: int) -> np.ndarray:
  """[T]: for t = 1..T, how many rows have b ≥ t."""
  h = np.bincount(np.clip(b, 0, total_steps), minlength=total_steps + 1)
  return np.cumsum(h[::-1])[::-1][1:]


def phase_populations(last_early, last_midlife, last_l1, total_steps: int) -> np.ndarray:
  """int [T, 4]: rows in Early, Midlife, Late, Fimbulwinter at each step (last-exit rule)."""
  le, lm, ll = nested_boundaries(last_early, last_midlife, last_l1)
  n = le.size
  ge = [_count_at_least(b, total_steps) for b in (le, lm, ll)]
  return np.stack([ge[0], ge[1] - ge[0], ge[2] - ge[1], n - ge[2]], axis=1)


def centroid_drift(centroid: np.ndarray, radius=None, radius_origin=None,
                   max_radius=None) -> dict:
  """Centroid drift and cloud radius (REFERENCE §3.5).

  Args:
    centroid: [T+1, D] dead-row centroid c(t).
    radius, radius_origin, max_radius: optional [T+1] mean ‖w_i − c‖, mean
      ‖w_i‖ and max ‖w_i − c‖.

  Returns:
    dict: norm_start/norm_end (‖c‖), path_length (Σ‖Δc‖), crow_flies
    (‖c(T) − c(0)‖), efficiency (crow/path), cos_mean/cos_std (ddof=1, as
    torch.std)/cos_pairs over consecutive steps where both Δc ≠ 0, l2_over_l1 of
    the total displacement and its uniform baseline 1/√D, last_motion_step of
    the centroid, and with the radii radius_start/radius_end/radius_ratio,
    radius_origin_start/end and liftoff_step (first t with ‖c(t)‖ > max_i
    ‖w_i − c(t)‖: the origin leaves the bounding sphere).
  """
  c = np.asarray(centroid, np.float64)
  dc = np.diff(c, axis=0)
  step = np.sqrt(np.square(dc).sum(1))
  path = float(step.sum())
  total = c[-1] - c[0]
  crow = float(np.sqrt(np.square(total).sum()))
  both = (step[:-1] > 0) & (step[1:] > 0)
  cos = (dc[:-1] * dc[1:]).sum(1)[both] / (step[:-1] * step[1:])[both]
  moved = np.flatnonzero(step > 0)
  l1 = float(np.abs(total).sum())
  out = {
      "norm_start": float(np.linalg.norm(c[0])), "norm_end": float(np.linalg.norm(c[-1])),
      "path_length": path, "crow_flies": crow, "efficiency": crow / path if path > 0 else None,
      "cos_mean": float(cos.mean()) if cos.size else None,
      "cos_std": float(cos.std(ddof=1)) if cos.size > 1 else None, "cos_pairs": int(cos.size),
      "l2_over_l1": crow / l1 if l1 > 0 else None, "uniform_baseline": 1 / math.sqrt(c.shape[1]),
      "last_motion_step": int(moved[-1]) + 1 if moved.size else None,
  }
  if radius is not None:
    r = np.asarray(radius, np.float64)
    out.update(radius_start=float(r[0]), radius_end=float(r[-1]),
               radius_ratio=float(r[-1] / r[0]) if r[0] > 0 else None)
  if radius_origin is not None:
    out.update(radius_origin_start=float(radius_origin[0]),
               radius_origin_end=float(radius_origin[-1]))
  if max_radius is not None:
    outside = np.flatnonzero(np.sqrt(np.square(c).sum(1)) > np.asarray(max_radius))
    out["liftoff_step"] = int(outside[0]) if outside.size else None
  return out


def _finite(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x[np.isfinite(x)]


def accounting_summary(replay_match, cosine, norm_ratio, swallowed, max_ulp_error) -> dict:
  """The Adam accounting summary (REFERENCE §3.10) from per-step [T] metrics.

  Counts use all T steps as the denominator, as the lab's "476/1000 steps with
  ratio in [0.99, 1.01]"; means skip non-finite steps (nothing moved: ratio inf,
  cosine NaN).
  """
  r, c, q = (np.asarray(x, np.float64) for x in (replay_match, cosine, norm_ratio))
  T = r.size
  mean = lambda x: float(_finite(x).mean()) if _finite(x).size else None
  err = _finite(max_ulp_error)
  return {
      "steps": T, "replay_match_mean": mean(r), "replay_match_min": float(r.min()) if T else None,
      "replay_exact_steps": int((r == 1).sum()),
      "cosine_mean": mean(c), "cosine_above_0_99": int((c > 0.99).sum()),
      "ratio_mean": mean(q), "ratio_within_1pct": int(((q >= 0.99) & (q <= 1.01)).sum()),
      "swallowed_mean": mean(swallowed), "max_ulp_error": float(err.max()) if err.size else None,
      "samples": [{"t": t, "ratio": float(q[t - 1]), "cosine": float(c[t - 1])}
                  for t in ACCOUNTING_SAMPLE_STEPS if t <= T],
  }


def loss_summary(loss: np.ndarray) -> dict:
  """Loss at steps 1..T (row 0, before any step, is NaN or 0.0 in the lab's files)."""
  x = np.asarray(loss, np.float64)[1:]
  T = x.size
  ok = np.flatnonzero(np.isfinite(x))
  samples = sample_steps(T)
  return {
      "first": float(x[0]) if T else None, "final": float(x[-1]) if T else None,
      "min": float(x[ok].min()) if ok.size else None,
      "min_step": int(ok[np.argmin(x[ok])]) + 1 if ok.size else None,
      "at": {str(t): float(x[t - 1]) for t in samples}, "nonfinite_steps": int(T - ok.size),
  }


# --- Accounting recomputed from recorded W, m, v (Thimble 1/3/8 layouts) -------


def _state_rows(traj: Trajectory, key: str, start: int, stop: int, like: np.ndarray):
  """m or v rows as W's dtype (f32 copies of bf16 state round-trip exactly)."""
  import ml_dtypes
  a = traj._select(traj.reader.rows(key, start, stop))
  if traj.w_format == "f32":
    return a.astype(np.float32)
  if traj.reader.raw_dtype(key) in ("U16", "BF16"):
    return a.view(ml_dtypes.bfloat16)
  return a.astype(np.float32).astype(ml_dtypes.bfloat16)


def accounting_from_state(traj: Trajectory, hyper, block_steps: Optional[int] = None,
                          max_steps: Optional[int] = None) -> dict:
  """Per-step accounting metrics recomputed from W[t-1], W[t], m_t, v_t.

  Runs `jaxdt.accounting.metrics` (the same function the trainer's in-scan
  probe runs) over blocks of steps, so a Thimble 8 file (W, m, v) gets the
  same numbers as our adam_* keys.

  Args:
    traj: a trajectory with W and m, v of T+1 rows (row t: after step t).
    hyper: `optim.Hyper` of the run.
    block_steps, max_steps: as in `scan`.

  Returns:
    dict metric name -> f32 [T] (accounting.METRIC_NAMES).
  """
  import jax
  import ml_dtypes

  from jaxdt import accounting
  m_key, v_key = _first(traj.reader.keys(), M_KEYS), _first(traj.reader.keys(), V_KEYS)
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  block = block_steps or default_block_steps(traj.n_rows, traj.hidden)
  fn = jax.jit(jax.vmap(lambda wp, wn, m, v, t: accounting.metrics(wp, wn, m, v, t, hyper)))
  out = {k: np.zeros(T, np.float32) for k in accounting.METRIC_NAMES}
  for s in range(0, T, block):
    e = min(T, s + block)
    w = traj.w_rows(s, e + 1)
    w = w.view(ml_dtypes.bfloat16) if traj.w_format == "bf16" else w
    m = _state_rows(traj, m_key, s + 1, e + 1, w)
    v = _state_rows(traj, v_key, s + 1, e + 1, w)
    got = fn(w[:-1], w[1:], m, v, np.arange(s + 1, e + 1, dtype=np.int32))
    for k in out:
      out[k][s:e] = np.asarray(got[k])
  return out


def sanity_check(traj: Trajectory) -> dict:
  """Thimble 8's SANITY CHECK numbers (thimble8.md cell 14) for files with W, m, v.

  `Mean |W[T] - W[0]|` subtracts in bf16 first, as the seed's
  `(W_bf16[-1] - W_bf16[0]).float().abs().mean()` does.
  """
  import ml_dtypes
  keys = traj.reader.keys()
  m_key, v_key = _first(keys, M_KEYS), _first(keys, V_KEYS)
  T = traj.steps
  w0, wt = (traj.values(traj.w_rows(t, t + 1))[0] for t in (0, T))
  dw = wt - w0
  if traj.w_format == "bf16":
    dw = dw.astype(ml_dtypes.bfloat16).astype(np.float32)

  def state(key, t):
    row = traj._select(traj.reader.rows(key, t, t + 1))[0]
    return np_bf16_to_f32(row) if traj.reader.raw_dtype(key) in ("U16", "BF16") else row

  loss = traj.reader.read(traj.loss_key).astype(np.float64) if traj.loss_key else None
  return {
      "steps": T, "mean_abs_dw": float(np.abs(dw).mean()),
      "mean_abs_m": float(np.abs(state(m_key, T)).mean()),
      "mean_abs_v": float(np.abs(state(v_key, T)).mean()),
      "loss_1": float(loss[1]) if loss is not None and T else None,
      "loss_T": float(loss[T]) if loss is not None else None,
      "m0_zero": bool((state(m_key, 0) == 0).all()), "v0_zero": bool((state(v_key, 0) == 0).all()),
  }


# --- The whole analysis of one file -------------------------------------------


def analyze(path: str, *, block_steps: Optional[int] = None, max_steps: Optional[int] = None,
            threshold: Optional[float] = None) -> tuple[dict, dict]:
  """Every analysis the file supports, streamed; what it lacks is listed as skipped.

  Args:
    path: a .safetensors trajectory (ours or the lab's layout) or a run folder.
    block_steps: steps per block (default: about BLOCK_BYTES of work per block).
    max_steps: analyse only steps 1..max_steps.
    threshold: motion threshold (default: metadata's motion_threshold, else 0.1).

  Returns:
    (summary, series): summary is JSON-ready (see report.format_summary);
    series holds per-step arrays for the plots (loss, frozen_fraction,
    global_frozen, populations, classes, centroid, radius, last_motion).
  """
  traj = open_trajectory(path)
  keys = traj.reader.keys()
  T = traj.steps if max_steps is None else min(traj.steps, max_steps)
  if threshold is None:
    threshold = float(traj.metadata.get("motion_threshold") or MOTION_THRESHOLD)
  skipped = []
  skip = lambda name, why: skipped.append({"analysis": name, "reason": why})
  has_d = "delta_W_prime" in keys
  summary = {
      "file": os.path.abspath(traj.path), "layout": traj.layout, "keys": keys, "steps": T,
      "rows_recorded": traj.reader.shape(traj.w_key)[1] if traj.w_key else traj.n_rows,
      "rows": traj.n_rows, "hidden": traj.hidden, "w_format": traj.w_format,
      "delta_w_prime": "stored" if has_d else ("computed from W" if traj.w_key else None),
      "motion_threshold": threshold, "notes": list(traj.notes), "skipped": skipped,
      "run": run_info(traj.metadata),
  }
  series = {}
  if traj.loss_key:
    loss = traj.reader.rows(traj.loss_key, 0, T + 1).astype(np.float64)
    summary["loss"] = loss_summary(loss)
    series["loss"] = loss
  else:
    skip("loss", "no loss or losses key")
  if traj.w_key or has_d:
    sc = scan(traj, threshold, block_steps, max_steps)
    lms = sc.last_motion
    if "last_motion_step" in keys and max_steps is None:
      stored = traj.stored_rows("last_motion_step").astype(np.int64)
      if stored.shape == lms.shape and not np.array_equal(stored, lms):
        summary["notes"].append(f"stored last_motion_step differs from the recount in "
                                f"{int((stored != lms).sum())} rows; the stored one is reported")
      lms = stored
    summary["fimbulwinter_check"] = fimbulwinter_check(lms, T) if T else None
    summary["stillness"] = stillness_summary(sc.any_motion)
    summary["frozen_fraction"] = frozen_fraction(sc.n_frozen, sc.n, sc.cold_to_hot, sc.hot_to_cold)
    summary["lifecycle"] = lifecycle(sc.last_early, sc.last_midlife, sc.last_l1, T,
                                     last_hypernova=sc.last_hypernova,
                                     last_spherical=sc.last_spherical)
    summary["mean_l2_at"] = {str(t): float(sc.mean_l2[t - 1]) for t in sample_steps(T)}
    series.update(frozen_fraction=sc.n_frozen / max(sc.n, 1), any_motion=sc.any_motion,
                  populations=phase_populations(sc.last_early, sc.last_midlife, sc.last_l1, T),
                  classes=sc.classes, last_motion=lms, mean_l2=sc.mean_l2)
    if sc.global_frozen is not None:
      summary["global_freeze"] = global_freeze(sc.global_frozen)
      series["global_frozen"] = sc.global_frozen
    else:
      skip("global freeze", "no W (bitwise equality needs the stored bits)")
    if sc.centroid is not None and T:
      summary["centroid"] = centroid_drift(sc.centroid, sc.radius, sc.radius_origin, sc.max_radius)
      summary["centroid"]["source"] = sc.centroid_source
      series.update(centroid=sc.centroid, radius=sc.radius)
      if sc.radius is None:
        skip("cloud radius", "no W (only the stored centroid)")
    else:
      skip("centroid drift and cloud radius", "no W or centroid" if T else "no steps")
  else:
    for name in ("Fimbulwinter check", "stillness runs", "global freeze", "frozen fraction",
                 "lifecycle phases", "centroid drift and cloud radius"):
      skip(name, "no W or delta_W_prime")
  if all(k in keys for k in ACCOUNTING_KEYS):
    arrays = [traj.reader.rows(k, 0, T).astype(np.float64) for k in ACCOUNTING_KEYS]
    summary["accounting"] = {**accounting_summary(*arrays), "source": "adam_* keys"}
    series["accounting"] = dict(zip(ACCOUNTING_KEYS, arrays))
  else:
    has_state = traj.w_key and _first(keys, M_KEYS) and _first(keys, V_KEYS)
    hyper = traj.hyper() if has_state else None
    if has_state and hyper is not None and T:
      got = accounting_from_state(traj, hyper, block_steps, max_steps)
      arrays = [got[k[len("adam_"):]] for k in ACCOUNTING_KEYS]
      summary["accounting"] = {**accounting_summary(*arrays),
                               "source": "recomputed from W, m, v (jaxdt.accounting.metrics)"}
      series["accounting"] = dict(zip(ACCOUNTING_KEYS, arrays))
    elif has_state:
      skip("Adam accounting", "m and v present but the hyperparameters are unknown (no "
           "metadata.json with learning_rate, beta1, beta2, epsilon, weight_decay)")
    else:
      skip("Adam accounting", "no adam_* keys, and no W + m + v to recompute them")
  if traj.w_key and _first(keys, M_KEYS) and _first(keys, V_KEYS) and max_steps is None:
    summary["sanity_check"] = sanity_check(traj)
  traj.reader.close()
  return summary, series


RUN_INFO_KEYS = ("experiment", "backend", "device", "device_kind", "cpu_threads", "xla_flags",
                 "jax_version", "jaxlib_version", "date", "completed")


def run_info(metadata: dict) -> dict:
  """The backend facts a comparison needs, from metadata.json (absent keys: None)."""
  return {k: metadata.get(k) for k in RUN_INFO_KEYS}


# --- Comparing two runs of one config -----------------------------------------

# Tensors written once (not per step): compared whole.
STATIC_KEYS = ("dead_mask", "dead_indices", "live_mask", "live_ids", "dead_ids",
               "last_motion_step", "recorded_steps")
# Final values of trackers: comparable only between runs of the same length.
FINAL_KEYS = ("last_motion_step",)


def _key_layout(reader, key: str, steps: int) -> Optional[int]:
  """1 if `key` has T+1 rows (row t = step t), 0 if T rows (row t-1 = step t), None if static."""
  shape = reader.shape(key)
  if key in STATIC_KEYS or not shape:
    return None
  return 1 if shape[0] == steps + 1 else 0 if shape[0] == steps else None


def _as_values(a: np.ndarray, code: str) -> Optional[np.ndarray]:
  """Values for |difference|: bf16 bits (U16/BF16), floats and integers as f64; None for bool."""
  if code in ("U16", "BF16"):
    return np_bf16_to_f32(a).astype(np.float64)
  if code in ("F32", "F64", "I8", "I16", "I32", "I64", "U8", "U32", "U64"):
    return a.astype(np.float64)
  return None


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max |a − b|; NaN against NaN is 0, NaN against a number is inf."""
  with np.errstate(invalid="ignore", over="ignore"):
    d = np.abs(a - b)
  d = np.where(np.isnan(a) & np.isnan(b), 0.0, np.where(np.isnan(d), np.inf, d))
  return float(d.max()) if d.size else 0.0


def compare_key(ra, rb, key: str, steps_a: int, steps_b: int,
                block_bytes: int = BLOCK_BYTES) -> dict:
  """Bitwise comparison of one tensor present in both files.

  Per-step tensors are compared over the common steps, in blocks; static ones
  whole. Returns: key, kind ("per-step" | "static"), comparable (False with a
  reason when dtype or shape differ), identical, first_diff_step (per-step:
  the 1-based step, 0 for row 0 of a T+1-row tensor; static: None),
  elements, identical_elements, identical_element_fraction,
  identical_bit_fraction (1 − popcount(a XOR b) / bits), max_abs_diff (numbers
  and bf16 bits; NaN vs NaN counts as equal). A tracker's final value
  (FINAL_KEYS) of runs of different length is not compared: identical is None.
  """
  code_a, code_b = ra.raw_dtype(key), rb.raw_dtype(key)
  sa, sb = ra.shape(key), rb.shape(key)
  la, lb = _key_layout(ra, key, steps_a), _key_layout(rb, key, steps_b)
  out = {"key": key, "kind": "static" if la is None else "per-step", "comparable": True}
  if key in FINAL_KEYS and steps_a != steps_b:
    return {**out, "comparable": False, "identical": None,
            "reason": f"final value of a {steps_a}-step and a {steps_b}-step run"}
  if code_a != code_b:
    return {**out, "comparable": False, "identical": False, "reason": f"dtype {code_a} vs {code_b}"}
  if la != lb or sa[1:] != sb[1:] or (la is None and sa != sb):
    return {**out, "comparable": False, "identical": False,
            "reason": f"shape {list(sa)} vs {list(sb)}"}
  if la is None:
    blocks, rows = [(None, None)], None
  else:
    rows = min(steps_a, steps_b) + la
    per = max(1, block_bytes // max(1, int(np.prod(sa[1:], dtype=np.int64)) * 8))
    blocks = [(s, min(rows, s + per)) for s in range(0, rows, per)]
  n = same = same_bits = 0
  first, max_diff, bits_per = None, 0.0, None
  for s, e in blocks:
    a = ra.read(key) if s is None else ra.rows(key, s, e)
    b = rb.read(key) if s is None else rb.rows(key, s, e)
    if a.dtype == np.bool_:
      a, b = a.view(np.uint8), b.view(np.uint8)
    ua, ub = _bits(np.ascontiguousarray(a)), _bits(np.ascontiguousarray(b))
    bits_per = ua.dtype.itemsize * 8
    eq = ua == ub
    n += eq.size
    same += int(eq.sum())
    same_bits += eq.size * bits_per - int(np.bitwise_count(ua ^ ub).sum())
    if first is None and not eq.all() and s is not None:
      row = s + int(np.flatnonzero((~eq).reshape(eq.shape[0], -1).any(axis=1))[0])
      first = row if la == 1 else row + 1
    va, vb = _as_values(a, code_a), _as_values(b, code_a)
    if va is not None and not eq.all():
      max_diff = max(max_diff, _max_abs_diff(va, vb))
  return {**out, "identical": same == n, "first_diff_step": first, "elements": n,
          "identical_elements": same, "identical_element_fraction": same / n if n else 1.0,
          "identical_bit_fraction": same_bits / (n * bits_per) if n else 1.0,
          "max_abs_diff": max_diff}


def loss_difference(loss_a: np.ndarray, loss_b: np.ndarray) -> dict:
  """Largest |loss_a − loss_b| over steps 1..T (NaN in both counts as equal)."""
  a, b = (np.asarray(x, np.float64)[1:] for x in (loss_a, loss_b))
  with np.errstate(invalid="ignore", over="ignore"):
    d = np.abs(a - b)
  d = np.where(np.isnan(a) & np.isnan(b), 0.0, np.where(np.isnan(d), np.inf, d))
  if not d.size:
    return {"max_abs_diff": None, "step": None, "steps_differing": 0}
  i = int(np.argmax(d))
  return {"max_abs_diff": float(d[i]), "step": i + 1 if d[i] > 0 else None,
          "steps_differing": int((d > 0).sum())}


def freeze_statistics(summary: dict) -> dict:
  """The freeze figures a comparison reports, from `analyze`'s summary."""
  fc, st = summary.get("fimbulwinter_check") or {}, summary.get("stillness") or {}
  gf, ff = summary.get("global_freeze") or {}, summary.get("frozen_fraction") or {}
  out = {"global_last_motion": fc.get("global_last_motion"),
         "median_freeze": fc.get("median_freeze"), "earliest_freeze": fc.get("earliest_freeze"),
         "stillness_runs": st.get("count"), "longest_stillness": (st.get("runs") or [None])[0],
         "global_frozen_steps": gf.get("frozen_steps"), "freeze_thaw_cycles": gf.get("cycles")}
  for k, v in (ff.get("milestones") or {}).items():
    out[f"frozen_{k}"] = v
  return out


def compare(path_a: str, path_b: str, *, block_steps: Optional[int] = None) -> dict:
  """Compares two runs of one config (two run folders or trajectory files).

  Over the steps both have: the first step where W (and every other per-step
  key) differs, the fraction of identical elements and bits per key, the
  largest |loss difference|, and the freeze statistics of each with their
  difference (B − A). Also both runs' backend facts from metadata.json.

  Returns:
    dict: a, b (file, steps, run info), steps_compared, keys (compare_key
    results, common keys in A's order), only_in_a, only_in_b, loss,
    freeze {a, b, diff}, identical (every common key bitwise equal over the
    common steps), first_difference ({key, step} of the earliest, or None).
  """
  ta, tb = open_trajectory(path_a), open_trajectory(path_b)
  try:
    T = min(ta.steps, tb.steps)
    ka, kb = ta.reader.keys(), tb.reader.keys()
    keys = [compare_key(ta.reader, tb.reader, k, ta.steps, tb.steps) for k in ka if k in kb]
    loss = None
    if ta.loss_key and tb.loss_key:
      loss = loss_difference(ta.reader.rows(ta.loss_key, 0, T + 1),
                             tb.reader.rows(tb.loss_key, 0, T + 1))
    info = lambda t: {"file": os.path.abspath(t.path), "steps": t.steps, "rows": t.n_rows,
                      **run_info(t.metadata)}
    a_info, b_info = info(ta), info(tb)
  finally:
    ta.reader.close()
    tb.reader.close()
  fa = freeze_statistics(analyze(path_a, block_steps=block_steps, max_steps=T)[0])
  fb = freeze_statistics(analyze(path_b, block_steps=block_steps, max_steps=T)[0])
  number = lambda x: isinstance(x, (int, float))
  diff = {k: fb[k] - fa[k] if number(fa[k]) and number(fb.get(k)) else None for k in fa}
  firsts = [(k["first_diff_step"], k["key"]) for k in keys if k.get("first_diff_step") is not None]
  first = min(firsts) if firsts else None
  return {
      "a": a_info, "b": b_info, "steps_compared": T, "keys": keys,
      "only_in_a": [k for k in ka if k not in kb], "only_in_b": [k for k in kb if k not in ka],
      "loss": loss, "freeze": {"a": fa, "b": fb, "diff": diff},
      "identical": all(k["identical"] is not False for k in keys) and bool(keys),
      "first_difference": None if first is None else {"step": first[0], "key": first[1]},
  }
