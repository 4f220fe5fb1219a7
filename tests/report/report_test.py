"""outputs.analyze and `run.py --analyze` on our tiny runs and on files in the lab's layouts."""

import dataclasses
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch  # a test dependency: the lab's files are written with safetensors.torch
from safetensors.torch import save_file

from conftest import single_trace, tiny_config

from jaxdt.analysis import freeze
from jaxdt.analysis import metrics
from jaxdt.io import tensorfile
from jaxdt.report import outputs
from jaxdt.report import plots as plots_lib
from jaxdt.report import text as text_lib
from jaxdt.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {"file", "layout", "keys", "steps", "rows", "hidden", "motion_threshold", "notes",
                "skipped", "run", "loss", "fimbulwinter_check", "stillness", "global_freeze",
                "frozen_fraction", "lifecycle", "centroid", "accounting", "outputs"}
# What a lab-layout copy must reproduce from our own file.
SHARED = ("fimbulwinter_check", "stillness", "global_freeze", "frozen_fraction", "lifecycle",
          "loss")


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
  cfg = single_trace(tiny_config(tiny_data, steps=30))
  return loop.train(cfg, str(tmp_path_factory.mktemp("run")), progress=False)


@pytest.fixture(scope="module")
def state_run(tiny_data, tmp_path_factory):
  """Thimble 8's probes (W, m, v, g, loss with loss[0] = 0) plus our adam_* keys."""
  cfg = single_trace(tiny_config(tiny_data, steps=12))
  probes = dataclasses.replace(cfg.probes, names=("W", "m", "v", "g", "loss", "adam_accounting"),
                               loss_initial=0.0)
  cfg = dataclasses.replace(cfg, probes=probes)
  return loop.train(cfg, str(tmp_path_factory.mktemp("state_run")), progress=False)


def _tensors(result) -> dict:
  with tensorfile.TrajectoryReader(result.trajectory) as r:
    return {k: r.read(k) for k in r.keys()}


def _torch(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(a))


def _bf16(bits: np.ndarray) -> torch.Tensor:
  return _torch(bits.view(np.int16)).view(torch.bfloat16)


def _write_metadata(folder, **keys):
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json.dump({"experiment": "lab", **keys}, f)


def _strict_json(path):
  with open(path) as f:
    return json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


def _any_motion(reader, threshold):
  """bool [T]: did any row move at step t (‖ΔW′_i‖₂ ≥ threshold), from the stored ΔW′."""
  d = reader.read("delta_W_prime").astype(np.float32)
  return (np.sqrt(np.sum(d * d, axis=2)) >= threshold).any(axis=1)


def _cli(*flags):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_analyze_our_run_prints_the_seed_blocks_and_writes_json_and_pngs(run, tmp_path):
  lines = []
  s = outputs.analyze(run.run_dir, str(tmp_path), echo=lines.append)
  text = "\n".join(lines)
  with tensorfile.TrajectoryReader(run.trajectory) as r:  # the lab's blocks, computed the old way
    check = freeze.FimbulwinterCheck.of(r.read("last_motion_step"), 30)
    still = freeze.Stillness.of(_any_motion(r, 0.1))
  assert text_lib.format_fimbulwinter_check(check) in text
  assert text_lib.format_stillness(still) in text
  for title in ("LOSS", "GLOBAL FREEZE", "PER-STEP FROZEN FRACTION", "LIFECYCLE PHASES",
                "CENTROID DRIFT AND CLOUD RADIUS", "ADAM ACCOUNTING"):
    assert f"\n{title}" in text, title
  saved = _strict_json(tmp_path / outputs.SUMMARY_FILE)
  assert SUMMARY_KEYS <= set(saved)
  assert saved["skipped"] == [] and saved["layout"] == "jaxdt"
  assert saved["fimbulwinter_check"] == dataclasses.asdict(check)
  assert saved["accounting"]["replay_exact_steps"] == 30
  assert saved["run"]["cpu_threads"] >= 1 and "xla_flags" in saved["run"]
  assert sorted(os.path.basename(p) for p in saved["outputs"]["plots"]) == sorted(
      plots_lib.PLOT_FILES.values())
  for p in saved["outputs"]["plots"]:
    w, h = _png_size(p)
    assert w > 100 and h > 100
  assert s.steps == 30


def test_streaming_block_size_does_not_change_a_real_runs_summary(run):
  a, _ = metrics.measure(run.trajectory, block_steps=1)
  b, _ = metrics.measure(run.trajectory)
  assert json.dumps(a.to_json()) == json.dumps(b.to_json())


def test_lab_crucible_file_without_our_keys(run, tmp_path):
  """The lab's `save_file` of W (uint16), ΔW′, centroid, loss, last_motion_step and masks."""
  t = _tensors(run)
  lab = {k: _torch(t[k]) for k in ("W", "delta_W_prime", "centroid", "loss", "last_motion_step",
                                   "dead_mask", "dead_indices")}
  path = str(tmp_path / "crucible_1_trajectory.safetensors")
  save_file(lab, path)
  _write_metadata(str(tmp_path), motion_threshold=0.1, total_steps=30)
  ours, _ = metrics.measure(run.trajectory)
  theirs, _ = metrics.measure(path)
  assert theirs.layout == "lab"
  for k in SHARED + ("centroid",):
    assert theirs.to_json()[k] == ours.to_json()[k], k
  assert [x.analysis for x in theirs.skipped] == ["Adam accounting"]


