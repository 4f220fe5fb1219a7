"""Tests for jaxdt.model: shapes, sizes, init semantics, causality, import/export."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxdt.config import ModelConfig
from jaxdt.model import tied_nll
from jaxdt.numerics import backend
from jaxdt.model import tinylm
from jaxdt.model import torch_io

VARIANTS = ("encoder", "gpt2")
LAB_PARAMS = 748_288  # Crucible 1 prints "Model parameters: 748,288"; docs/experiments.md
SMALL = dict(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=16)
B, T = 2, 12
NLL_VOCAB, NLL_B, NLL_T = 301, 4, 16  # tied-logits loss tests: 4 x 15 target rows

# torch state_dict keys of a 2-layer model (from TinyLM / GPT2LMHeadModel).
ENCODER_LAYER_KEYS = (
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
    "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
    "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
GPT2_LAYER_KEYS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
TORCH_KEYS = {
    "encoder": {"embedding.weight", "pos_embedding.weight", "ln_f.weight", "ln_f.bias"}
               | {f"transformer.layers.{i}.{k}" for i in range(2) for k in ENCODER_LAYER_KEYS},
    "gpt2": {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
             "transformer.ln_f.bias", "lm_head.weight"}
            | {f"transformer.h.{i}.{k}" for i in range(2) for k in GPT2_LAYER_KEYS},
}


def _small(variant):
  return ModelConfig(variant=variant, **SMALL)


def _bits(a):
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _assert_trees_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(_bits(x), _bits(y))


@pytest.fixture(scope="module")
def lab():
  return {v: tinylm.init_params(jax.random.key(0), ModelConfig(variant=v)) for v in VARIANTS}


@pytest.fixture(scope="module")
def small():
  return {v: tinylm.init_params(jax.random.key(1), _small(v)) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_lab_size_param_count(lab, variant):
  params = lab[variant]
  assert tinylm.count_params(params) == LAB_PARAMS
  assert params["embedding"].shape == (10000, 64)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_dtypes(small, variant):
  cfg = _small(variant)
  ids = jnp.arange(B * T).reshape(B, T) % cfg.vocab_size
  fwd = jax.jit(tinylm.apply, static_argnums=1, static_argnames="return_hidden")
  logits, h = fwd(small[variant], cfg, ids, return_hidden=True)
  assert logits.shape == (B, T, cfg.vocab_size)
  assert h.shape == (B, T, cfg.hidden_dim)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(fwd(small[variant], cfg, ids), logits)
  # Post-ln_f hidden with unit LayerNorm weights: per-position mean 0, var 1.
  np.testing.assert_allclose(h.mean(-1), 0.0, atol=1e-5)
  assert np.all((h.var(-1) > 0.9) & (h.var(-1) <= 1.0))  # var/(var+eps), var ~1e-3
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), small[variant])
  logits16, h16 = fwd(bf16, cfg, ids, return_hidden=True)
  assert (logits16.dtype, h16.dtype) == (jnp.bfloat16, jnp.bfloat16)
  # bf16 compute tracks fp32 to a few bf16 ulps (2^-8 relative each).
  scale = float(jnp.abs(logits).max())
  assert float(jnp.abs(logits16.astype(jnp.float32) - logits).max()) < 0.05 * scale


def test_encoder_layers_identical_at_init(lab):
  # nn.TransformerEncoder deep-copies one layer, so all layers start equal.
  params = lab["encoder"]
  _assert_trees_bit_equal(params["layers_0"], params["layers_1"])
  # ...but the GPT-2 blocks are drawn independently.
  gpt2 = lab["gpt2"]
  assert not np.array_equal(gpt2["h_0"]["attn"]["c_attn"]["weight"],
                            gpt2["h_1"]["attn"]["c_attn"]["weight"])


def test_encoder_init_statistics(lab):
  p, D = lab["encoder"], 64
  for table in ("embedding", "pos_embedding"):
    assert float(p[table].std()) == pytest.approx(0.02, abs=0.001)
    assert float(p[table].mean()) == pytest.approx(0.0, abs=0.001)
  layer = p["layers_0"]
  attn = layer["self_attn"]
  bounds = {  # U(-b, b): std = b / sqrt(3)
      ("self_attn", "in_proj_weight"): math.sqrt(6 / (4 * D)),  # xavier_uniform
      ("self_attn", "out_proj", "weight"): 1 / math.sqrt(D),  # nn.Linear default
      ("linear1", "weight"): 1 / math.sqrt(D),
      ("linear1", "bias"): 1 / math.sqrt(D),
      ("linear2", "weight"): 1 / math.sqrt(4 * D),
      ("linear2", "bias"): 1 / math.sqrt(4 * D),
  }
  for path, bound in bounds.items():
    w = np.asarray(_get(layer, path))
    assert np.abs(w).max() <= bound, path
    assert np.abs(w).max() > 0.9 * bound, path
    assert w.std() == pytest.approx(bound / math.sqrt(3), abs=0.15 * bound), path
  np.testing.assert_array_equal(attn["in_proj_bias"], 0.0)
  np.testing.assert_array_equal(attn["out_proj"]["bias"], 0.0)  # MHA zeroes it
  for ln in (layer["norm1"], layer["norm2"], p["ln_f"]):
    np.testing.assert_array_equal(ln["weight"], 1.0)
    np.testing.assert_array_equal(ln["bias"], 0.0)


def test_gpt2_init_statistics(lab):
  p = lab["gpt2"]
  for table in ("embedding", "pos_embedding"):
    assert float(p[table].std()) == pytest.approx(0.02, abs=0.001)
  for i in range(2):
    block = p[f"h_{i}"]
    stds = {("attn", "c_attn"): 0.02, ("mlp", "c_fc"): 0.02,
            ("attn", "c_proj"): 0.02 / math.sqrt(2 * 2),  # residual scaling
            ("mlp", "c_proj"): 0.02 / math.sqrt(2 * 2)}
    for path, std in stds.items():
      conv = _get(block, path)
      assert float(conv["weight"].std()) == pytest.approx(std, abs=0.1 * std), path
      np.testing.assert_array_equal(conv["bias"], 0.0)
    assert block["attn"]["c_attn"]["weight"].shape == (64, 192)  # Conv1D [in, out]
  assert p["embedding"].shape == (10000, 64)


def test_init_std_config():
  cfg = ModelConfig(variant="gpt2", init_std=0.005)
  p = tinylm.init_params(jax.random.key(0), cfg)
  assert float(p["embedding"].std()) == pytest.approx(0.005, abs=0.0005)
  assert float(p["pos_embedding"].std()) == pytest.approx(0.02, abs=0.002)  # HF's wpe


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(small, variant):
  cfg = _small(variant)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
  fwd = jax.jit(tinylm.apply, static_argnums=1)
  t = 5
  changed = ids.copy()
  changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
  a = fwd(small[variant], cfg, jnp.asarray(ids))
  b = fwd(small[variant], cfg, jnp.asarray(changed))
  np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
  assert float(jnp.abs(a[:, t:] - b[:, t:]).min(axis=-1).max()) > 0.0
  assert float(jnp.abs(a[:, -1] - b[:, -1]).max()) > 1e-4  # later rows see it


def test_position_dependence(small):
  # Same token everywhere: only the positional table makes rows differ.
  cfg = _small("encoder")
  logits = tinylm.apply(small["encoder"], cfg, jnp.full((1, T), 3))
  assert float(jnp.abs(logits[0, 0] - logits[0, 1]).max()) > 0.0


def test_rejects_too_long_sequence(small):
  cfg = _small("encoder")
  with pytest.raises(AssertionError, match="max_seq_len"):
    tinylm.apply(small["encoder"], cfg, jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_torch_state_dict_round_trip(lab, tmp_path, variant, dtype):
  cfg = ModelConfig(variant=variant)
  params = jax.tree.map(lambda a: a.astype(dtype), lab[variant])
  sd = torch_io.params_to_torch_state_dict(params, cfg)
  assert set(sd) == TORCH_KEYS[variant]
  assert sd["embedding.weight" if variant == "encoder" else "lm_head.weight"].shape == (10000, 64)
  for v in sd.values():
    assert isinstance(v, np.ndarray)
    assert v.dtype == (np.dtype(dtype) if dtype == "float32" else jnp.bfloat16)
  _assert_trees_bit_equal(torch_io.params_from_torch_state_dict(sd, cfg), params)
  path = str(tmp_path / "model.safetensors")  # and through a safetensors file
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()
             if k != "lm_head.weight"}, path)  # HF drops the tied head
  _assert_trees_bit_equal(torch_io.load_torch_checkpoint(path, cfg), params)


def test_torch_keys_for_layers(small):
  sd = torch_io.params_to_torch_state_dict(small["encoder"], _small("encoder"))
  assert sd["transformer.layers.1.self_attn.in_proj_weight"].shape == (96, 32)
  assert sd["transformer.layers.0.linear1.weight"].shape == (128, 32)  # [out, in]
  sd = torch_io.params_to_torch_state_dict(small["gpt2"], _small("gpt2"))
  assert sd["transformer.h.1.mlp.c_fc.weight"].shape == (32, 128)  # [in, out]
  assert sd["lm_head.weight"] is sd["transformer.wte.weight"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_checkpoints_fail_clearly(small, variant):
  cfg = _small(variant)
  good = torch_io.params_to_torch_state_dict(small[variant], cfg)
  good.pop("lm_head.weight", None)  # optional for gpt2 (tied); tested below
  first = "embedding.weight" if variant == "encoder" else "transformer.wte.weight"
  cases = {
      "missing": ({k: v for k, v in good.items() if k != first}, "missing " + first),
      "unexpected": ({**good, "decoder.weight": good[first]}, "unexpected decoder.weight"),
      "shape": ({**good, first: good[first][:-1]}, first + ": checkpoint shape"),
      "other variant": (torch_io.params_to_torch_state_dict(
          small[_other(variant)], _small(_other(variant))), "does not match"),
  }
  for name, (sd, pattern) in cases.items():
    with pytest.raises(ValueError, match=pattern) as cm:
      torch_io.params_from_torch_state_dict(sd, cfg)
    assert "\n" not in str(cm.value), name


def test_gpt2_untied_head_rejected(small):
  cfg = _small("gpt2")
  sd = dict(torch_io.params_to_torch_state_dict(small["gpt2"], cfg))
  sd["lm_head.weight"] = sd["lm_head.weight"] + 1
  with pytest.raises(ValueError, match="tied"):
    torch_io.params_from_torch_state_dict(sd, cfg)


def test_bad_config():
  with pytest.raises(ValueError, match="variant"):
    tinylm.init_params(jax.random.key(0), ModelConfig(variant="llama"))
  with pytest.raises(ValueError, match="divisible"):
    tinylm.init_params(jax.random.key(0), ModelConfig(num_heads=3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_is_apply_without_the_head(small, variant):
  cfg = _small(variant)
  ids = jnp.arange(B * T).reshape(B, T) % cfg.vocab_size
  for params in (small[variant], _bf16(small[variant])):
    _, h = tinylm.apply(params, cfg, ids, return_hidden=True)
    gemm = tinylm.resolve_gemm()
    np.testing.assert_array_equal(_bits(tinylm.hidden(params, cfg, ids, gemm)), _bits(h))


# tied_nll.tied_logits_nll against the materialised logits + log_softmax.


@pytest.fixture(scope="module")
def nll():
  """(cfg, params, ids) of a 1-layer model for the tied-logits loss tests."""
  cfg = ModelConfig(vocab_size=NLL_VOCAB, hidden_dim=32, num_layers=1, num_heads=2,
                    max_seq_len=NLL_T)
  params = tinylm.init_params(jax.random.key(2), cfg)
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(0, NLL_VOCAB, (NLL_B, NLL_T)), jnp.int32)
  return cfg, params, ids


def _losses(cfg, ids, params, block_rows):

  def reference(p):  # the loss as train.loss_and_hidden computed it before
    logits = tinylm.apply(p, cfg, ids)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

  def fused(p):
    gemm = tinylm.resolve_gemm()
    h = tinylm.hidden(p, cfg, ids, gemm)
    return tied_nll.tied_logits_nll(h[:, :-1], p["embedding"], ids[:, 1:], gemm=gemm,
                                    block_rows=block_rows)

  return (jax.jit(jax.value_and_grad(reference))(params),
          jax.jit(jax.value_and_grad(fused))(params), jax.jit(fused)(params))


@pytest.mark.parametrize("block_rows", [1, 15, 45, 1000])  # 1 row block per sequence ... one block
def test_fp32_loss_and_grads_match(nll, block_rows):
  cfg, params, ids = nll
  (l_ref, g_ref), (l, g), l_primal = _losses(cfg, ids, params, block_rows)
  # fp32: only summation order differs (the tests' LOGITS_RTOL / GRAD_RTOL).
  np.testing.assert_allclose(l, l_ref, rtol=1e-6)
  assert float(l_primal) == float(l)  # the no-grad path, same bits
  for path, ref in jax.tree_util.tree_leaves_with_path(g_ref):
    got = _get(g, [k.key for k in path])
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert err < 1e-5, jax.tree_util.keystr(path)


def test_bf16_loss_and_grads_match(nll):
  cfg, params, ids = nll
  (l_ref, g_ref), (l, g), _ = _losses(cfg, ids, _bf16(params), 30)
  # Same bf16 logits, f32 softmax: the loss differs by f32 rounding only.
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  for path, ref in jax.tree_util.tree_leaves_with_path(g_ref):
    got = _get(g, [k.key for k in path])
    assert got.dtype == jnp.bfloat16
    ref, got = ref.astype(jnp.float32), got.astype(jnp.float32)
    # dlogits rounded to bf16 on both sides, then GEMMs summed in different
    # orders: a few bf16 ulps (2^-8 relative) of the largest entry.
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert err < 3e-2, jax.tree_util.keystr(path)


def test_gemm_operand_dtype_changes_no_value(nll):
  # f32 operands holding bf16 values: exact products, f32 sums either way.
  cfg, params, ids = nll
  params = _bf16(params)
  h = tinylm.hidden(params, cfg, ids, "float32")
  losses = {}
  hlo = {}
  for name in ("float32", "bfloat16"):
    fn = jax.jit(lambda *a, name=name: tied_nll.tied_logits_nll(*a, gemm=name, block_rows=0))
    losses[name] = float(fn(h[:, :-1], params["embedding"], ids[:, 1:]))
    hlo[name] = fn.lower(h[:, :-1], params["embedding"], ids[:, 1:]).as_text()
  assert losses["float32"] == pytest.approx(losses["bfloat16"], abs=1e-5)
  # The setting reached the GEMMs: bf16 operands only on the bfloat16 path.
  dots = {k: re.findall(r"dot_general.*?: \(tensor<[^>]*x(\w+)>", v) for k, v in hlo.items()}
  assert dots["float32"] and set(dots["float32"]) == {"f32"}, dots["float32"]
  assert "bf16" in set(dots["bfloat16"]), dots["bfloat16"]


def test_gemm_operands_auto_follows_the_cpus_bf16_units():
  assert backend.gemm_operands(frozenset({"avx2", "avx512f"})) == "float32"
  assert backend.gemm_operands(frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
  assert backend.gemm_operands(frozenset({"amx_bf16", "amx_tile"})) == "bfloat16"
  assert backend.gemm_path("float32") == "float32 operands (forced)"
  assert backend.gemm_path().startswith(backend.gemm_operands() + " operands (cpu: ")


def _bf16(params):
  return jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)



def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _other(variant):
  return "gpt2" if variant == "encoder" else "encoder"
