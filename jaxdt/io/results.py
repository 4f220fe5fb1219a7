"""Reading a finished run: `open_result` refuses unfinished runs and verifies checksums.

Invariant 6 of the run-folder protocol (`rundir`): unfinished is never a
result. Readers (`--analyze`, `--compare`, `--summarize`, `--verify_against`)
open trajectories only through here.
"""

from __future__ import annotations

import os

from jaxdt.io import disk
from jaxdt.io import locks
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import tensorfile

METADATA_FILE = metadata_lib.METADATA_FILE


def open_result(path: str) -> tuple[tensorfile.TrajectoryReader, dict, list]:
  """Opens a trajectory file as a result: refuses unfinished runs, verifies checksums.

  Args:
    path: a `.safetensors` trajectory (ours or the lab's).

  Returns:
    (reader, metadata, notes): the reader checks the recorded SHA-256 of each
    tensor as it is read (call `reader.verify()` at the end of the pass);
    metadata is the metadata.json beside the file ({} if none); notes say
    what could not be verified.

  Raises:
    StoreError: a `.partial` file, a run whose metadata says unfinished, a
      size other than recorded, a header other than recorded.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if path.endswith(tensorfile.PARTIAL_SUFFIX):
    raise disk.StoreError(f"{path} is an unfinished trajectory (.partial); "
                           f"{locks.unfinished_advice(folder)}, then pass the finished file")
  meta_path = os.path.join(folder, METADATA_FILE)
  # A metadata.json that cannot be read is refused: it is what says finished or not.
  meta = metadata_lib.read_json_object(
      meta_path, fix="restore it from a copy, or move the .safetensors file to a folder of "
      "its own to analyse it unverified") or {}
  notes, digests = [], None
  config = meta.get("config")
  ours = isinstance(config, dict)
  name = ((config or {}).get("store") or {}).get("trajectory_name") if ours else None
  if ours and name == os.path.basename(path):
    if meta.get("completed") is not True:
      raise disk.StoreError(f"{path} belongs to an unfinished run ({METADATA_FILE} says "
                             f"completed: false); {locks.unfinished_advice(folder)}")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size is not None and meta.get("trajectory_bytes") != size:
      raise disk.StoreError(f"{path} is {size:,} bytes but its run recorded "
                             f"{meta.get('trajectory_bytes')!r}; the file is damaged, re-run it "
                             "or restore it from a copy")
    digests = meta.get("tensor_sha256")
    if digests is None:
      notes.append("no SHA-256 recorded (an older jaxdt run): integrity not verified")
  elif ours:
    notes.append(f"{METADATA_FILE} beside it describes {name}, not this file: integrity not "
                 "verified")
  else:
    notes.append("not a jaxdt run (no jaxdt metadata.json): integrity not verified")
  return tensorfile.TrajectoryReader(path, digests=digests), meta, notes
