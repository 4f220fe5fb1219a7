"""torchref/gemm.py: the torch peer's f32 GEMM route, op by op, over a twin, in the peer.

`F32Gemm` must reroute every bf16 GEMM-like op of a training step of the lab's
TinyLM (forward and backward) and nothing else; per op its result is the f32
computation rounded once (for mm/addmm/bmm/baddbmm at most 1 bf16 ULP from
torch's native bf16 kernel; for the CPU flash attention the correctly rounded
result of the op, where the native bf16 kernel also rounds its softmax
probabilities to bf16); over 30 steps a run on the route departs from a
native run about as fast as torch's own 1-thread and 2-thread runs depart from
each other. The peer records the route and refuses a resume on another one.
"""

import collections
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER = os.path.join(ROOT, "benchmarks", "torch_peer.py")
aten = torch.ops.aten
FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


from torchref import gemm as tg  # noqa: E402
from torchref import lab  # noqa: E402

V, D, B, L = 256, 32, 4, 16  # the tiny crucible1 (tests/conftest.py)
DEAD = torch.arange(200, V)  # ids no batch holds: their rows move by the tied logits only


def _model(seed=42):
  torch.manual_seed(seed)
  model = lab.TinyLM(V, D, 2, 2, L).to(torch.bfloat16)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0)
  return model, opt


def _batches(n, seed=0):
  g = torch.Generator().manual_seed(seed)
  return [torch.randint(0, int(DEAD[0]), (B, L), generator=g) for _ in range(n)]


def _step(model, opt, x, mode=None):
  if mode is None:
    return lab.train_step(model, opt, nn.CrossEntropyLoss(), x, "cpu", V)
  with mode:
    return lab.train_step(model, opt, nn.CrossEntropyLoss(), x, "cpu", V)


class _Bf16Gemms(TorchDispatchMode):
  """Independent of F32Gemm's tables: every op with a bf16 operand whose name says GEMM."""

  WORDS = ("mm", "matmul", "linear", "attention", "dot", "einsum", "mv", "tensordot")

  def __init__(self):
    super().__init__()
    self.seen = collections.Counter()

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    name = func.overloadpacket.__name__
    if any(w in name for w in self.WORDS) and any(
        isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
        for a in pytree.tree_leaves((args, kwargs))):
      self.seen[str(func)] += 1
    return func(*args, **kwargs)


def test_one_training_step_reroutes_every_bf16_gemm_of_forward_and_backward():
  model, opt = _model()
  x = _batches(1)[0]
  mode, watch = tg.F32Gemm(), _Bf16Gemms()
  with mode, watch:  # watch is innermost: it sees the step's own ops before the reroute
    _step(model, opt, x)
  print("rerouted:", dict(mode.counts), "not rerouted:", dict(mode.not_rerouted))
  assert mode.counts["aten.mm.default"] > 0 and mode.counts["aten.addmm.default"] > 0
  assert mode.counts[str(FWD)] > 0 and mode.counts[str(BWD)] > 0  # attention, both ways
  assert mode.total_not_rerouted == 0
  assert mode.counts == watch.seen  # nothing GEMM-like in bf16 escaped the route


def _ordered(t):  # bf16 bits as integers in value order (adjacent values differ by 1)
  i = t.contiguous().view(torch.int16).to(torch.int32)
  return torch.where(i < 0, -(i & 0x7FFF), i)


def _ulps(a, b):
  return (_ordered(a) - _ordered(b)).abs()


