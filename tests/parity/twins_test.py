"""torchref.twins: four tiny twins from one start and the per-step divergence of W, m, v."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_twins_record_w_m_v_and_start_together(tiny_data, tmp_path):
  root = tmp_path / "twins"
  cmd = [sys.executable, "-m", "torchref.twins", "--steps=6", f"--root={root}",
         f"--corpus_path={tiny_data['corpus']}", f"--tokenizer_path={tiny_data['tokenizer']}",
         f"--dead_mask_path={tiny_data['mask']}", "--set=model.vocab_size=256",
         "--set=model.hidden_dim=32", "--set=data.seq_len=16", "--set=model.max_seq_len=16",
         "--set=data.batch_size=4", "--set=store.chunk_steps=3", "--checkpoint_every=2"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.load(open(root / "twins.json"))
  assert sorted(result["twins"]) == ["f32", "jax", "native1"]
  for name, entry in result["twins"].items():
    for role in ("gradient", "momentum", "variance", "weights"):
      e = entry[role]
      assert len(e["equal_fraction"]) == 7, (name, role)
      assert e["equal_fraction"][0] == 1.0  # one start: W row 0 equal, m and v zeros
      first = e["first_differing_step"]
      assert first is None or first >= 1
  # m after step 1 is (1 - b1) g: every twin has it, and they are close to the base
  m = result["twins"]["jax"]["momentum"]["relative_distance"]
  assert all(x is None or x < 0.5 for x in m[1:]), m
  assert os.path.getsize(root / "twins.png") > 1000
  # the live parameters, tensor by tensor, at the kept steps 2 and 4 (the peer keeps none at its last step)
  live = result["live"]
  assert sorted(live) == ["f32", "jax", "native1"]
  for name, tensors in live.items():
    assert "transformer.layers.1.linear2.weight" in tensors and "embedding.weight" in tensors
    for t, e in tensors.items():
      assert e["steps"] == [2, 4], (name, t)
      assert all(0.0 <= x <= 1.0 for x in e["equal_fraction"])
  # the twins start together: every element of a tensor that moves little is close after 2
  # steps, far from the other end of the scale (independent inits are ~1.4 apart)
  rel = live["native1"]["embedding.weight"]["relative_distance"]
  assert rel[0] is not None and rel[0] < 0.5, rel
  # one gradient at native2's kept state, three ways; jaxdt with torch's CPU LayerNorm
  # backward is closer to torch's LayerNorm gradients than jaxdt's f32 sums
  for sets, out in (([], "f32"), (["--set=model.layernorm_backward=torch_cpu"], "tc")):
    done = subprocess.run([sys.executable, "-m", "torchref.grads", f"--root={root}",
                           "--steps=2", f"--out={tmp_path / out}", *sets], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
  f32, tc = (json.load(open(tmp_path / o / "grads.json"))["steps"]["2"] for o in ("f32", "tc"))
  assert f32["native1"]["embedding.weight"][0] is not None
  assert tc["jax"]["ln_f.bias"][0] < f32["jax"]["ln_f.bias"][0], (tc["jax"], f32["jax"])
  bad = subprocess.run([sys.executable, "-m", "torchref.grads", f"--root={root}", "--steps=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert bad.returncode == 2 and "keeps no checkpoint at step 3" in bad.stderr, bad.stderr
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and again.stdout.count(": finished (") == 4, again.stdout
