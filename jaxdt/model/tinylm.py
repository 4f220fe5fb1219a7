"""TinyLM: the lab's two small causal language models, as pure JAX functions.

* "encoder": the lab's TinyLM (Thimble 8/9, Crucible): token + learned positional
  embeddings, nn.TransformerEncoder layers (norm_first, fused in-projection,
  exact GELU, causal), final LayerNorm, logits = h @ E.T.
* "gpt2": HF GPT2LMHeadModel (Flannel, Thimble 1-7): gelu_new, Conv1D layouts,
  GPT-2 init, tied lm_head.

Parameters keep torch's names and layouts (nn.Linear [out, in], Conv1D [in, out]),
so a state_dict maps on by renaming and gradients line up with torch's `.grad`
element for element. The token table is `params["embedding"]` [V, D] in both.

The compute dtype is the params' dtype. bf16 params compute like torch's
`model.to(torch.bfloat16)` on CPU: matmuls accumulate in f32 and round once;
LayerNorm, softmax and GELU run in f32 and round their outputs. fp32 params use
Precision.HIGHEST on every dot, so CPU and GPU agree (no TF32). On CPU the
GEMMs read bf16 values as f32 unless the CPU has bf16 dot-product units: the
operand dtype is a value (`gemm`, from `resolve_gemm`), passed to every layer;
exact either way.

Training does not call `apply`: `hidden` + `tied_logits_nll` give the same loss
block by block without the (B, T, V) logits (see that section).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdt.config import ModelConfig
from jaxdt.numerics import backend


Params = dict[str, Any]

VARIANTS = ("encoder", "gpt2")
LN_EPS = 1e-5  # torch nn.LayerNorm and HF GPT2Config.layer_norm_epsilon
GPT2_INIT_STD = 0.02  # HF GPT2Config.initializer_range; the lab never changes it
_HIGHEST = jax.lax.Precision.HIGHEST


# -- Numerics shared by both variants ------------------------------------------

def resolve_gemm(setting: str = "auto") -> str:
  """The operand dtype name bf16 GEMMs read: "float32" or "bfloat16".

  "auto" is the host's measured capability (`backend.gemm_operands`: bf16 only
  where the CPU has bf16 dot-product units; accelerators bf16). Resolved on the
  host, once, and passed down as a value (`gemm` below).
  """
  return backend.gemm_operands() if setting == "auto" else setting


def _gemm_dtype(dtype, gemm: str):
  """The dtype a GEMM reads operands of `dtype` in: for bf16, `gemm` (f32 or bf16).

  bf16 x bf16 products are exact in f32 and every GEMM here accumulates in
  f32, so the choice changes speed, not values (beyond f32 summation order).
  """
  if jnp.dtype(dtype) != jnp.bfloat16:
    return dtype
  return jnp.dtype(gemm)


def operand(x, gemm: str, dtype=None):
  """x as a GEMM operand: its values rounded to `dtype` (default x's), held in
  `_gemm_dtype(dtype, gemm)`. A rounding held in f32 is a reduce_precision,
  which XLA never elides (a bf16 -> f32 convert pair it may, under excess
  precision)."""
  dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  gd = _gemm_dtype(dtype, gemm)
  if x.dtype == dtype or gd == dtype:
    return x.astype(dtype).astype(gd)
  return jax.lax.reduce_precision(x.astype(gd), *bits(dtype))


def matmul(x, w, w_in_axis, gemm: str):
  """x @ w over x's last axis and w's `w_in_axis`, accumulated in f32."""
  dims = (((x.ndim - 1,), (w_in_axis,)), ((), ()))
  return jax.lax.dot_general(operand(x, gemm), operand(w, gemm), dims, precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


def _affine(x, w, b, w_in_axis, gemm):
  """x @ w + b with a single rounding to x's dtype (torch's fused addmm)."""
  return (matmul(x, w, w_in_axis, gemm) + b.astype(jnp.float32)).astype(x.dtype)


def _uniform(bound):
  """Initializer for U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def bits(dtype):
  """(exponent bits, mantissa bits) of a float dtype, for reduce_precision."""
  f = jnp.finfo(dtype)
  return f.nexp, f.nmant


def _gelu_exact(x):
  """torch F.gelu (erf form), evaluated in f32 and rounded to x's dtype."""
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _gelu_new(x):
  """HF "gelu_new" as torch runs it: every op in f32 (scalars too), rounded to x's dtype.

  reduce_precision pins each rounding, which XLA could otherwise elide.
  """
  r = lambda y: jax.lax.reduce_precision(y, *bits(x.dtype))
  x32 = x.astype(jnp.float32)
  inner = r(math.sqrt(2.0 / math.pi) * r(x32 + r(0.044715 * r(x32 ** 3))))
  return (r(0.5 * x32) * r(1.0 + r(jnp.tanh(inner)))).astype(x.dtype)


