"""`run.py --detect=RUN`: Magikarp's detector scored against a run's true dead set.

For each step asked (default 0, 100, 500, 1,000 and the run's last), the run's
token table comes from its checkpoint, its init, or an exact replay from the
checkpoint before (`training.replay`); `analysis.detect` ranks every token and
scores the ranking against the dead set the run recorded (its `dead_mask`).
Everything is computed before anything is written; then detect.json and
detect.png go into --analysis_dir (default: the run folder), atomically, and a
folder holding such files that jaxdt did not write is refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np

from jaxdt.analysis import copy_motion as copy_motion_lib
from jaxdt.analysis import detect as detect_lib
from jaxdt.io import hosts
from jaxdt.io import tensorfile
from jaxdt.report import outputs
from jaxdt.report import plots
from jaxdt.training import replay

DETECT_FILE = "detect.json"
DETECT_KEYS = ("run", "indicator", "reference", "steps")
DEFAULT_STEPS = (0, 100, 500, 1000, 2000)


def default_steps(last: int) -> tuple:
  """DEFAULT_STEPS inside a run of `last` steps, and `last` itself."""
  return tuple(sorted({s for s in DEFAULT_STEPS if s <= last} | {last}))


def _dead_mask(folder: str) -> np.ndarray:
  """The dead set a finished run recorded (its `dead_mask`), refused when it is empty."""
  _, cfg = replay.run_config(folder)
  with tensorfile.TrajectoryReader(os.path.join(folder, cfg.store.trajectory_name)) as reader:
    dead_mask = np.asarray(reader.read("dead_mask"), bool)
  if dead_mask.shape != (cfg.model.vocab_size,) or not dead_mask.any():
    raise ValueError(f"{folder}'s dead_mask has no dead rows for a vocabulary of "
                     f"{cfg.model.vocab_size}; the detector and the copy motion need a dead set")
  return dead_mask


def copy_motion(folder: str, start: int, stop: int,
                log: Callable[[str], None] = print) -> copy_motion_lib.CopyMotion:
  """Did the dead rows' bf16 copy change between steps `start` and `stop` of finished run
  `folder` (`analysis.copy_motion`; states as `scores` gets them)?"""
  dead_mask = _dead_mask(folder)
  a, b = replay.states_at(folder, (start, stop), log)
  return copy_motion_lib.copy_motion(replay.embedding(a.state)[dead_mask],
                                     replay.embedding(b.state)[dead_mask])


def scores(folder: str, steps: Sequence[int], log: Callable[[str], None] = print) -> list:
  """[{step, source, k, scored, precision, recall, average_precision, chance,
  state_bytes_per_param}] of finished run `folder` at `steps` (refused in one line: see
  `training.replay.states_at`)."""
  dead_mask = _dead_mask(folder)
  reference = detect_lib.reference_rows(np.flatnonzero(dead_mask))
  rows = []
  for at in replay.states_at(folder, steps, log):
    sc = detect_lib.score(replay.embedding(at.state), dead_mask, reference)
    rows.append({"step": at.step, "source": at.source, **dataclasses.asdict(sc),
                 "state_bytes_per_param": replay.bytes_per_param(at.state)})
    log(f"step {at.step:>5}: precision = recall {sc.precision:.3f} at k={sc.k} (chance "
        f"{sc.chance:.3f}), average precision {sc.average_precision:.3f} ({at.source})")
  return rows


def detect(folder: str, out_dir: Optional[str] = None, steps: Optional[Sequence[int]] = None,
           log: Callable[[str], None] = print) -> dict:
  """Scores the detector on run `folder` at `steps`; writes detect.json and detect.png."""
  folder = os.path.abspath(folder)
  out_dir = out_dir or folder
  outputs.check_outputs(out_dir, (DETECT_FILE, plots.DETECTION_FILE), DETECT_FILE, DETECT_KEYS,
                        "--analysis_dir")
  meta, cfg = replay.run_config(folder)
  rows = scores(folder, default_steps(cfg.steps) if not steps else tuple(steps), log)
  dead_mask = _dead_mask(folder)
  result = {
      "run": folder, "experiment": cfg.name, "precision_policy": cfg.precision, "seed": cfg.seed,
      "indicator": "cosine distance to the reference rows' mean, unembedding with its first "
                   "principal component removed (Land & Bartolo 2024, tied embeddings)",
      "reference": {"rows": detect_lib.reference_rows(np.flatnonzero(dead_mask)).tolist(),
                    "seed": detect_lib.REFERENCE_SEED,
                    "fraction": detect_lib.REFERENCE_FRACTION, "held_out": True},
      "dead": int(dead_mask.sum()), "vocab": int(dead_mask.size), "steps": rows,
      "arithmetic_fingerprint": hosts.host_of(meta).get("arithmetic_fingerprint")}
  os.makedirs(out_dir, exist_ok=True)
  path = outputs.write_json(os.path.join(out_dir, DETECT_FILE), result)
  png = plots.plot_detection(rows, rows[0]["chance"], os.path.join(out_dir, plots.DETECTION_FILE))
  log(f"wrote {path}" + (f" and {png}" if png else ""))
  return result
