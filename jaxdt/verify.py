"""Verification: a short run checked bit for bit against a reference trajectory.

Verification (the lab's Thimble 9 VERIFICATION_MODE, docs/experiments.md): a short run of an experiment
is compared bit for bit with the first rows of a reference trajectory that the
same training produced (Thimble 9's first 1000 steps against Thimble 8). An
experiment declares it with `verification() -> Verification` in its module;
`verification_config` turns the production config into the short run, and
`compare` + `format_report` print the lab's report:

  ============================================================
  VERIFICATION: Comparing to Thimble 8
  ============================================================
  Thimble 9 W shape: torch.Size([1001, 3699, 64])
  Thimble 8 W subset shape: torch.Size([1001, 3699, 64])

  ✓ BITWISE IDENTICAL: Thimble 9 matches Thimble 8 exactly!

followed by our stricter check of every other key (the loss: bitwise, where
the lab only looked at it on a W mismatch, within 1e-5).

It reads trajectories row by row from disk (`tensorfile.TrajectoryReader`), so
memory stays at a few rows whatever the run length.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import numpy as np

from jaxdt.analysis import compare as compare_lib
from jaxdt.analysis import trajectory
from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import disk
from jaxdt.io import results
from jaxdt.io import tensorfile
from jaxdt.numerics import precision
from jaxdt.training import loop
from jaxdt import probes

RULE = "=" * 60
LOSS_RTOL = LOSS_ATOL = 1e-5  # the lab's torch.allclose tolerance (reported, not decisive)


class VerifyError(ValueError):
  """The reference cannot be compared with this run; the message is one line with the fix."""


@dataclasses.dataclass(frozen=True)
class Verification:
  """An experiment's verification mode (Thimble 9, docs/experiments.md: 1000 steps against Thimble 8)."""

  steps: int = 1000  # TOTAL_STEPS in verification mode
  checkpoint_steps: tuple = (0, 100, 500, 1000)  # the lab's verification checkpoints
  keys: tuple = ("W", "loss")  # compared bitwise; the first one gets the lab's report
  title: str = "Thimble 9"  # this run, as the report names it
  reference_title: str = "Thimble 8"  # the reference run
  subdir: str = "verification"  # the short run's folder inside --output_dir


def verification_config(cfg: config_lib.ExperimentConfig, spec: Verification,
                        steps: Optional[int] = None) -> config_lib.ExperimentConfig:
  """The short run: `spec.steps` (or `steps`) steps, the spec's checkpoints inside it.

  Args:
    cfg: the experiment's production config (flags already applied).
    spec: the experiment's Verification.
    steps: overrides spec.steps (run.py's --steps).

  Returns:
    cfg with steps and checkpoint_steps replaced; everything that decides the
    bits (model, optimizer, data, seed, precision) is unchanged.
  """
  steps = spec.steps if steps is None else steps
  cfg = config_lib.with_steps(cfg, steps, spec.checkpoint_steps)
  return dataclasses.replace(cfg, store=dataclasses.replace(
      cfg.store,
      notes=f"{spec.title} verification run ({steps} steps) against {spec.reference_title}."))


# --- Comparing trajectories --------------------------------------------------


class KeyResult(NamedTuple):
  """One key's comparison over its first `rows` rows."""

  key: str
  ours_shape: tuple
  reference_shape: tuple  # of the compared subset
  n_diff: int  # elements whose bits differ
  total: int
  first_diff_step: Optional[int]  # step of the first differing row, None if identical
  first_row_match: bool  # row 0 (step 0 for a series with an initial row)
  close: bool  # the lab's allclose(reference, ours, rtol=atol=1e-5)
  max_abs_diff: float
  max_abs_diff_step: int

  @property
  def identical(self) -> bool:
    return self.n_diff == 0


def _open(path: str, what: str) -> tensorfile.TrajectoryReader:
  """A finished trajectory (`results.open_result`: refuses unfinished runs, checks SHA-256)."""
  if not os.path.isfile(path):
    raise VerifyError(f"{what} {path} does not exist; pass --verify_against=PATH to a finished "
                      "reference trajectory (e.g. thimble_8_trajectory.safetensors)")
  try:
    return results.open_result(path)[0]
  except disk.StoreError as e:
    raise VerifyError(f"{what} is unusable: {e}") from None


def _verified(reader: tensorfile.TrajectoryReader, what: str) -> None:
  try:
    reader.verify()
  except disk.StoreError as e:
    raise VerifyError(f"{what}: {e}") from None