def _causal_attention(q, k, v, num_heads, gemm):
  """softmax(q k^T / sqrt(head_dim) + causal mask) v per head; q, k, v (B, T, D).

  As torch's CPU flash kernel (cpu_flash_attention): f32 scores, exp(s - max)
  rounded to the compute dtype for the value matmul, f32 row sums applied after.
  """
  B, T, D = q.shape
  hd = D // num_heads
  q, k, v = (t.reshape(B, T, num_heads, hd).transpose(0, 2, 1, 3)
             for t in (q, k, v))  # (B, H, T, hd)
  s = jnp.einsum("bhqd,bhkd->bhqk", operand(q, gemm), operand(k, gemm), precision=_HIGHEST,
                 preferred_element_type=jnp.float32) * (1 / math.sqrt(hd))  # (B, H, T, T)
  s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
  e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
  o = jnp.einsum("bhqk,bhkd->bhqd", operand(e, gemm, v.dtype), operand(v, gemm),
                 precision=_HIGHEST,
                 preferred_element_type=jnp.float32)
  o = (o * (1 / e.sum(-1, keepdims=True))).astype(v.dtype)
  return o.transpose(0, 2, 1, 3).reshape(B, T, D)  # (B, T, D)


def _ln_forward(x, w, b):
  """(y in x's dtype, mean, rstd): torch's LayerNorm over the last axis, statistics and
  affine in f32, the variance biased as torch's."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + LN_EPS)
  y = (x32 - mean) * rstd * w.astype(jnp.float32) + b.astype(jnp.float32)
  return y.astype(x.dtype), mean, rstd


def _chunked_sums(terms, chunks: int, dtype):
  """Column sums of `terms` (M, D) f32 as torch's CPU LayerNorm backward makes its weight
  and bias gradients: the rows split into `chunks` contiguous runs of ceil(M / chunks)
  (at::parallel_for's split over threads), each summed row by row into a `dtype` buffer
  (rounded after every add), then the runs' sums added in f32, in order, rounded once."""
  M, D = terms.shape
  size = -(-M // max(1, min(chunks, M)))
  n = -(-M // size)
  r = lambda v: jax.lax.reduce_precision(v, *bits(dtype))
  runs = jnp.pad(terms, ((0, n * size - M), (0, 0))).reshape(n, size, D).transpose(1, 0, 2)
  acc, _ = jax.lax.scan(lambda acc, row: (r(acc + row), None), jnp.zeros((n, D), jnp.float32),
                        runs)  # a zero row added to a rounded sum leaves it as it is
  total = acc[0]
  for i in range(1, n):
    total = total + acc[i]
  return r(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_torch_cpu(x, w, b, chunks):
  del chunks  # the backward's
  return _ln_forward(x, w, b)[0]


def _layer_norm_torch_cpu_fwd(x, w, b, chunks):
  del chunks
  y, mean, rstd = _ln_forward(x, w, b)
  # torch saves mean and rstd in x's dtype; its backward reads those rounded values
  keep = lambda v: jax.lax.reduce_precision(v, *bits(x.dtype))
  return y, (x, w, keep(mean), keep(rstd))


def _layer_norm_torch_cpu_bwd(chunks, res, dy):
  x, w, mean, rstd = res
  D = x.shape[-1]
  x32, dy32, g = x.astype(jnp.float32), dy.astype(jnp.float32), w.astype(jnp.float32)
  ds = (dy32 * g * x32).sum(-1, keepdims=True)
  db = (dy32 * g).sum(-1, keepdims=True)
  bb = (db * mean - ds) * rstd * rstd * rstd / D
  c = -bb * mean - db * rstd / D
  dx = (rstd * dy32 * g + bb * x32 + c).astype(x.dtype)
  rows = lambda v: v.reshape(-1, D)
  dw = _chunked_sums(rows(dy32 * ((x32 - mean) * rstd)), chunks, w.dtype)
  dbias = _chunked_sums(rows(dy32), chunks, w.dtype)
  return dx, dw.astype(w.dtype), dbias.astype(w.dtype)


_layer_norm_torch_cpu.defvjp(_layer_norm_torch_cpu_fwd, _layer_norm_torch_cpu_bwd)


class LayerNorm(nn.Module):
  """torch nn.LayerNorm(D, eps=1e-5): f32 statistics, output in x's dtype.

  backward "f32": the gradient of that f32 formula, each sum in f32 rounded once.
  "torch_cpu": the bits of torch's CPU kernel for low-precision params, thread count
  `threads`: dx and the weight gradient from the mean and rstd rounded to x's dtype (what
  torch saves), the weight and bias gradients summed in the params' dtype run by run
  (`_chunked_sums`). BUILD_NOTES "LayerNorm's backward" has the measurements.
  """
  backward: str = "f32"
  threads: int = 2

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    b = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    if self.backward == "torch_cpu":
      return _layer_norm_torch_cpu(x, w, b, self.threads)
    return _ln_forward(x, w, b)[0]


# -- Variant "encoder": torch nn.TransformerEncoderLayer(norm_first=True) -------

class Linear(nn.Module):
  """torch nn.Linear: weight [out, in], y = x @ W.T + b.

  Init: weight kaiming_uniform_(a=sqrt(5)), which is U(+-1/sqrt(in)); bias U(+-1/sqrt(in)).
  """
  features: int
  gemm: str
  zero_bias: bool = False  # MultiheadAttention zeroes out_proj.bias

  @nn.compact
  def __call__(self, x):
    init = _uniform(1 / math.sqrt(x.shape[-1]))
    w = self.param("weight", init, (self.features, x.shape[-1]))
    b = self.param("bias", nn.initializers.zeros if self.zero_bias else init,
                   (self.features,))
    return _affine(x, w, b, 1, self.gemm)


class SelfAttention(nn.Module):
  """torch nn.MultiheadAttention(batch_first=True) used as causal self-attention."""
  num_heads: int
  gemm: str

  @nn.compact
  def __call__(self, x):
    D = x.shape[-1]
    # xavier_uniform_ on [3D, D]: fan_in + fan_out = 4D.
    w = self.param("in_proj_weight", _uniform(math.sqrt(6 / (4 * D))), (3 * D, D))
    b = self.param("in_proj_bias", nn.initializers.zeros, (3 * D,))
    q, k, v = jnp.split(_affine(x, w, b, 1, self.gemm), 3, axis=-1)  # 3 x (B, T, D)
    o = _causal_attention(q, k, v, self.num_heads, self.gemm)
    return Linear(D, self.gemm, zero_bias=True, name="out_proj")(o)


class EncoderLayer(nn.Module):
  """x + SA(norm1(x)), then x + linear2(gelu(linear1(norm2(x))))."""
  num_heads: int
  ffn_dim: int
  gemm: str
  ln: tuple = ("f32", 2)  # LayerNorm's (backward, threads)

  @nn.compact
  def __call__(self, x):
    x = x + SelfAttention(self.num_heads, self.gemm, name="self_attn")(
        LayerNorm(*self.ln, name="norm1")(x))
    h = Linear(self.ffn_dim, self.gemm, name="linear1")(
        LayerNorm(*self.ln, name="norm2")(x))  # (B, T, 4D)
    return x + Linear(x.shape[-1], self.gemm, name="linear2")(_gelu_exact(h))  # (B, T, D)


# -- Variant "gpt2": HF GPT2Block ----------------------------------------------

class Conv1D(nn.Module):
  """HF Conv1D: weight [in, out] ~ N(0, std), bias zeros; y = x @ W + b."""
  features: int
  gemm: str
  std: float = GPT2_INIT_STD

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.normal(self.std),
                   (x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return _affine(x, w, b, 0, self.gemm)


class GPT2Attention(nn.Module):
  """HF GPT2Attention: fused c_attn, causal softmax, c_proj."""
  num_heads: int
  proj_std: float
  gemm: str

  @nn.compact
  def __call__(self, x):
    D = x.shape[-1]
    q, k, v = jnp.split(Conv1D(3 * D, self.gemm, name="c_attn")(x), 3, axis=-1)  # 3 x (B, T, D)
    o = _causal_attention(q, k, v, self.num_heads, self.gemm)
    return Conv1D(D, self.gemm, std=self.proj_std, name="c_proj")(o)


class GPT2MLP(nn.Module):
  """HF GPT2MLP: c_fc, gelu_new, c_proj."""
  ffn_dim: int
  proj_std: float
  gemm: str

  @nn.compact
  def __call__(self, x):
    h = _gelu_new(Conv1D(self.ffn_dim, self.gemm, name="c_fc")(x))  # (B, T, 4D)
    return Conv1D(x.shape[-1], self.gemm, std=self.proj_std, name="c_proj")(h)  # (B, T, D)


class GPT2Block(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  num_heads: int
  ffn_dim: int
  proj_std: float  # GPT-2's residual scaling: 0.02 / sqrt(2 * n_layer)
  gemm: str
  ln: tuple = ("f32", 2)  # LayerNorm's (backward, threads)

  @nn.compact
  def __call__(self, x):
    attn = GPT2Attention(self.num_heads, self.proj_std, self.gemm, name="attn")
    x = x + attn(LayerNorm(*self.ln, name="ln_1")(x))
    mlp = GPT2MLP(self.ffn_dim, self.proj_std, self.gemm, name="mlp")
    return x + mlp(LayerNorm(*self.ln, name="ln_2")(x))


# -- The model -----------------------------------------------------------------

class TinyLM(nn.Module):
  """Embeddings, `num_layers` blocks of the chosen variant, ln_f, tied logits."""
  cfg: ModelConfig
  gemm: str = "float32"  # operand dtype of bf16 GEMMs (`resolve_gemm`)
  head: bool = True  # False: stop at ln_f and return h alone (see `hidden`)

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.cfg
    V, D, T = cfg.vocab_size, cfg.hidden_dim, input_ids.shape[1]
    assert T <= cfg.max_seq_len, f"sequence length {T} > max_seq_len {cfg.max_seq_len}"
    pos_std = cfg.init_std if cfg.variant == "encoder" else GPT2_INIT_STD
    E = self.param("embedding", nn.initializers.normal(cfg.init_std), (V, D))
    P = self.param("pos_embedding", nn.initializers.normal(pos_std), (cfg.max_seq_len, D))
    x = jnp.take(E, input_ids, axis=0) + P[:T]  # (B, T, D)
    proj_std = GPT2_INIT_STD / math.sqrt(2 * cfg.num_layers)
    ln = (cfg.layernorm_backward, cfg.layernorm_threads)
    for i in range(cfg.num_layers):
      if cfg.variant == "encoder":
        x = EncoderLayer(cfg.num_heads, cfg.ffn_dim, self.gemm, ln, name=f"layers_{i}")(x)
      else:
        x = GPT2Block(cfg.num_heads, cfg.ffn_dim, proj_std, self.gemm, ln, name=f"h_{i}")(x)
    h = LayerNorm(*ln, name="ln_f")(x)
    if not self.head:
      return h
    logits = matmul(h, E, 1, self.gemm).astype(h.dtype)  # (B, T, V), tied, no bias
    return logits, h


def check_config(cfg: ModelConfig):
  """Raises ValueError for a config no variant can build."""
  if cfg.variant not in VARIANTS:
    raise ValueError(f"model variant {cfg.variant!r} is not one of {VARIANTS}")
  if cfg.hidden_dim % cfg.num_heads:
    raise ValueError(f"hidden_dim {cfg.hidden_dim} is not divisible by num_heads {cfg.num_heads}")


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
  """Fresh fp32 parameters with torch's initialisation semantics (not its RNG bits).

  encoder: embeddings N(0, init_std); in_proj xavier_uniform, in_proj_bias and
  out_proj.bias 0; out_proj/linear1/linear2 as nn.Linear; LayerNorms 1/0. Every
  layer is a copy of layer 0, as nn.TransformerEncoder deep-copies one layer.
  gpt2: wte N(0, init_std), everything else HF's `_init_weights` (N(0, 0.02),
  biases 0, both c_proj weights N(0, 0.02/sqrt(2 n_layer)), LayerNorms 1/0).

  Args:
    key: a JAX PRNG key.
    cfg: the architecture.

  Returns:
    A nested dict of fp32 arrays; `params["embedding"]` is the [V, D] token table.
  """
  check_config(cfg)
  params = TinyLM(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]  # plain dicts
  if cfg.variant == "encoder":
    for i in range(1, cfg.num_layers):
      params[f"layers_{i}"] = jax.tree.map(jnp.copy, params["layers_0"])
  return params


def apply(params: Params, cfg: ModelConfig, input_ids: jax.Array, *,
          return_hidden: bool = False, gemm: Optional[str] = None):
  """Forward pass, in the params' dtype.

  Args:
    params: from `init_params` or `params_from_torch_state_dict` (any float dtype).
    cfg: the architecture the params were built for.
    input_ids: (B, T) integer token ids, T <= cfg.max_seq_len.
    return_hidden: also return the post-ln_f hidden state.
    gemm: operand dtype of bf16 GEMMs, "float32" or "bfloat16"; None =
      `resolve_gemm(cfg.gemm_operands)`.

  Returns:
    logits (B, T, V), or (logits, h) with h (B, T, D) when return_hidden.
  """
  gemm = resolve_gemm(cfg.gemm_operands) if gemm is None else gemm
  logits, h = TinyLM(cfg, gemm).apply({"params": params}, input_ids)
  return (logits, h) if return_hidden else logits


def hidden(params: Params, cfg: ModelConfig, input_ids: jax.Array, gemm: str) -> jax.Array:
  """The post-ln_f hidden state (B, T, D) alone, without the (B, T, V) logits.

  Same bits as `apply(..., return_hidden=True, gemm=gemm)[1]`; pair it with
  `tied_logits_nll` to train without materialising the logits.
  """
  return TinyLM(cfg, gemm, head=False).apply({"params": params}, input_ids)

def count_params(params: Params) -> int:
  """Total number of scalars in a params pytree (tied weights counted once)."""
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
