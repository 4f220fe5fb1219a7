"""Comparing two runs of one config (two run folders or trajectory files).

`compare(a, b)` compares every key both files hold, bitwise, over the steps
both have (`compare_key`: first differing step, identical elements and bits,
largest |difference|), the loss (`loss_difference`) and the freeze
statistics of each run (`freeze_statistics` of `metrics.measure`), and
reports both runs' backend facts from metadata.json. `jaxdt.report.text` prints it.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np

from jaxdt.analysis import metrics
from jaxdt.analysis import stream
from jaxdt.analysis import trajectory
from jaxdt import probes
from jaxdt.io import configdiff
from jaxdt.numerics import lattice

def _key_layout(reader, key: str, steps: int) -> Optional[int]:
  """1 if `key` has T+1 rows (row t = step t), 0 if T rows (row t-1 = step t), None if static."""
  shape = reader.shape(key)
  if probes.kind_of(key) in ("static", "final") or not shape:
    return None
  return 1 if shape[0] == steps + 1 else 0 if shape[0] == steps else None


def _as_values(a: np.ndarray, code: str) -> Optional[np.ndarray]:
  """Values for |difference|: bf16 bits (U16/BF16), floats and integers as f64; None for bool."""
  if code in ("U16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U32", "U64"):
    return trajectory.np_as_float64(a, code)
  return None


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max |a − b|; NaN against NaN is 0, NaN against a number is inf."""
  with np.errstate(invalid="ignore", over="ignore"):
    d = np.abs(a - b)
  d = np.where(np.isnan(a) & np.isnan(b), 0.0, np.where(np.isnan(d), np.inf, d))
  return float(d.max()) if d.size else 0.0


class Block(NamedTuple):
  """Aligned rows of one tensor in two files, with their bit patterns."""

  start: Optional[int]  # the block's first row; None for a static tensor read whole
  a: np.ndarray
  b: np.ndarray
  bits_a: np.ndarray  # unsigned-integer views of a and b (bool as uint8)
  bits_b: np.ndarray

  @property
  def differs(self) -> np.ndarray:
    """Elementwise: do the two files hold other bits here."""
    return self.bits_a != self.bits_b

  def first_differing_row(self) -> Optional[int]:
    """The first row (absolute, from `start`) holding a differing element, None if none."""
    rows = self.differs.reshape(self.a.shape[0], -1).any(axis=1)
    return None if not rows.any() else (self.start or 0) + int(np.argmax(rows))


