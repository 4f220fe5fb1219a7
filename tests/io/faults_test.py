"""Fault injection against the run-folder protocol (jaxdt/io/rundir.py).

Every fault ends, after `--resume`, in the uninterrupted run's exact bytes, and
no fault ever leaves a finished-looking file with other bytes:
  * an exception raised at every instant between two writes of the protocol,
  * SIGKILL right after every checkpoint marker (a chain of resumed processes),
  * SIGKILL at 4 seeded random instants inside the run (chains of processes),
checked after every fault by `_no_lie`.
"""

import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import pytest

from conftest import tiny_config

from jaxdt import config as config_lib
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import metadata
from jaxdt.io import results
from jaxdt.io import tensorfile
from jaxdt.training import loop

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = (0, 1, 5, 9, 12)  # step 0, mid-chunk ones, and the last step
# Random kills on top of the exception at every protocol instant (in-process) and the
# kill after every checkpoint marker: each costs a process start, trace and compile.
KILLS = 4


class InjectedFault(Exception):
  pass


def _config(tiny_data):
  cfg = tiny_config(tiny_data, steps=12)
  return dataclasses.replace(cfg, store=dataclasses.replace(
      cfg.store, checkpoint_steps=CHECKPOINTS, chunk_steps=4))


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
  """The uninterrupted run's bytes and the protocol's instants, in order."""
  cfg = _config(tiny_data)
  points = []
  disk.FAULT_HOOK = points.append
  try:
    result = loop.train(cfg, str(tmp_path_factory.mktemp("ref")), progress=False,
                         log=lambda s: None)
  finally:
    disk.FAULT_HOOK = None
  return cfg, _bytes(result.trajectory), points


def _no_lie(cfg, out, ref_bytes):
  """The folder is finished with the reference bytes, or every reader refuses it.

  Returns:
    True when finished.
  """
  path = os.path.join(out, cfg.store.trajectory_name)
  if metadata.is_complete(out, cfg.store.trajectory_name):
    assert _bytes(path) == ref_bytes, "a finished-looking file with other bytes"
    reader, _, _ = results.open_result(path)
    with reader:
      assert reader.verify()
    return True
  if os.path.exists(path):
    with pytest.raises(disk.StoreError):
      results.open_result(path)
  with pytest.raises(disk.StoreError, match="unfinished"):
    results.open_result(path + tensorfile.PARTIAL_SUFFIX)
  return False


def test_the_protocol_has_the_instants_we_inject_at(reference):
  _, _, points = reference
  assert points[:3] == ["metadata_written", "partial_created", "initial_rows_written"]
  assert points[-5:] == ["final_tensors_written", "sealed", "final_metadata_written",
                         "commit_renamed", "committed"]
  # Each checkpoint: rows fsync'd, then arrays, then the marker.
  assert points.count("checkpoint_written") == len(CHECKPOINTS)
  for i, p in enumerate(points):
    if p == "checkpoint_written":
      assert points[i - 3:i] == ["rows_synced", "checkpoint_arrays_written",
                                 "checkpoint_marker_written"]


def test_a_failure_between_any_two_writes_resumes_to_identical_bytes(reference, tmp_path):
  cfg, ref_bytes, points = reference
  for k in range(len(points)):
    out = str(tmp_path / f"fault_{k:02d}_{points[k]}")
    calls = []

    def hook(point, k=k, calls=calls):
      calls.append(point)
      if len(calls) == k + 1:
        raise InjectedFault(point)

    disk.FAULT_HOOK = hook
    try:
      with pytest.raises(InjectedFault):
        loop.train(cfg, out, progress=False, log=lambda s: None)
    finally:
      disk.FAULT_HOOK = None
    if _no_lie(cfg, out, ref_bytes):
      assert points[k] in ("commit_renamed", "committed"), (
          f"finished before its commit point ({points[k]})")
      continue
    result = loop.train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert _bytes(result.trajectory) == ref_bytes, f"fault at {points[k]} (#{k})"
    assert _no_lie(cfg, out, ref_bytes)


def _spawn(cfg, out, resume, kill_at=None, times=None):
  args = os.path.join(out + ".args.json")
  with open(args, "w", encoding="utf-8") as f:
    json.dump({"config": config_lib.to_json(cfg), "out_dir": out, "resume": resume,
               "kill_at": kill_at, "times": times}, f)
  return subprocess.Popen([sys.executable, os.path.join(HERE, "fault_runner.py"), args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_right_after_every_checkpoint_marker(reference, tmp_path):
  cfg, ref_bytes, _ = reference
  out = str(tmp_path / "run")
  for i in range(len(CHECKPOINTS)):
    # Each process resumes from the marker the previous one died after, and dies
    # right after writing the next one.
    proc = _spawn(cfg, out, resume=i > 0, kill_at="checkpoint_written#1")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == -9, text
    assert not _no_lie(cfg, out, ref_bytes)
    assert checkpoints.intact_checkpoints(os.path.join(out, "checkpoints"))[0][0] == CHECKPOINTS[i]
  proc = _spawn(cfg, out, resume=True)
  text, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, text
  assert _no_lie(cfg, out, ref_bytes)


def test_sigkill_at_random_instants(reference, tmp_path):
  cfg, ref_bytes, _ = reference
  # Where the run's writes happen in a process's life (imports and compile come first).
  times = str(tmp_path / "times.txt")
  proc = _spawn(cfg, str(tmp_path / "calibration"), resume=False, times=times)
  assert proc.wait(timeout=300) == 0, proc.stdout.read()
  stamps = [float(line.split()[0]) for line in open(times)]
  first, last = stamps[0], stamps[-1]
  rng = random.Random(20261201)
  kills, chain, finished, spawned = 0, 0, 0, 0
  while kills < KILLS:
    out = str(tmp_path / f"chain_{chain}")
    resume = False
    while True:
      spawned += 1
      assert spawned <= 8 * KILLS, f"only {kills} kills landed in {spawned} processes"
      proc = _spawn(cfg, out, resume=resume)
      delay = rng.uniform(0.8 * first, last + 0.2)
      time.sleep(delay)
      if proc.poll() is None:
        proc.kill()
        kills += 1
      text, _ = proc.communicate(timeout=300)
      assert proc.returncode in (0, -9), text
      if _no_lie(cfg, out, ref_bytes):
        finished += 1
        break
      resume = True
    chain += 1
  assert finished == chain and kills >= KILLS
