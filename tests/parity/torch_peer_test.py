"""torchref.peer: the lab's torch loop as a run folder, its twin mode and its resume.

Tiny crucible1 (vocab 256, D 32, batch 4 x 16). The twin starts from a jaxdt
run's init and trains on its batch order; it must begin bit-equal (W row 0)
and stay close, where a torch run from its own init does not; the divergence
tool (`analysis.divergence`) measures both. A torch run killed after a
checkpoint and resumed gives the uninterrupted run's bytes.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import single_trace, tiny_config

from jaxdt.analysis import divergence
from jaxdt.report import summary as summary_lib
from jaxdt.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER = ("-m", "torchref.peer")  # the package; torch_gemm_test runs the benchmarks/ script
STEPS = 40


def _tiny_flags(paths):
  return [f"--corpus_path={paths['corpus']}", f"--tokenizer_path={paths['tokenizer']}",
          "--set=model.vocab_size=256", "--set=model.hidden_dim=32", "--set=data.seq_len=16",
          "--set=model.max_seq_len=16", "--set=data.batch_size=4",
          f"--set=data.dead_mask_path={paths['mask']}"]


def _peer(out, *args, wait=True):
  cmd = [sys.executable, *PEER, f"--output_dir={out}", "--checkpoint_every=10", "--chunk_steps=5",
         *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  return r


def _sha(folder):
  meta = json.load(open(os.path.join(folder, "metadata.json")))
  with open(os.path.join(folder, meta["config"]["store"]["trajectory_name"]), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest(), meta


@pytest.fixture(scope="module")
def jax_run(tiny_data, tmp_path_factory):
  cfg = single_trace(tiny_config(tiny_data, steps=STEPS))
  return loop.train(cfg, str(tmp_path_factory.mktemp("jax") / "run"), progress=False,
                    log=lambda s: None)


@pytest.fixture(scope="module")
def twin(jax_run, tiny_data, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("twin") / "run")
  _peer(out, f"--init_from={jax_run.run_dir}", f"--batches_from={jax_run.run_dir}",
        f"--corpus_path={tiny_data['corpus']}", f"--tokenizer_path={tiny_data['tokenizer']}")
  return out


def test_twin_starts_bit_equal_and_stays_closer_than_an_own_init_run(jax_run, twin, tiny_data,
                                                                      tmp_path):
  _, meta = _sha(twin)
  assert meta["framework"] == "torch" and meta["completed"] and meta["steps_completed"] == STEPS
  assert meta["init_from"] == jax_run.run_dir and meta["batches_from"] == jax_run.run_dir
  d = divergence.divergence(jax_run.run_dir, twin)
  assert d.steps == STEPS and d.equal_fraction[0] == 1.0  # the same start, bit for bit
  assert d.first_differing_step is not None and d.first_differing_step >= 1
  assert np.isnan(d.relative_distance[0]) and np.nanmax(d.relative_distance) < 0.5
  own = str(tmp_path / "own")
  _peer(own, f"--steps={STEPS}", *_tiny_flags(tiny_data))
  far = divergence.divergence(jax_run.run_dir, own)
  assert far.equal_fraction[0] < 0.05  # another init
  assert np.nanmin(far.relative_distance[1:]) > np.nanmax(d.relative_distance[1:])


def test_torch_runs_summarize_like_jaxdt_runs(jax_run, twin, tmp_path):
  got = summary_lib.summarize([jax_run.run_dir, twin], str(tmp_path), ["framework"],
                              echo=lambda s: None)
  assert [r["framework"] for r in got["runs"]] == ["jax", "torch"]
  assert all(r["steps"] == STEPS and r["final_loss"] > 0 for r in got["runs"])
  assert [g["key"]["framework"] for g in got["groups"]] == ["jax", "torch"]


@pytest.mark.parametrize("mode", ["dataloader", "twin"])
def test_killed_after_a_checkpoint_then_resumed_gives_the_same_bytes(mode, jax_run, twin,
                                                                     tiny_data, tmp_path):
  if mode == "twin":
    args = [f"--init_from={jax_run.run_dir}", f"--batches_from={jax_run.run_dir}",
            f"--corpus_path={tiny_data['corpus']}", f"--tokenizer_path={tiny_data['tokenizer']}"]
    reference = twin
  else:  # batches of 16: epochs of 31 batches, so the kill lands mid-epoch and resume crosses one
    args = ["--steps=50", *_tiny_flags(tiny_data), "--set=data.batch_size=16"]
    reference = str(tmp_path / "ref")
    _peer(reference, *args)
  out = str(tmp_path / "killed")
  p = _peer(out, *args, wait=False)
  marker = os.path.join(out, "checkpoints", "step_000020", "meta.json")
  deadline = time.time() + 300
  while not os.path.exists(marker) and p.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  p.kill()
  p.wait()
  assert os.path.exists(marker), p.stderr.read().decode()[-2000:]
  r = _peer(out, *args, "--resume")
  assert "resuming" in r.stdout + r.stderr
  assert _sha(out)[0] == _sha(reference)[0]


def test_bad_sources_are_one_line_errors(tmp_path, tiny_data):
  for flag in ("--init_from", "--batches_from"):
    r = subprocess.run([sys.executable, *PEER, f"--output_dir={tmp_path / 'x'}",
                        f"{flag}={tmp_path / 'missing'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr


def test_a_cuda_run_without_a_gpu_is_one_line_and_f32_is_refused_there(tmp_path):
  """--device=cuda where torch sees no GPU (and --gemm=f32, a CPU route, on cuda) is one line,
  exit 2, and no run folder."""
  import torch  # pylint: disable=g-import-not-at-top
  cases = [("--gemm=f32", "--gemm=f32 is a CPU route")]
  if not torch.cuda.is_available():
    cases.append(("--gemm=auto", "sees no CUDA device here"))
  for gemm, said in cases:
    out = tmp_path / gemm[2:].replace("=", "_")
    r = subprocess.run([sys.executable, *PEER, f"--output_dir={out}", "--device=cuda", gemm],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert r.stderr.strip().count("\n") == 0 and said in r.stderr, r.stderr
    assert not out.exists()