def bit_blocks(ra, rb, key: str, rows: Optional[int], block_bytes: int = stream.BLOCK_BYTES):
  """The one bitwise comparator: rows [0, rows) of `key` in both readers, block by block.

  `rows=None` reads a static tensor whole (one block, start None). Blocks hold
  about `block_bytes` of f64 values per file, so memory stays flat whatever
  the run's length. Callers (`compare_key` here, `verify.verify_key`) keep
  their own statistics over the blocks.
  """
  if rows is None:
    spans = [(None, None)]
  else:
    per = max(1, block_bytes // max(1, int(np.prod(ra.shape(key)[1:], dtype=np.int64)) * 8))
    spans = [(s, min(rows, s + per)) for s in range(0, rows, per)]
  for s, e in spans:
    a = ra.read(key) if s is None else ra.rows(key, s, e)
    b = rb.read(key) if s is None else rb.rows(key, s, e)
    ua = lattice.np_bits(np.ascontiguousarray(a.view(np.uint8) if a.dtype == np.bool_ else a))
    ub = lattice.np_bits(np.ascontiguousarray(b.view(np.uint8) if b.dtype == np.bool_ else b))
    yield Block(s, a, b, ua, ub)


def compare_key(ra, rb, key: str, steps_a: int, steps_b: int,
                block_bytes: int = stream.BLOCK_BYTES) -> dict:
  """Bitwise comparison of one tensor present in both files.

  Per-step tensors are compared over the common steps, in blocks; static ones
  whole. Returns: key, kind ("per-step" | "static"), comparable (False with a
  reason when dtype or shape differ), identical, first_diff_step (per-step:
  the 1-based step, 0 for row 0 of a T+1-row tensor; static: None),
  elements, identical_elements, identical_element_fraction,
  identical_bit_fraction (1 − popcount(a XOR b) / bits), max_abs_diff (numbers
  and bf16 bits; NaN vs NaN counts as equal). A tracker's final value
  (`probes.kind_of` says "final") of runs of different length is not compared:
  identical is None.
  """
  code_a, code_b = ra.raw_dtype(key), rb.raw_dtype(key)
  sa, sb = ra.shape(key), rb.shape(key)
  la, lb = _key_layout(ra, key, steps_a), _key_layout(rb, key, steps_b)
  out = {"key": key, "kind": "static" if la is None else "per-step", "comparable": True}
  if probes.kind_of(key) == "final" and steps_a != steps_b:
    return {**out, "comparable": False, "identical": None,
            "reason": f"final value of a {steps_a}-step and a {steps_b}-step run"}
  if code_a != code_b:
    return {**out, "comparable": False, "identical": False, "reason": f"dtype {code_a} vs {code_b}"}
  if la != lb or sa[1:] != sb[1:] or (la is None and sa != sb):
    return {**out, "comparable": False, "identical": False,
            "reason": f"shape {list(sa)} vs {list(sb)}"}
  rows = None if la is None else min(steps_a, steps_b) + la
  n = same = same_bits = 0
  first, max_diff, bits_per = None, 0.0, None
  for blk in bit_blocks(ra, rb, key, rows, block_bytes):
    bits_per = blk.bits_a.dtype.itemsize * 8
    eq = ~blk.differs
    n += eq.size
    same += int(eq.sum())
    same_bits += eq.size * bits_per - int(np.bitwise_count(blk.bits_a ^ blk.bits_b).sum())
    if first is None and blk.start is not None and (row := blk.first_differing_row()) is not None:
      first = row if la == 1 else row + 1
    a, b = blk.a, blk.b
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


def freeze_statistics(summary) -> dict:
  """The freeze figures a comparison reports, from `metrics.measure`'s Summary."""
  get = lambda block, field: None if block is None else getattr(block, field)
  fc, st, gf, ff = (summary.fimbulwinter_check, summary.stillness, summary.global_freeze,
                    summary.frozen_fraction)
  out = {"global_last_motion": get(fc, "global_last_motion"),
         "median_freeze": get(fc, "median_freeze"), "earliest_freeze": get(fc, "earliest_freeze"),
         "stillness_runs": get(st, "count"),
         "longest_stillness": st.runs[0] if st is not None and st.runs else None,
         "global_frozen_steps": get(gf, "frozen_steps"), "freeze_thaw_cycles": get(gf, "cycles")}
  for k, v in (ff.milestones if ff is not None else {}).items():
    out[f"frozen_{k}"] = v
  return out


def _gemm_paths_differ(a: dict, b: dict) -> bool:
  """Both runs recorded their GEMM path and the operand dtypes differ."""
  pa, pb = a.get("gemm_path"), b.get("gemm_path")
  return bool(pa and pb) and pa.split()[0] != pb.split()[0]


def compare(path_a: str, path_b: str, *, block_steps: Optional[int] = None) -> dict:
  """Compares two runs of one config (two run folders or trajectory files).

  Over the steps both have: the first step where W (and every other per-step
  key) differs, the fraction of identical elements and bits per key, the
  largest |loss difference|, and the freeze statistics of each with their
  difference (B − A). Also both runs' backend facts from metadata.json.

  Returns:
    dict: a, b (file, steps, run info), steps_compared, keys (compare_key
    results, common keys in A's order), only_in_a, only_in_b, loss,
    freeze {a, b, diff}, config_differences (one line per config field that
    differs, input paths and chunk size aside; None without both configs),
    gemm_paths_differ (the runs' GEMMs read other operand dtypes, so f32 sums
    ran in other orders: their bits need not match),
    identical (every common key bitwise equal over the
    common steps), first_difference ({key, step} of the earliest, or None).
  """
  ta, tb = trajectory.open_trajectory(path_a), trajectory.open_trajectory(path_b)
  try:
    T = min(ta.steps, tb.steps)
    ka, kb = ta.reader.keys(), tb.reader.keys()
    keys = [compare_key(ta.reader, tb.reader, k, ta.steps, tb.steps) for k in ka if k in kb]
    loss = None
    if ta.loss_key and tb.loss_key:
      loss = loss_difference(ta.reader.rows(ta.loss_key, 0, T + 1),
                             tb.reader.rows(tb.loss_key, 0, T + 1))
    info = lambda t: {"file": os.path.abspath(t.path), "steps": t.steps, "rows": t.n_rows,
                      **trajectory.run_info(t.metadata)}
    a_info, b_info = info(ta), info(tb)
    ca, cb = ta.metadata.get("config"), tb.metadata.get("config")
    configs = (configdiff.config_differences(ca, cb, labels=("A has", "B has"))
               if isinstance(ca, dict) and isinstance(cb, dict) else None)
  finally:
    ta.reader.close()
    tb.reader.close()
  fa = freeze_statistics(metrics.measure(path_a, block_steps=block_steps, max_steps=T)[0])
  fb = freeze_statistics(metrics.measure(path_b, block_steps=block_steps, max_steps=T)[0])
  number = lambda x: isinstance(x, (int, float))
  diff = {k: fb[k] - fa[k] if number(fa[k]) and number(fb.get(k)) else None for k in fa}
  firsts = [(k["first_diff_step"], k["key"]) for k in keys if k.get("first_diff_step") is not None]
  first = min(firsts) if firsts else None
  return {
      "a": a_info, "b": b_info, "steps_compared": T, "keys": keys,
      "only_in_a": [k for k in ka if k not in kb], "only_in_b": [k for k in kb if k not in ka],
      "loss": loss, "freeze": {"a": fa, "b": fb, "diff": diff},
      "config_differences": configs,
      "gemm_paths_differ": _gemm_paths_differ(a_info, b_info),
      "identical": all(k["identical"] is not False for k in keys) and bool(keys),
      "first_difference": None if first is None else {"step": first[0], "key": first[1]},
  }