def check_reference(path: str, spec: Verification, expected: dict,
                    dead_indices: Optional[np.ndarray] = None) -> None:
  """Refuses a reference that cannot hold this run's rows (before any training).

  Args:
    path: the reference trajectory (e.g. thimble_8_trajectory.safetensors).
    spec: the verification; its keys must be in the reference.
    expected: {key: (dtype, shape)} of this run's file (`probes.Probes.file_specs`).
    dead_indices: this run's recorded dead rows; must equal the reference's
      `dead_indices` where it has one.

  Raises:
    VerifyError: missing or unreadable file, a missing key, another dtype or
      row shape, fewer rows than this run records, or other dead rows.
  """
  with _open(path, "--verify_against") as ref:
    for key in spec.keys:
      if key not in ref.keys():
        raise VerifyError(f"{path} has no {key!r} (it has {ref.keys()}); pass a "
                          f"{spec.reference_title} trajectory")
      dtype, shape = expected[key]
      got_dtype, got_shape = ref.dtype(key), ref.shape(key)
      if got_dtype != np.dtype(dtype) or got_shape[1:] != tuple(shape[1:]):
        raise VerifyError(
            f"{path}: {key!r} is {got_dtype} {list(got_shape)}, this run records {np.dtype(dtype)} "
            f"[T, {', '.join(map(str, shape[1:]))}]; pass a {spec.reference_title} trajectory "
            "made with the same model and data")
      if got_shape[0] < shape[0]:
        raise VerifyError(
            f"{path}: {key!r} has {got_shape[0]} rows, this run needs its first {shape[0]}; "
            "pass a longer reference or fewer --steps")
    if dead_indices is not None and "dead_indices" in ref.keys():
      theirs = ref.read("dead_indices")
      if not np.array_equal(np.asarray(theirs, np.int64), np.asarray(dead_indices, np.int64)):
        raise VerifyError(
            f"{path} records other dead rows ({theirs.size} ids) than this run "
            f"({len(dead_indices)} ids); pass a reference made from the same data")


def verify_key(ours: tensorfile.TrajectoryReader, ref: tensorfile.TrajectoryReader, key: str,
               first_step: int) -> KeyResult:
  """Compares `key` of `ours` with the same number of leading rows of `ref`, bit for bit.

  The bits come from the one comparator (`analysis.compare.bit_blocks`); the
  statistics are the lab's (its allclose and largest gap, reported beside).

  Args:
    ours: this run's trajectory.
    ref: the reference trajectory (at least as many rows).
    key: the tensor to compare.
    first_step: the step row 0 holds (0 with an initial row, else 1).

  Returns:
    The KeyResult (counts, first differing step, the lab's tolerance check).
  """
  shape = ours.shape(key)
  n = shape[0]
  code = ours.raw_dtype(key)
  n_diff, first_diff, first_row_match, close = 0, None, True, True
  max_diff, max_step = -1.0, first_step
  for blk in compare_lib.bit_blocks(ours, ref, key, n):
    start, a, b = blk.start, blk.a, blk.b
    diff = blk.differs
    n_diff += int(diff.sum())
    if start == 0:
      first_row_match = not bool(diff.reshape(len(a), -1)[0].any())
    if first_diff is None and (row := blk.first_differing_row()) is not None:
      first_diff = first_step + row
    fa, fb = trajectory.np_as_float64(a, code), trajectory.np_as_float64(b, code)
    close &= bool(np.allclose(fb, fa, rtol=LOSS_RTOL, atol=LOSS_ATOL))
    gap = np.abs(fb - fa).reshape(len(a), -1).max(axis=1)
    if gap.size and np.nanmax(gap, initial=-1.0) > max_diff:
      i = int(np.nanargmax(gap)) if not np.isnan(gap).all() else 0
      max_diff, max_step = float(gap[i]), first_step + start + i
  return KeyResult(key, tuple(shape), (n,) + tuple(ref.shape(key)[1:]), n_diff,
                   int(np.prod(shape, dtype=np.int64)), first_diff, first_row_match, close,
                   max(max_diff, 0.0), max_step)


def compare(ours_path: str, reference_path: str, spec: Verification, steps: int) -> tuple:
  """Every key of the spec, ours against the reference's leading rows.

  Args:
    ours_path: this run's finished trajectory.
    reference_path: the reference trajectory.
    spec: the verification (which keys).
    steps: this run's step count (a key with steps + 1 rows starts at step 0).

  Returns:
    A tuple of KeyResult, in spec.keys order.
  """
  ours = _open(ours_path, "this run's trajectory")
  with ours, _open(reference_path, "--verify_against") as ref:
    out = []
    for key in spec.keys:
      if ref.shape(key)[0] < ours.shape(key)[0] or ref.dtype(key) != ours.dtype(key):
        raise VerifyError(f"{reference_path}: {key!r} is {ref.dtype(key)} {list(ref.shape(key))}, "
                          f"cannot hold this run's {ours.dtype(key)} {list(ours.shape(key))}")
      first = 0 if ours.shape(key)[0] == steps + 1 else 1
      out.append(verify_key(ours, ref, key, first))
    _verified(ours, "this run's trajectory")
    _verified(ref, "--verify_against")
    return tuple(out)


