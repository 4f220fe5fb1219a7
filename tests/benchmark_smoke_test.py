"""The benchmark driver runs end to end at --size=tiny (the benchmark itself is not a test)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_benchmark_ends_with_the_ratio_and_ceiling_lines(tiny_data, tmp_path):
  pytest.importorskip("torch")  # the baseline is the lab's torch loop
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "crucible1_bench.py"), "--size=tiny",
         "--steps=10", "--chunk=10", "--torch_steps=4", "--ceiling_seconds=1", "--torch_f32",
         f"--corpus_path={tiny_data['corpus']}", f"--tokenizer_path={tiny_data['tokenizer']}",
         f"--work_dir={tmp_path}", f"--json={tmp_path / 'raw.json'}"]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert re.fullmatch(r"ratio_vs_tuned_torch=\d+\.\d+", lines[-2]), p.stdout + p.stderr[-3000:]
  assert float(lines[-2].split("=")[1]) > 0
  assert re.fullmatch(r"gemm_ceiling_fraction=\d+\.\d+", lines[-1]), p.stdout
  assert 0 < float(lines[-1].split("=")[1]) < 1.5
  out = p.stdout
  for side in ("torch, default allocator", "torch, tuned allocator", "jaxdt train.train"):
    assert re.search(re.escape(side) + r"\s+\d+\s+\d", out), out
  assert "GEMM ceilings" in out and "jaxdt RSS vs steps" in out
  assert "(median of 2 processes)" in out, out  # tiny runs jaxdt in two processes
  assert "reference only: jaxdt / torch f32 = " in out, out  # --torch_f32
  assert (tmp_path / "raw.json").exists()
