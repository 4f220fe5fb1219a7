"""--detect: Magikarp's indicator on known geometry, the exact replay it reads states from,
and its refusals (one line, exit 2, nothing written)."""

import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config

from jaxdt import detection
from jaxdt.analysis import detect
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.training import loop
from jaxdt.training import replay

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = dict(progress=False, log=lambda *_: None)


# --- The indicator on tables whose dead rows are known -----------------------------------------


def _table(rng, vocab=400, dead=150, hidden=16, push=1.0):
  """Live rows random; dead rows share an offset (the softmax's pull) plus noise; every row
  also carries a large random multiple of one direction: the variance the first PC removes."""
  table = rng.normal(size=(vocab, hidden))
  mask = np.zeros(vocab, bool)
  mask[rng.choice(vocab, dead, replace=False)] = True
  table[mask] += push * 1.5 * rng.normal(size=hidden)
  table += 30.0 * np.outer(rng.normal(size=vocab), rng.normal(size=hidden))
  return table, mask


def test_the_first_principal_component_is_removed():
  rng = np.random.default_rng(0)
  table, _ = _table(rng)
  u = detect.without_first_pc(table)
  _, _, vt = np.linalg.svd(table - table.mean(0), full_matrices=False)
  assert np.abs(u @ vt[0]).max() < 1e-9
  np.testing.assert_allclose(u @ vt[1], table @ vt[1])  # the rest untouched


def test_a_pushed_dead_set_is_found_and_a_random_one_is_chance():
  rng = np.random.default_rng(1)
  table, mask = _table(rng)
  ref = detect.reference_rows(np.flatnonzero(mask))
  found = detect.score(table, mask, ref)
  assert found.k == mask.sum() - len(ref) and found.scored == mask.size - len(ref)
  assert found.precision == found.recall > 0.95 and found.average_precision > 0.95
  noise, mask = _table(rng, push=0.0)
  chance = detect.score(noise, mask, detect.reference_rows(np.flatnonzero(mask)))
  assert abs(chance.precision - chance.chance) < 0.15  # nothing to find: about chance


def test_the_reference_set_is_a_seeded_held_out_sample_of_the_dead_rows():
  dead = np.arange(3, 1000, 3)
  ref = detect.reference_rows(dead)
  assert np.array_equal(ref, detect.reference_rows(dead)) and set(ref) <= set(dead)
  assert len(ref) == round(detect.REFERENCE_FRACTION * len(dead))
  mask = np.zeros(1000, bool)
  mask[dead] = True
  with pytest.raises(ValueError, match="reference rows must be dead"):
    detect.score(np.ones((1000, 4)), mask, np.array([1]))


# --- The replay: bit-exact states at steps with no checkpoint ----------------------------------


def _cfg(tiny_data, marks):
  cfg = tiny_config(tiny_data, precision="bf16_sr")
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, num_layers=1),
      probes=dataclasses.replace(cfg.probes, names=("freeze",)),
      store=dataclasses.replace(cfg.store, chunk_steps=3, checkpoint_steps=marks))


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
  """A 12-step bf16_sr run with checkpoints at 6 and 12; the arrays of checkpoint 12."""
  out = str(tmp_path_factory.mktemp("detect") / "run")
  loop.train(_cfg(tiny_data, (6, 12)), out, **QUIET)
  last = dict(checkpoints.intact_checkpoints(os.path.join(out, "checkpoints")))[12]
  return out, load_file(os.path.join(last, checkpoints.CHECKPOINT_ARRAYS))


def _bits(a):
  return np.asarray(a).view(np.uint16) if np.asarray(a).dtype.itemsize == 2 else np.asarray(a)


def test_a_replayed_state_has_the_checkpointed_bits(finished, tmp_path):
  out, saved = finished
  copy = str(tmp_path / "run")
  shutil.copytree(out, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "step_000012"))
  (at,) = replay.states_at(copy, [12], log=lambda *_: None)
  assert at.source == "replayed 6 steps from checkpoint 6"
  emb = saved[".params['embedding']"]
  assert np.array_equal(_bits(at.state.params["embedding"]), _bits(emb))
  assert np.array_equal(_bits(at.state.opt_state.mu["embedding"]),
                        _bits(saved[".opt_state.mu['embedding']"]))
  (kept,) = replay.states_at(out, [12], log=lambda *_: None)
  assert kept.source == "checkpoint"


def test_detect_writes_json_and_png_from_checkpoints_init_and_replays(finished, tmp_path):
  out, _ = finished
  said = []
  result = detection.detect(out, str(tmp_path / "a"), (0, 3, 6, 12), log=said.append)
  assert [r["source"] for r in result["steps"]] == [
      "init", "replayed 3 steps from the init", "checkpoint", "checkpoint"]
  assert all(0 <= r["precision"] <= 1 for r in result["steps"])
  assert sorted(os.listdir(tmp_path / "a")) == ["detect.json", "detect.png"]
  again = detection.detect(out, str(tmp_path / "a"), (0,), log=said.append)  # ours: rewritten
  assert again["steps"][0] == result["steps"][0]


def _cli(*flags):
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _files(folder):
  return sorted(os.path.relpath(os.path.join(d, f), folder)
                for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("case", ["no_checkpoints", "unfinished", "corrupt", "users_file"])
def test_detect_refuses_in_one_line_and_writes_nothing(case, finished, tiny_data, tmp_path):
  out, _ = finished
  run = str(tmp_path / "run")
  shutil.copytree(out, run)
  ckpts = os.path.join(run, "checkpoints")
  if case == "no_checkpoints":
    shutil.rmtree(ckpts)
  elif case == "unfinished":
    trajectory = os.path.join(run, _cfg(tiny_data, ()).store.trajectory_name)
    os.rename(trajectory, trajectory + ".partial")
  elif case == "corrupt":
    with open(os.path.join(ckpts, "step_000006", checkpoints.CHECKPOINT_ARRAYS), "r+b") as f:
      f.seek(-3, os.SEEK_END)
      tail = f.read(3)
      f.seek(-3, os.SEEK_END)
      f.write(bytes(b ^ 0xFF for b in tail))
  else:
    with open(os.path.join(run, detection.DETECT_FILE), "w", encoding="utf-8") as f:
      f.write("my notes\n")
  before = {p: disk.sha256_file(os.path.join(run, p)) for p in _files(run)}
  done = _cli(f"--detect={run}", "--detect_steps=6")
  assert done.returncode == 2, done.stderr
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert {"no_checkpoints": "has no checkpoints", "unfinished": "not a finished run",
          "corrupt": "is corrupt", "users_file": "jaxdt did not write it"}[case] in line
  assert {p: disk.sha256_file(os.path.join(run, p)) for p in _files(run)} == before