def _rand(g, *shape):
  return torch.randn(*shape, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("op", ["mm", "addmm", "addmm_beta_alpha", "bmm", "baddbmm", "mm_out"])
def test_gemm_route_is_within_one_ulp_of_native(op):
  g = torch.Generator().manual_seed(7)
  r = lambda *s: _rand(g, *s)
  func, args, kwargs = {
      "mm": (aten.mm.default, (r(96, 256), r(256, 80)), {}),
      "addmm": (aten.addmm.default, (r(80), r(96, 64), r(64, 80)), {}),
      "addmm_beta_alpha": (aten.addmm.default, (r(96, 80), r(96, 64), r(64, 80)),
                           {"beta": 0.5, "alpha": 2.0}),
      "bmm": (aten.bmm.default, (r(8, 24, 64), r(8, 64, 16)), {}),
      "baddbmm": (aten.baddbmm.default, (r(8, 24, 16), r(8, 24, 64), r(8, 64, 16)),
                  {"beta": 0.5, "alpha": 0.25}),
      "mm_out": (aten.mm.out, (r(96, 256), r(256, 80)), {}),
  }[op]
  if op == "mm_out":
    native = aten.mm.out(*args, out=torch.empty(0, dtype=torch.bfloat16))
    mode = tg.F32Gemm()
    with mode:
      routed = aten.mm.out(*args, out=torch.empty(0, dtype=torch.bfloat16))
  else:
    native = func(*args, **kwargs)
    mode = tg.F32Gemm()
    with mode:
      routed = func(*args, **kwargs)
  # The route is the f32 op on the upcast operands, rounded once.
  f32 = func.overloadpacket.default(*[a.float() for a in args], **kwargs)
  assert routed.dtype == torch.bfloat16 and torch.equal(routed, f32.to(torch.bfloat16))
  assert mode.counts[str(func)] == 1
  u = _ulps(native, routed)
  print(f"{op}: {float((u > 0).float().mean()):.5f} of elements differ from native, "
        f"max {int(u.max())} ULP")
  assert int(u.max()) <= 1


def test_addmm_beta_zero_ignores_the_bias_as_torch_does():
  g = torch.Generator().manual_seed(3)
  bias = torch.full((16,), float("nan"), dtype=torch.bfloat16)
  a, b = _rand(g, 8, 32), _rand(g, 32, 16)
  with tg.F32Gemm():
    out = torch.addmm(bias, a, b, beta=0)
  assert torch.isfinite(out.float()).all()


def test_other_dtypes_pass_through():
  g = torch.Generator().manual_seed(4)
  a, b = torch.randn(8, 32, generator=g), torch.randn(32, 16, generator=g)
  mode = tg.F32Gemm()
  with mode:
    out = a @ b
    _ = a.to(torch.bfloat16) + 1  # not GEMM-like
  assert torch.equal(out, a @ b) and not mode.counts and not mode.not_rerouted


def _bf16_ulp(x):
  """The bf16 ULP at each value of x (f64; subnormals floored)."""
  x = x.to(torch.bfloat16).double().abs()
  return 2.0 ** (torch.floor(torch.log2(torch.clamp(x, min=2.0 ** -126))) - 7)


def _attention_inputs(seed=1, heads=2, head_dim=16):
  g = torch.Generator().manual_seed(seed)
  return [_rand(g, B, heads, L, head_dim) for _ in range(4)]  # q, k, v, grad_out


def test_attention_route_is_the_correctly_rounded_op_where_native_rounds_inside():
  q, k, v, go = _attention_inputs()
  scale = q.shape[-1] ** -0.5
  masked = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
  out_n, lse_n = FWD(q, k, v, 0.0, True)
  mode = tg.F32Gemm()
  with mode:
    out_r, lse_r = FWD(q, k, v, 0.0, True)
  _, lse_f32 = FWD(q.float(), k.float(), v.float(), 0.0, True)
  assert out_r.dtype == torch.bfloat16 and lse_r.dtype == torch.float32
  assert torch.equal(lse_r, lse_f32)  # the f32 side output as the f32 kernel returns it
  qd, kd, vd, god = (t.double() for t in (q, k, v, go))
  s = (qd @ kd.transpose(-1, -2) * scale).masked_fill(masked, float("-inf"))
  ref = torch.softmax(s, -1) @ vd
  for name, t in (("native", out_n), ("f32 route", out_r)):
    err = (t.double() - ref).abs() / _bf16_ulp(ref)
    print(f"attention fwd {name}: max {float(err.max()):.2f} ULP from exact, "
          f"{float((t == ref.to(torch.bfloat16)).float().mean()):.4f} correctly rounded")
  u = _ulps(out_n, out_r)
  print(f"attention fwd: {float((u > 0).float().mean()):.4f} of elements differ from native, "
        f"max {int(u.max())} ULP")
  assert float(((out_r.double() - ref).abs() / _bf16_ulp(ref)).max()) <= 0.5 + 1e-3

  # The backward, given the native forward's out and logsumexp: its exact result in f64.
  out, lse = out_n, lse_n
  native = BWD(go, q, k, v, out, lse, 0.0, True)
  with mode:
    routed = BWD(go, q, k, v, out, lse, 0.0, True)
  p = torch.exp(qd @ kd.transpose(-1, -2) * scale - lse.double()[..., None]).masked_fill(
      masked, 0.0)
  ds = p * (god @ vd.transpose(-1, -2) - (god * out.double()).sum(-1, keepdim=True))
  exact = (ds @ kd * scale, ds.transpose(-1, -2) @ qd * scale, p.transpose(-1, -2) @ god)
  for name, n, r, e in zip(("grad_q", "grad_k", "grad_v"), native, routed, exact):
    tol = _bf16_ulp(e) + 1e-5 * e.abs().max()  # 1 ULP, plus f32 noise where terms cancel
    err_n, err_r = ((t.double() - e).abs() / tol for t in (n, r))
    print(f"attention bwd {name}: {float((_ulps(n, r) > 0).float().mean()):.4f} differ from "
          f"native; max error / (1 ULP + f32 noise): native {float(err_n.max()):.2f}, "
          f"f32 route {float(err_r.max()):.2f}")
    assert r.dtype == torch.bfloat16 and float(err_r.max()) <= 1.0
  assert mode.counts == {str(FWD): 1, str(BWD): 1}


# --- A tiny twin: native vs the route, against torch's own thread-count noise ----------------

TWIN_STEPS = 30
TWIN_SEEDS = (0, 1)  # batch orders; the departures are summed over them (one seed is noisy)
ROUTE_FACTOR = 2.5  # the full route (attention included) may depart at most this much faster
GEMM_FACTOR = 1.5  # the mm/addmm route alone: about as fast as the threads' noise


def _trajectory(mode_of, threads, seed, nudge=False):
  """Dead rows of W after each of TWIN_STEPS steps on batch order `seed` (row 0: the init)."""
  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    model, opt = _model()
    if nudge:  # one live element one ULP up: the smallest change of the start there is
      with torch.no_grad():
        model.embedding.weight.view(torch.int16)[0, 0] += 1
    ws = [model.embedding.weight.detach()[DEAD].clone()]
    for x in _batches(TWIN_STEPS, seed):
      _step(model, opt, x, mode_of())
      ws.append(model.embedding.weight.detach()[DEAD].clone())
  finally:
    torch.set_num_threads(before)
  return ws


def _departure(a, b, step):
  """||W_a - W_b|| / ||W_a - W_0|| at `step`, and the fraction of elements bitwise equal."""
  rel = float((a[step].float() - b[step].float()).norm() / (a[step].float() - a[0].float()).norm())
  equal = float((a[step].view(torch.int16) == b[step].view(torch.int16)).float().mean())
  return rel, equal


def test_route_departs_from_native_about_as_fast_as_thread_counts_do():
  native = lambda: None
  # One 2-thread run per seed: on a busy 2-core host 2-thread runs are the slow ones.
  kinds = {"native 1t": (native, 1), "native 2t": (native, 2), "f32 1t": (tg.F32Gemm, 1),
           "f32 mm-only 1t": (lambda: tg.F32Gemm(attention=False), 1)}
  pairs = {"threads (native 1t vs 2t)": ("native 1t", "native 2t"),
           "route (native vs f32)": ("native 1t", "f32 1t"),
           "GEMMs only (native vs f32 mm/addmm)": ("native 1t", "f32 mm-only 1t")}
  at = (1, 10, TWIN_STEPS)
  pooled = collections.Counter()  # label -> rel distance at TWIN_STEPS, summed over seeds
  for seed in TWIN_SEEDS:
    runs = {k: _trajectory(m, n, seed) for k, (m, n) in kinds.items()}
    for label, (a, b) in pairs.items():
      figures = [_departure(runs[a], runs[b], s) for s in at]
      pooled[label] += figures[-1][0]
      print(f"seed {seed} {label}: " + " | ".join(f"step {s}: rel {r:.4f}, equal {e:.4f}"
                                                  for s, (r, e) in zip(at, figures)))
  baseline = pooled["threads (native 1t vs 2t)"]
  if baseline == 0.0:
    # This host's torch gives the same bits on 1 and 2 threads (e.g. single-threaded bf16
    # GEMMs and reductions): the noise baseline is then a start one ULP away in one element,
    # the smallest perturbation a bf16 run can have; kernel rounding noise is not smaller.
    baseline = sum(_departure(_trajectory(native, 1, seed),
                              _trajectory(native, 1, seed, nudge=True), TWIN_STEPS)[0]
                   for seed in TWIN_SEEDS)
    print(f"threads give identical bits here; baseline: a 1-ULP nudged start, {baseline:.4f}")
  assert baseline > 0.0
  route = pooled["route (native vs f32)"]
  gemms = pooled["GEMMs only (native vs f32 mm/addmm)"]
  print(f"step {TWIN_STEPS}, summed over seeds: route / baseline {route / baseline:.2f} "
        f"(limit {ROUTE_FACTOR}), GEMMs-only / baseline {gemms / baseline:.2f} "
        f"(limit {GEMM_FACTOR})")
  # The route's GEMMs alone are rounding-order noise; the attention route also drops the
  # native kernel's bf16 rounding of the softmax probabilities, a real (more exact) change.
  assert gemms <= GEMM_FACTOR * baseline
  assert route <= ROUTE_FACTOR * baseline


# --- The peer: --gemm=f32 --probes=freeze, and a resume on another route -------------------

FREEZE = {"n_frozen": ("I32", "T"), "n_moving": ("I32", "T"), "dwp_l2_mean": ("F32", "T"),
          "centroid_norm": ("F32", "T+1"), "loss": ("F32", "T+1"),
          "last_motion_step": ("I32", "n_dead"), "dead_mask": ("BOOL", "V"),
          "dead_indices": ("I64", "n_dead")}


def _peer_cmd(out, paths, *args):
  return [sys.executable, PEER, f"--output_dir={out}", f"--corpus_path={paths['corpus']}",
          f"--tokenizer_path={paths['tokenizer']}", "--set=model.vocab_size=256",
          "--set=model.hidden_dim=32", "--set=data.seq_len=16", "--set=model.max_seq_len=16",
          "--set=data.batch_size=4", f"--set=data.dead_mask_path={paths['mask']}",
          "--checkpoint_every=10", "--chunk_steps=5", "--probes=freeze", *args]


def _header(path):
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n))


