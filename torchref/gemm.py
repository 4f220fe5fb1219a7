"""torch's bf16 GEMMs at f32-GEMM speed: a dispatch mode that runs them on f32 operands.

On CPUs without bf16 dot-product units (AVX2-only: no AVX512_BF16, no AMX)
torch's bf16 CPU GEMM is a slow fallback, far below f32 on the same host
(figures: BUILD_NOTES §4, "Speed"), so the lab's pure-bf16 loop crawls there. `F32Gemm`
is a `TorchDispatchMode`: while it is active every GEMM-like aten op whose
operands are bf16 (the forward's and, since the autograd engine runs the
backward under the same thread-local mode, the backward's) is computed from
the operands upcast to f32, accumulated in f32, and its bf16 results are
rounded once (round to nearest even). Everything else passes through.

    with F32Gemm() as mode:
      loss = lab.train_step(...)
    mode.counts          # Counter: rerouted op name -> calls
    mode.not_rerouted    # Counter: GEMM-like ops with bf16 operands left alone (should be empty)

The route of each op is "the same op on f32 operands":
  * mm, bmm, mv, dot, vdot: the f32 product, rounded once;
  * addmm, baddbmm, addbmm, addmv, _addmm_activation: the f32 op with the same
    beta/alpha (bias + product in f32, beta=0 ignoring the bias as torch does),
    rounded once;
  * matmul, linear, einsum, tensordot likewise, should they reach dispatch (on CPU they
    decompose above it into the ops above);
  * the CPU flash attention (`_scaled_dot_product_flash_attention_for_cpu` and its
    `_backward`): the f32 kernel on f32 operands; the bf16 outputs (out; the
    grads of q, k, v) rounded once, the f32 side output (logsumexp) kept as the
    f32 kernel returns it. The bf16 kernel itself rounds the softmax
    probabilities to bf16 before its P@V GEMM; the f32 route does not, so
    attention is the one place where the route is more than a rounding-order
    change (tests/parity/torch_gemm_test.py measures both).

`bf16_dot_is_fast()` measures (never guesses from the CPU's name) whether the
native bf16 GEMM is at least half as fast as the f32 one; `resolve_gemm("auto")`
picks "native" where it is and "f32" where it is not.
"""

from __future__ import annotations

import collections
import time
from typing import Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

ROUTES = ("auto", "native", "f32")
FAST_RATIO = 0.5  # native bf16 at >= this fraction of f32 speed counts as fast

# GEMM-like op packets: any bf16 call of one of these is rerouted or counted as not.
_GEMM_PACKETS = (aten.mm, aten.addmm, aten._addmm_activation, aten.bmm, aten.baddbmm,
                 aten.addbmm, aten.mv, aten.addmv, aten.dot, aten.vdot, aten.matmul,
                 aten.linear, aten.einsum, aten.tensordot)
_ATTENTION_FWD = aten._scaled_dot_product_flash_attention_for_cpu
_ATTENTION_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward
# Attention kernels this mode does not reroute (CUDA/other backends, or composite ones that
# reach dispatch only as their bmm/mm parts); a bf16 call of one is counted as not rerouted.
_OTHER_ATTENTION = tuple(getattr(aten, n) for n in (
    "_scaled_dot_product_attention_math", "_scaled_dot_product_efficient_attention",
    "_efficient_attention_forward", "_efficient_attention_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_fused_attention_overrideable_backward",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward",
    "_flash_attention_backward") if hasattr(aten, n))

# Rerouted overloads -> the output positions that are bf16 in the native op (rounded once).
_ALL = None  # every output
_REROUTED = {}
for _packet in _GEMM_PACKETS:
  for _name in ("default", "out"):
    if hasattr(_packet, _name):
      _REROUTED[getattr(_packet, _name)] = _ALL
_REROUTED[_ATTENTION_FWD.default] = (0,)  # (output, logsumexp): logsumexp is f32 already
_REROUTED[_ATTENTION_BWD.default] = _ALL  # (grad_query, grad_key, grad_value)
_WATCHED = frozenset(_GEMM_PACKETS + (_ATTENTION_FWD, _ATTENTION_BWD) + _OTHER_ATTENTION)


def _is_bf16(x) -> bool:
  return isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16


def _up(x):
  return x.float() if _is_bf16(x) else x


class F32Gemm(TorchDispatchMode):
  """While active: bf16 GEMM-like aten ops run on f32 operands, rounded once to bf16."""

  def __init__(self, attention: bool = True):
    """attention=False leaves the flash attention native (counted in `not_rerouted`)."""
    super().__init__()
    self.skip = frozenset() if attention else frozenset((_ATTENTION_FWD.default,
                                                         _ATTENTION_BWD.default))
    self.counts = collections.Counter()  # op name -> rerouted calls
    self.not_rerouted = collections.Counter()  # op name -> bf16 GEMM-like calls left alone

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    packet = func.overloadpacket
    if packet not in _WATCHED:
      return func(*args, **kwargs)
    operands = [a for a in pytree.tree_leaves((args, {k: v for k, v in kwargs.items()
                                                      if k != "out"}))
                if isinstance(a, torch.Tensor)]
    if not any(_is_bf16(a) for a in operands):
      return func(*args, **kwargs)
    if func not in _REROUTED or func in self.skip:
      self.not_rerouted[str(func)] += 1
      return func(*args, **kwargs)
    self.counts[str(func)] += 1
    return _route(func, args, kwargs, _REROUTED[func])

  @property
  def total_not_rerouted(self) -> int:
    return sum(self.not_rerouted.values())


