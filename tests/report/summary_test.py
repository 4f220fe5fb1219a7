"""`run.py --summarize`: figures recounted with plain numpy, groups, and refused inputs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import single_trace, tiny_config

from jaxdt.io import tensorfile
from jaxdt.report import summary as summary_lib
from jaxdt.training import loop
from jaxdt.training import runs
from jaxdt.training import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def sweep_root(tiny_data, tmp_path_factory):
  """A 2-member seed sweep of tiny crucible1 (30 steps)."""
  root = str(tmp_path_factory.mktemp("seeds"))
  cfg = single_trace(tiny_config(tiny_data, steps=30))
  sweep.train_sweep(cfg, "seed=42,7", root, runs.Options(progress=False), log=lambda s: None)
  return root


@pytest.fixture(scope="module")
def solo(tiny_data, tmp_path_factory):
  cfg = single_trace(tiny_config(tiny_data, steps=30, seed=3))
  return loop.train(cfg, str(tmp_path_factory.mktemp("solo") / "run"), **QUIET)


def recount(path: str) -> dict:
  """The figures from the raw file, with numpy only (the lab's formulas)."""
  meta = json.load(open(os.path.join(path, "metadata.json")))
  with tensorfile.TrajectoryReader(os.path.join(path, meta["config"]["store"]["trajectory_name"])) as r:
    w = r.read("W").astype(np.uint32)
    loss = r.read("loss")
  f = lambda b: (b << 16).view(np.float32)
  e = (w >> 7) & 0xFF
  ulp = np.ldexp(np.float32(1), np.maximum(e, 1).astype(np.int32) - 134).astype(np.float32)
  dwp = (f(w[1:]) - f(w[:-1])) / ulp[:-1]
  moving = np.sqrt((dwp.astype(np.float64) ** 2).sum(-1)) >= 0.1  # [T, n]
  n = moving.shape[1]
  frozen = (~moving).sum(1)
  first = lambda p: next((t + 1 for t in range(len(frozen)) if frozen[t] * 100 >= p * n), None)
  still, runs_ = False, 0
  for m in moving.any(1):
    runs_ += (not m) and not still
    still = not m
  last = np.where(moving.any(0), moving.shape[0] - np.argmax(moving[::-1], axis=0), -1)
  return {"frozen_50": first(50), "frozen_90": first(90), "frozen_99": first(99),
          "frozen_100": first(100), "global_last_motion": int(last.max()),
          "stillness_runs": runs_, "final_loss": float(loss[-1])}


def test_figures_equal_a_plain_numpy_recount(sweep_root, solo, tmp_path):
  out = str(tmp_path / "out")
  got = summary_lib.summarize([sweep_root, solo.run_dir], out, echo=lambda s: None)
  folders = summary_lib.run_folders(sweep_root) + [solo.run_dir]
  assert [r["path"] for r in got["runs"]] == folders
  for row, folder in zip(got["runs"], folders):
    assert {k: row[k] for k in summary_lib.FIGURES} == recount(folder), folder
  assert [r["seed"] for r in got["runs"]] == [42, 7, 3]
  assert os.path.getsize(os.path.join(out, summary_lib.PLOT_FILE)) > 1000
  saved = json.load(open(os.path.join(out, summary_lib.SUMMARY_FILE)))
  assert saved["runs"][0]["frozen_50"] == got["runs"][0]["frozen_50"]


def test_group_by_gives_mean_sd_min_max(sweep_root, solo, tmp_path):
  got = summary_lib.summarize([sweep_root, solo.run_dir], str(tmp_path), ["framework"],
                              echo=lambda s: None)
  (g,) = got["groups"]
  assert g["key"] == {"framework": "jax"} and len(g["labels"]) == 3
  loss = [r["final_loss"] for r in got["runs"]]
  s = g["stats"]["final_loss"]
  assert s["mean"] == pytest.approx(np.mean(loss)) and s["sd"] == pytest.approx(np.std(loss, ddof=1))
  assert (s["min"], s["max"], s["n"]) == (min(loss), max(loss), 3)
  by_seed = summary_lib.summarize([sweep_root], str(tmp_path), ["seed"], echo=lambda s: None)
  assert [g["key"]["seed"] for g in by_seed["groups"]] == [42, 7]
  assert by_seed["groups"][0]["stats"]["final_loss"]["sd"] is None  # one run


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("case", ["missing", "unfinished", "corrupt", "foreign", "axis"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, solo, tmp_path):
  bad = tmp_path / "bad"
  group = []
  if case == "missing":
    path = str(tmp_path / "nope")
  elif case == "unfinished":
    shutil.copytree(solo.run_dir, bad)
    traj = os.path.join(bad, os.path.basename(solo.trajectory))
    os.rename(traj, traj + ".partial")
    path = str(bad)
  elif case == "corrupt":
    shutil.copytree(solo.run_dir, bad)
    traj = os.path.join(bad, os.path.basename(solo.trajectory))
    with open(traj, "r+b") as f:  # one byte of W's data, the size unchanged
      f.seek(os.path.getsize(traj) // 2)
      b = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([b[0] ^ 1]))
    path = str(bad)
  elif case == "foreign":
    bad.mkdir()
    (bad / "metadata.json").write_text('{"experiment": "Crucible 1"}')
    path = str(bad)
  else:
    path, group = solo.run_dir, ["--group_by=colour"]
  out = tmp_path / "out"
  r = _cli(f"--summarize={path}", f"--output_dir={out}", *group)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
  assert ("colour" if case == "axis" else "bad" if case != "missing" else "nope") in r.stderr
  assert not out.exists()


def test_an_unfinished_run_gets_the_advice_that_will_work(tiny_data, tmp_path):
  """Stopped: continue it with --resume. Still being written: wait for its writer (pid)."""
  import fcntl
  cfg = single_trace(tiny_config(tiny_data, steps=8))
  folder = str(tmp_path / "run")
  loop.train(cfg, folder, stop_after=4, **QUIET)
  with pytest.raises(summary_lib.SummaryError, match="continue it with --resume first"):
    summary_lib.summarize([folder], str(tmp_path / "out"), echo=lambda s: None)
  fd = os.open(folder, os.O_RDONLY)  # a writer's lock, as a running jaxdt holds it
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(summary_lib.SummaryError,
                       match=rf"still running \(pid {os.getpid()}\); wait for it to finish"):
      summary_lib.summarize([folder], str(tmp_path / "out"), echo=lambda s: None)
  finally:
    os.close(fd)
