"""Run metadata (`metadata.json`) and the completion marker.

Convention: while a run is being written its metadata says `"completed":
false`; the trajectory is `<name>.partial` until it is sealed and renamed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from jaxdt.io import disk
from jaxdt.io import tensorfile


METADATA_FILE = "metadata.json"


# --- Run metadata and the completion marker ---------------------------------


def json_ready(x: Any) -> Any:
  """A JSON-ready copy: numpy/JAX scalars and arrays to Python values and lists,
  tuples to lists, non-finite floats to None (so the JSON is strict)."""
  if isinstance(x, dict):
    return {str(k): json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return json_ready(np.asarray(x).tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x

def write_metadata(run_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> str:
  """Writes `run_dir/metadata.json` atomically (json, indent=2).

  Convention: while running, `"completed": false`; only after the trajectory
  writer's `finalize()`, `"completed": true` with `"trajectory_bytes"` set to
  the final file size. `is_complete` checks exactly that.

  Args:
    run_dir: the run's output directory (created if missing).
    metadata: JSON-ready dict (numpy/JAX scalars and arrays are converted).

  Returns:
    The path written.
  """
  run_dir = os.fspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, METADATA_FILE)
  disk.atomic_write_text(path, json.dumps(json_ready(dict(metadata)), indent=2, allow_nan=False) + "\n")
  return path


def read_metadata(run_dir: str | os.PathLike) -> dict:
  """Reads `run_dir/metadata.json`; StoreError if it is missing or unreadable."""
  path = os.path.join(os.fspath(run_dir), METADATA_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise disk.StoreError(f"{path} not found; is {run_dir} a run directory?") from None
  except ValueError:
    raise disk.StoreError(f"{path} is not valid JSON; re-run or repair it") from None


def is_complete(run_dir: str | os.PathLike, trajectory_name: str) -> bool:
  """Whether a run finished: final file, `"completed": true`, matching size.

  Args:
    run_dir: the run's output directory.
    trajectory_name: file name of the trajectory, e.g. "crucible_1_trajectory.safetensors".

  Returns:
    True only if `run_dir/trajectory_name` exists (not just its `.partial`),
    metadata.json has `"completed": true` and `"trajectory_bytes"` equal to the
    file's size, and the file's header describes exactly that many bytes.
  """
  path = os.path.join(os.fspath(run_dir), trajectory_name)
  try:
    meta = read_metadata(run_dir)
    size = os.path.getsize(path)
  except (disk.StoreError, OSError):
    return False
  if meta.get("completed") is not True or meta.get("trajectory_bytes") != size:
    return False
  try:
    tensorfile.TrajectoryReader(path).close()  # the header must tile the file exactly
  except disk.StoreError:
    return False
  return True


def read_json_object(path: str) -> Optional[dict]:
  """A JSON object file (None if missing); StoreError if it is not a JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except FileNotFoundError:
    return None
  except (UnicodeDecodeError, ValueError):
    raise disk.StoreError(f"{path} is unreadable (not JSON); this folder's run cannot be "
                           "trusted: choose another --output_dir") from None
  if not isinstance(out, dict):
    raise disk.StoreError(f"{path} is not a JSON object; choose another --output_dir")
  return out