def _route(func, args, kwargs, rounded):
  """`func` on f32-upcast operands; the outputs at `rounded` (None: all) rounded to bf16."""
  out = kwargs.get("out")
  up_args, up_kwargs = pytree.tree_map(_up, (args, {k: v for k, v in kwargs.items()
                                                    if k != "out"}))
  if out is not None:  # an .out overload: the default one in f32, then rounded into `out`
    result = func.overloadpacket.default(*up_args, **up_kwargs)
    out.resize_(result.shape)
    out.copy_(result)  # f32 -> out's dtype: one rounding (nearest even)
    return out
  result = func(*up_args, **up_kwargs)
  if isinstance(result, torch.Tensor):
    return result.to(torch.bfloat16)
  return type(result)(r.to(torch.bfloat16) if isinstance(r, torch.Tensor)
                      and (rounded is None or i in rounded) else r
                      for i, r in enumerate(result))


# --- Measuring, not guessing --------------------------------------------------------------

# (m, k, n): the logits' shape (rows of a batch x hidden 64 @ 64 x vocab) and a square one.
SHAPES = ((2048, 64, 10000), (512, 512, 512))


def _best_seconds(fn, budget_s: float, max_reps: int = 20) -> float:
  """The fastest of a few calls of fn (after one warm-up), within about budget_s."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  best, spent = first, first
  for _ in range(max_reps):
    if spent > budget_s:
      break
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    best, spent = min(best, dt), spent + dt
  return best


def bf16_dot_is_fast(shapes=SHAPES, budget_s: float = 0.3, ratio: float = FAST_RATIO,
                     seed: int = 0) -> tuple[bool, dict]:
  """Whether torch's native bf16 CPU GEMM runs at >= `ratio` of its f32 GEMM's speed.

  Times a bf16 and an f32 `torch.mm` of each shape (best of a few calls, with
  torch's current thread count) and compares the slowest shape's ratio, so a
  host fast at one shape and slow at another counts as slow.

  Returns:
    (fast, facts): facts holds per shape the GFLOP/s of each dtype and their
    ratio, the minimum ratio, the threshold and the thread count.
  """
  g = torch.Generator().manual_seed(seed)
  facts = {"threads": torch.get_num_threads(), "threshold": ratio, "shapes": {}}
  ratios = []
  for m, k, n in shapes:
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    flop = 2.0 * m * k * n
    rate = {}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
      x, y = a.to(dt), b.to(dt)
      rate[name] = flop / _best_seconds(lambda x=x, y=y: torch.mm(x, y), budget_s) / 1e9
    ratios.append(rate["bf16"] / rate["f32"])
    facts["shapes"][f"{m}x{k}@{k}x{n}"] = {"f32_gflops": round(rate["f32"], 2),
                                           "bf16_gflops": round(rate["bf16"], 2),
                                           "bf16_over_f32": round(ratios[-1], 3)}
  facts["min_bf16_over_f32"] = round(min(ratios), 3)
  return min(ratios) >= ratio, facts


def resolve_gemm(requested: str, measured: Optional[tuple[bool, dict]] = None
                 ) -> tuple[str, dict]:
  """(route, facts) for --gemm=auto|native|f32: auto -> "native" where bf16 is fast, else "f32".

  The measurement is taken for every request (forced routes record it too);
  `measured` passes one already taken.
  """
  if requested not in ROUTES:
    raise ValueError(f"--gemm={requested!r} is not one of {', '.join(ROUTES)}")
  fast, facts = measured if measured is not None else bf16_dot_is_fast()
  facts = {**facts, "bf16_fast": fast}
  if requested != "auto":
    return requested, {**facts, "why": "forced"}
  route = "native" if fast else "f32"
  why = (f"measured: bf16 GEMM at {facts['min_bf16_over_f32']}x f32 speed "
         f"({'>=' if fast else '<'} {facts['threshold']})")
  return route, {**facts, "why": why}


def route_on(device: str, requested: str) -> tuple[str, dict]:
  """(route, facts) of --gemm on `device`: `resolve_gemm` on the CPU; on "cuda" torch's own
  kernels (native), where the f32 route (a rerouting of CPU kernels) is refused."""
  if device != "cuda":
    return resolve_gemm(requested)
  if requested == "f32":
    raise ValueError("--gemm=f32 is a CPU route (it reroutes torch's CPU bf16 kernels); on "
                     "--device=cuda pass --gemm=native or auto")
  if not torch.cuda.is_available():
    raise ValueError(f"--device=cuda: torch {torch.__version__} sees no CUDA device here; run "
                     "on a machine with an NVIDIA GPU and a CUDA build of torch, or pass "
                     "--device=cpu")
  return "native", {"why": "cuda: torch's own bf16 kernels", "gpu": torch.cuda.get_device_name()}
