"""Cross-run (cross-backend) comparison: CPU against CPU, a tampered copy, and the flags.

On a machine with a GPU the same command compares a GPU run with a CPU run:
`python run.py --compare=runs/crucible1_gpu,runs/crucible1_cpu` (BUILD_NOTES).
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import single_trace, tiny_config

from jaxdt import config as config_lib
from jaxdt.analysis import compare
from jaxdt.analysis import metrics
from jaxdt.numerics import backend
from jaxdt.report import outputs
from jaxdt.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
  cfg = tiny_config(tiny_data, steps=STEPS)
  return [loop.train(cfg, str(tmp_path_factory.mktemp(name)), progress=False)
          for name in ("cpu_a", "cpu_b")]


def _flip_bit(path: str, key: str, row: int, element: int = 0, bit: int = 0) -> None:
  """Flips one bit of element `element` of row `row` of tensor `key`, in place."""
  with open(path, "r+b") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(n))[key]
    shape, begin = entry["shape"], entry["data_offsets"][0]
    itemsize = {"U16": 2, "F32": 4}[entry["dtype"]]
    offset = 8 + n + begin + (row * int(np.prod(shape[1:])) + element) * itemsize + bit // 8
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << (bit % 8))]))


def _cli(*flags):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_two_cpu_runs_of_one_config_are_identical(runs, tmp_path):
  a, b = runs
  lines = []
  c = outputs.compare(a.run_dir, b.run_dir, str(tmp_path), echo=lines.append)
  assert c["identical"] and c["first_difference"] is None and c["steps_compared"] == STEPS
  assert {k["key"] for k in c["keys"]} >= {"W", "delta_W_prime", "loss", "last_motion_step"}
  for k in c["keys"]:
    assert k["identical_element_fraction"] == k["identical_bit_fraction"] == 1.0, k["key"]
  assert c["loss"]["max_abs_diff"] == 0.0
  assert all(v in (0, None) for v in c["freeze"]["diff"].values())
  assert c["a"]["backend"] == c["b"]["backend"] == "cpu"
  assert c["a"]["cpu_threads"] == backend.cpu_threads()
  assert lines[-1].splitlines()[-1].startswith("VERDICT: IDENTICAL")
  assert json.load(open(tmp_path / "compare.json"))["identical"] is True


def test_a_tampered_copy_reports_the_first_differing_step(runs, tmp_path):
  a, b = runs
  copy = str(tmp_path / "tampered")
  shutil.copytree(b.run_dir, copy)
  path = os.path.join(copy, os.path.basename(b.trajectory))
  _flip_bit(path, "W", row=7, element=5)  # W row 7 = the state after step 7
  _flip_bit(path, "loss", row=9, bit=20)
  with pytest.raises(metrics.AnalysisError, match="tampered/crucible_1_trajectory.safetensors "
                     "is corrupt: tensor '(W|loss)' does not match the SHA-256"):
    outputs.compare(a.run_dir, copy, echo=lambda _: None)
  # The same bytes without recorded checksums (as from a jaxdt before them): compared.
  meta_path = os.path.join(copy, "metadata.json")
  meta = json.load(open(meta_path))
  del meta["tensor_sha256"], meta["trajectory_sha256"]
  json.dump(meta, open(meta_path, "w"))
  lines = []
  c = outputs.compare(a.run_dir, copy, echo=lines.append)
  keys = {k["key"]: k for k in c["keys"]}
  assert not c["identical"] and c["first_difference"] == {"step": 7, "key": "W"}
  w = keys["W"]
  assert w["first_diff_step"] == 7 and w["elements"] - w["identical_elements"] == 1
  assert w["identical_bit_fraction"] == 1 - 1 / (16 * w["elements"])
  assert keys["delta_W_prime"]["identical"]  # the stored records were not touched
  assert keys["loss"]["first_diff_step"] == 9
  assert c["loss"]["step"] == 9 and c["loss"]["max_abs_diff"] > 0
  assert lines[-1].splitlines()[-1] == "VERDICT: DIFFERENT: first difference at step 7 (in W)"


def test_runs_of_different_length_compare_their_common_steps(runs, tiny_data, tmp_path):
  a, _ = runs
  short = loop.train(tiny_config(tiny_data, steps=8), str(tmp_path / "short"), progress=False)
  c = compare.compare(a.run_dir, short.run_dir)
  assert c["steps_compared"] == 8 and c["identical"]  # the first 8 steps are the same run
  lms = {k["key"]: k for k in c["keys"]}["last_motion_step"]
  assert lms["identical"] is None and "8-step" in lms["reason"]  # final values: not comparable


def test_cli_compare_exit_codes(runs):
  a, b = runs
  ok = _cli(f"--compare={a.run_dir},{b.run_dir}")
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip().splitlines()[-1].startswith("VERDICT: IDENTICAL")
  bad = _cli(f"--compare={a.run_dir}")
  assert bad.returncode == 2 and bad.stderr.startswith("error: --compare takes two paths")


def test_run_metadata_records_the_threads_and_flags(runs):
  meta = runs[0].metadata
  assert meta["cpu_threads"] == backend.cpu_threads()
  assert meta["backend"] == "cpu" and "xla_flags" in meta


def test_determinism_flags_are_added_once_and_user_values_win():
  env = {}
  assert backend.configure(environ=env) == (
      "--xla_gpu_deterministic_ops=true --xla_gpu_exclude_nondeterministic_ops=true "
      "--xla_allow_excess_precision=false")
  assert backend.configure(environ=env) == env["XLA_FLAGS"]  # idempotent
  env = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false --xla_cpu_ftz"}
  flags = backend.parse_xla_flags(backend.configure(environ=env))
  assert flags["xla_gpu_deterministic_ops"] == "false" and flags["xla_cpu_ftz"] == "true"
  assert flags["xla_gpu_exclude_nondeterministic_ops"] == "true"
  eff = backend.effective_flags(env["XLA_FLAGS"])
  assert eff["xla_cpu_ftz"] == ("true", "set") and eff["xla_gpu_ftz"] == ("false", "default")
  assert backend.configure(deterministic=False, environ={}) == ""


def test_describe_reports_the_live_backend():
  d = backend.describe()
  assert d["backend"] == "cpu" and d["cpu_threads"] >= 1 and d["fma_contracts"] is True
  assert "XLA_FLAGS" in backend.format_description(d)


def test_runs_on_two_gemm_paths_are_named_in_the_comparison(runs, tiny_data, tmp_path):
  """bf16 against f32 GEMM operands: same values, other summation order, said so."""
  # 4 steps in one chunk (one trace): compare reads the steps both runs have.
  cfg = config_lib.override(single_trace(tiny_config(tiny_data, steps=4)),
                            "model.gemm_operands=bfloat16")
  other = loop.train(cfg, str(tmp_path / "bf16"), progress=False)
  assert other.metadata["gemm_path"] == "bfloat16 operands (forced)"
  assert runs[0].metadata["gemm_path"] == backend.gemm_path()
  lines = []
  c = outputs.compare(runs[0].run_dir, other.run_dir, echo=lines.append)
  assert c["gemm_paths_differ"] is (backend.gemm_operands() != "bfloat16")
  if c["gemm_paths_differ"]:
    assert "The runs used different GEMM paths" in lines[-1]
  assert 'model.gemm_operands: A has "auto", B has "bfloat16"' in c["config_differences"]
  # The loss agrees to f32 summation order whatever the path.
  assert c["loss"]["max_abs_diff"] < 0.05