def passed(results) -> bool:
  """True when every compared key is bitwise identical."""
  return all(r.identical for r in results)


def _torch_size(shape) -> str:
  return f"torch.Size([{', '.join(str(n) for n in shape)}])"


def _label(key: str) -> str:
  return "Loss" if key == "loss" else key


def format_report(results, spec: Verification) -> str:
  """The lab's VERIFICATION report (the lab's Thimble 9 notebook), then our bitwise check of the other keys.

  Args:
    results: `compare`'s KeyResults; the first is the main key (W).
    spec: names the two runs.

  Returns:
    The report text (no trailing newline).
  """
  main, others = results[0], results[1:]
  loss = next((r for r in others if r.key == "loss"), None)
  lines = [RULE, f"VERIFICATION: Comparing to {spec.reference_title}", RULE,
           f"{spec.title} {main.key} shape: {_torch_size(main.ours_shape)}",
           f"{spec.reference_title} {main.key} subset shape: {_torch_size(main.reference_shape)}",
           ""]
  if main.identical:
    lines.append(f"✓ BITWISE IDENTICAL: {spec.title} matches {spec.reference_title} exactly!")
  else:
    lines.append(f"✗ MISMATCH: {main.n_diff:,} / {main.total:,} elements differ "
                 f"({main.n_diff / main.total:.4%})")
    lines.append(f"First difference at step: {main.first_diff_step}")
    lines.append(f"Step 0 (initialization) matches: {main.first_row_match}")
    if loss is not None:
      lines.append(f"Loss values match (within tolerance): {loss.close}")
      if not loss.close:
        lines.append(f"Max loss difference at step {loss.max_abs_diff_step}: "
                     f"{loss.max_abs_diff:.6f}")
  for r in others:
    if r.identical:
      lines.append(f"{_label(r.key)} values bitwise identical: True ({r.total:,} values)")
    else:
      lines.append(f"{_label(r.key)} values bitwise identical: False ({r.n_diff:,} / "
                   f"{r.total:,} differ, first at step {r.first_diff_step}; max |diff| "
                   f"{r.max_abs_diff:.6g} at step {r.max_abs_diff_step})")
  lines.append("")
  span = f"steps 0..{main.ours_shape[0] - 1}" if main.ours_shape else ""
  if passed(results):
    lines.append(f"Verification passed: {', '.join(r.key for r in results)} bitwise identical "
                 f"over {span}.")
  else:
    bad = ", ".join(f"{r.key} ({r.n_diff:,} differing, first at step {r.first_diff_step})"
                    for r in results if not r.identical)
    lines.append(f"Verification FAILED: {bad} differ.")
  return "\n".join(lines)


def run(cfg: config_lib.ExperimentConfig, spec: Verification, reference: Optional[str],
        out_dir: str, *, resume: bool = False, progress: bool = True) -> tuple:
  """Checks the reference, trains the short run into `out_dir`, compares.

  Args:
    cfg: the verification config (`verification_config`).
    spec: the experiment's Verification.
    reference: the reference trajectory (--verify_against).
    out_dir: the short run's folder (its trajectory, metadata and checkpoints
      are kept there, so a mismatch can be inspected).
    resume: continue an interrupted verification run.
    progress: show the progress bar.

  Returns:
    (report text, passed).

  Raises:
    VerifyError: no reference given, or one that cannot be compared (checked
      before any training).
  """
  if not reference:
    raise VerifyError(f"--verification needs --verify_against=PATH to a "
                      f"{spec.reference_title} trajectory")
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  n_rows = corpus.n_dead if cfg.probes.rows == "dead" else cfg.model.vocab_size
  dims = probes.Dims(rows=n_rows, hidden=cfg.model.hidden_dim,
                     param_dtype=precision.get_policy(cfg.precision).param_dtype)
  expected = probes.of_config(cfg).file_specs(dims, cfg.steps)
  missing = [k for k in spec.keys if k not in expected]
  if missing:
    raise VerifyError(f"{cfg.name} does not record {missing}, which its verification compares")
  check_reference(reference, spec, expected, corpus.dead_indices)
  result = loop.train(cfg, out_dir, resume=resume, progress=progress)
  results = compare(result.trajectory, reference, spec, cfg.steps)
  return format_report(results, spec), passed(results)