def test_peer_records_the_route_writes_the_freeze_record_and_refuses_another_route(
    tiny_data, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  steps = 20
  out = str(tmp_path / "f32")
  r = subprocess.run(_peer_cmd(out, tiny_data, "--gemm=f32", f"--steps={steps}"), cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta["completed"] and meta["torch_gemm"] == "f32" and meta["torch_gemm_requested"] == "f32"
  facts = meta["torch_gemm_facts"]
  assert facts["cpu_model"] and all(s["f32_gflops"] > 0 and s["bf16_gflops"] > 0
                                    for s in facts["shapes"].values())
  assert meta["torch_gemm_ops"]["not_rerouted"] == {}
  assert meta["torch_gemm_ops"]["first_step"][str(BWD)] > 0
  assert meta["config"]["probes"]["names"] == ["freeze"]
  path = os.path.join(out, meta["config"]["store"]["trajectory_name"])
  header = {k: v for k, v in _header(path).items() if k != "__metadata__"}
  arrays = load_file(path)
  n_dead = int(arrays["dead_mask"].sum())
  sizes = {"T": steps, "T+1": steps + 1, "n_dead": n_dead, "V": 256}
  assert {k: (h["dtype"], h["shape"]) for k, h in header.items()} == {
      k: (dt, [sizes[n]]) for k, (dt, n) in FREEZE.items()}
  moving, frozen = arrays["n_moving"], arrays["n_frozen"]
  assert ((moving + frozen) == n_dead).all() and (moving >= 0).all() and (frozen >= 0).all()
  assert np.isnan(arrays["loss"][0]) and np.isfinite(arrays["loss"][1:]).all()
  assert np.isfinite(arrays["centroid_norm"]).all() and (arrays["centroid_norm"] > 0).all()
  assert (arrays["dwp_l2_mean"] >= 0).all()
  assert (arrays["last_motion_step"] <= steps).all()

  # An unfinished f32 run, resumed with --gemm=native: refused in one line, folder untouched.
  unfinished = str(tmp_path / "unfinished")
  p = subprocess.Popen(_peer_cmd(unfinished, tiny_data, "--gemm=f32", "--steps=3000"),
                       cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = os.path.join(unfinished, "checkpoints", "step_000010", "meta.json")
  deadline = time.time() + 300
  while not os.path.exists(marker) and p.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  p.kill()
  p.wait()
  assert os.path.exists(marker)
  before = hashlib.sha256(open(os.path.join(unfinished, "metadata.json"), "rb").read()).digest()
  r = subprocess.run(_peer_cmd(unfinished, tiny_data, "--gemm=native", "--steps=3000",
                               "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)
  print(r.stderr)
  assert r.returncode == 2 and r.stderr.startswith("error: ")
  assert r.stderr.strip().count("\n") == 0 and "--gemm=f32" in r.stderr
  after = hashlib.sha256(open(os.path.join(unfinished, "metadata.json"), "rb").read()).digest()
  assert before == after