def test_lab_thimble1_file_bf16_w_and_losses_through_the_cli(run, tmp_path):
  """BF16 `W`, f32 `losses`, no ΔW′, no centroid, no masks: ΔW′ comes from W."""
  t = _tensors(run)
  path = str(tmp_path / "thimble_1.safetensors")
  save_file({"W": _bf16(t["W"]), "losses": _torch(t["loss"])}, path)
  result = _cli(f"--analyze={path}")
  assert result.returncode == 0, result.stderr
  s = _strict_json(tmp_path / outputs.SUMMARY_FILE)
  ours = metrics.measure(run.trajectory)[0].to_json()
  assert "FIMBULWINTER CHECK" in result.stdout  # no last_motion_step: recounted from W
  for k in SHARED:
    assert s[k] == ours[k], k
  assert s["delta_w_prime"] == "computed from W" and "no dead_mask" in s["notes"][0]
  # The centroid is recomputed as an f64 mean (ours stores a pairwise f32 mean).
  assert s["centroid"]["norm_end"] == pytest.approx(ours["centroid"]["norm_end"], rel=1e-6)
  assert "Skipped: Adam accounting" in result.stdout
  for name in plots_lib.PLOT_FILES.values():
    _png_size(tmp_path / name)


def test_state_files_recompute_the_accounting_we_record(state_run, tmp_path):
  """Thimble 8 keys (W, m, v, g, loss) + metadata.json, and Thimble 1 keys + scalar tensors."""
  t = _tensors(state_run)
  meta = state_run.metadata
  t8 = tmp_path / "t8"
  t8.mkdir()
  save_file({k: _torch(t[k]) for k in ("W", "m", "v", "g", "loss")}, str(t8 / "t8.safetensors"))
  _write_metadata(str(t8), **{k: meta[k] for k in ("learning_rate", "beta1", "beta2", "epsilon",
                                                     "weight_decay")})
  t1 = tmp_path / "t1"
  t1.mkdir()
  scalars = {"learning_rate": meta["learning_rate"], "adam_beta1": meta["beta1"],
             "adam_beta2": meta["beta2"], "adam_epsilon": meta["epsilon"],
             "weight_decay": meta["weight_decay"]}
  save_file({"W": _bf16(t["W"]), "momentum_W": _torch(t["m"]), "variance_W": _torch(t["v"]),
             "losses": _torch(t["loss"]),
             **{k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()}},
            str(t1 / "thimble_1.safetensors"))
  for folder in (t8, t1):
    lines = []
    s = outputs.analyze(str(folder), plots=False, echo=lines.append)
    _, series = metrics.measure(str(folder))
    assert s.accounting.source.startswith("recomputed")
    for k in ("adam_replay_match", "adam_swallowed"):  # exact counts
      np.testing.assert_array_equal(series["accounting"][k], t[k], err_msg=k)
    for k in ("adam_cosine", "adam_norm_ratio", "adam_max_ulp_error"):  # f32 sums: order may vary
      np.testing.assert_allclose(series["accounting"][k], t[k], rtol=1e-5, err_msg=k)
    assert s.accounting.replay_exact_steps == 12
    text = "\n".join(lines)
    assert "SANITY CHECK" in text and "m[0] all zero: True" in text
    assert s.loss.first == float(t["loss"][1])  # loss[0] = 0.0 is not a step


def test_unknown_hyperparameters_are_reported_as_skipped(state_run, tmp_path):
  t = _tensors(state_run)
  save_file({k: _torch(t[k]) for k in ("W", "m", "v", "loss")}, str(tmp_path / "x.safetensors"))
  s, _ = metrics.measure(str(tmp_path))
  why = {x.analysis: x.reason for x in s.skipped}
  assert "hyperparameters are unknown" in why["Adam accounting"]


def test_cli_bad_path_is_one_error_line_and_exit_2(tmp_path):
  result = _cli(f"--analyze={tmp_path / 'missing'}")
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
  assert "does not exist" in result.stderr


def test_a_closed_output_pipe_is_named_not_the_run_folder(run, tmp_path):
  """`run.py --analyze=RUN | head -1`: the reader leaves before the report is printed; the error
  names the pipe (not the folder, no --resume advice) and no output is half-written."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = tmp_path / "a"
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"), f"--analyze={run.run_dir}",
                           f"--analysis_dir={out}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  proc.stdout.close()  # the reader is gone before the report is printed (`| head -0`)
  err = proc.stderr.read()
  assert proc.wait(timeout=300) == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "output pipe closed" in lines[0] and "--resume" not in err, err
  for name in (os.listdir(out) if out.exists() else []):
    assert not name.startswith(".") and os.path.getsize(out / name) > 0, name
