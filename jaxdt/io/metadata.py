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
from jaxdt.io import untrusted


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


# The kinds of the metadata.json keys readers use (`untrusted.check`): a hostile
# or damaged file is refused in one line here, so no reader meets a list where
# an object belongs. Absent and null keys pass (older runs, the lab's runs).
_HOST = {"cpu_model": str, "cpu_features": list, "cpu_features[]": str, "gemm_path": str,
         "arithmetic_fingerprint": str}
METADATA_SCHEMA = {
    "config": dict, "config.name": str, "config.seed": int, "config.data_seed": int,
    "config.steps": int, "config.precision": str, "config.optim": dict,
    "config.optim.learning_rate": float, "config.optim.weight_decay": float,
    "config.store": dict, "config.store.trajectory_name": str,
    "config.model": dict, "config.data": dict, "config.probes": dict,
    "completed": bool, "trajectory_bytes": int, "trajectory_sha256": str,
    "tensor_sha256": dict, "tensor_sha256.*": str, "sweep": dict, "sweep.member": int,
    "framework": str, "experiment": str, "date": str, "xla_flags": str, "device": str,
    "motion_threshold": float, "diverged_at_step": int, "learning_rate": float,
    "beta1": float, "beta2": float, "epsilon": float, "weight_decay": float,
    "wall_time_s": float, "final_loss": float, "global_last_motion": int,
    "fimbulwinter_duration": int, "steps_completed": int, "total_steps": int,
    "data_files": dict, "host": dict, "hosts": list, "hosts[]": dict, "hosts[].from_step": int,
    **_HOST, **{f"host.{k}": v for k, v in _HOST.items()},
    **{f"hosts[].{k}": v for k, v in _HOST.items()},
}


def read_metadata(run_dir: str | os.PathLike) -> dict:
  """Reads `run_dir/metadata.json` through `untrusted` (bounded, strict, `METADATA_SCHEMA`).

  Raises:
    StoreError: missing, unreadable, or not a run's metadata (one line).
  """
  path = os.path.join(os.fspath(run_dir), METADATA_FILE)
  if not os.path.lexists(path):
    raise disk.StoreError(f"{path} not found; is {run_dir} a run directory?")
  return untrusted.read_object(path, "re-run or repair it", schema=METADATA_SCHEMA)


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


def read_json_object(path: str, schema: Optional[Mapping[str, Any]] = None,
                     fix: str = "this folder's run cannot be trusted: choose another "
                                "--output_dir") -> Optional[dict]:
  """A JSON object file through `untrusted` (None if missing), checked against `schema`
  (`METADATA_SCHEMA` for a file named metadata.json); StoreError (ending in `fix`) if it
  is not one."""
  if schema is None and os.path.basename(path) == METADATA_FILE:
    schema = METADATA_SCHEMA
  return untrusted.read_object(path, fix, schema=schema, missing_ok=True)
