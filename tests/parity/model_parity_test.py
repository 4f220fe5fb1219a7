"""jaxdt.model against PyTorch on the same weights.

encoder: the lab's TinyLM class, unchanged from Crucible 1 (its notebook; docs/experiments.md), as
benchmarks/torch_crucible1.py holds it.
gpt2: HF GPT2LMHeadModel built as Thimble 1 builds it; tested only where
transformers is importable (a hand-written torch GPT-2 would prove nothing).

Relative error = max|jax - torch| / max|torch|. Without torch these tests skip,
except under CI (env CI set), where they fail.
Run with `-s` to see the measured errors.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdt.config import ModelConfig
from jaxdt.model import tinylm
from jaxdt.model import torch_io

try:
  import torch
  import torch.nn as nn
  import torch.nn.functional as F
except ImportError:
  torch = None
try:
  from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:
  GPT2LMHeadModel = None

SMALL = dict(vocab_size=257, hidden_dim=64, num_layers=2, num_heads=2, max_seq_len=32)
LAB = dict(vocab_size=10000, hidden_dim=64, num_layers=2, num_heads=2, max_seq_len=128)
# name: (config kwargs, batch, seq_len)
SIZES = {"small": (SMALL, 3, 16), "lab": (LAB, 1, 128)}
VARIANTS = ("encoder", "gpt2")
LOGITS_RTOL = 1e-5  # fp32 forward: different summation orders only
GRAD_RTOL = 1e-4  # fp32 grads go through softmax/LayerNorm backward twice
BF16_LOSS_ATOL = 1e-2  # bf16 rounding differs op by op (XLA vs torch CPU kernels)


@pytest.fixture(autouse=True, scope="module")
def _needs_torch():
  if torch is None:
    if os.environ.get("CI"):
      raise AssertionError("torch must be importable for the parity tests under CI")
    pytest.skip("torch is not installed")


def _lab_tinylm():
  """The lab's TinyLM class (Crucible 1, cell 7, unchanged): `torchref.lab`, the one copy
  the parity test, the torch peer and the benchmark share."""
  from torchref import lab  # pylint: disable=g-import-not-at-top
  return lab.TinyLM


def _torch_model(cfg, seed=0):
  """The lab's torch model for `cfg`, fp32, train mode (as the lab trains)."""
  torch.manual_seed(seed)
  if cfg.variant == "encoder":
    m = _lab_tinylm()(cfg.vocab_size, cfg.hidden_dim, cfg.num_layers, cfg.num_heads,
                      cfg.max_seq_len)
  else:
    m = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.hidden_dim,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True))
    with torch.no_grad():  # Thimble 1
      nn.init.normal_(m.transformer.wte.weight, mean=0.0, std=0.02)
  return m.train()


def _torch_forward(m, ids):
  """(logits, post-ln_f hidden) of the torch model."""
  seen = []
  ln_f = m.ln_f if isinstance(m, _lab_tinylm()) else m.transformer.ln_f
  hook = ln_f.register_forward_hook(lambda mod, inp, out: seen.append(out))
  out = m(ids)
  hook.remove()
  return (out if torch.is_tensor(out) else out.logits), seen[0]


def _torch_loss(logits, ids):
  """The lab's loss: logits[:, :-1] against ids[:, 1:], mean."""
  return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                         ids[:, 1:].reshape(-1))


def _jax_loss(params, cfg, ids):
  logits, h = tinylm.apply(params, cfg, ids, return_hidden=True)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  loss = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
  return loss, (logits, h)


def _np(t):
  """numpy copy of a torch tensor, bf16 bits kept."""
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _ids(cfg, batch, seq_len, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))


def _cfg(variant, kwargs):
  if variant == "gpt2" and GPT2LMHeadModel is None:
    if os.environ.get("CI"):  # a test dependency: missing in CI is a failure
      raise AssertionError("transformers must be importable for gpt2 parity under CI")
    pytest.skip("transformers not installed: gpt2 parity untested")
  return ModelConfig(variant=variant, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", tuple(SIZES))
def test_fp32_logits_and_grads(variant, name):
  kwargs, batch, seq_len = SIZES[name]
  cfg = _cfg(variant, kwargs)
  tm = _torch_model(cfg)
  ids = _ids(cfg, batch, seq_len)
  t_ids = torch.from_numpy(ids)
  t_logits, t_h = _torch_forward(tm, t_ids)
  t_loss = _torch_loss(t_logits, t_ids)
  t_loss.backward()

  params = torch_io.params_from_torch_state_dict(tm.state_dict(), cfg)
  grad_fn = jax.jit(jax.value_and_grad(_jax_loss, has_aux=True), static_argnums=1)
  (loss, (logits, h)), grads = grad_fn(params, cfg, jnp.asarray(ids))

  errs = {"logits": _rel(logits, _np(t_logits)), "h": _rel(h, _np(t_h)),
          "loss": _rel(loss, _np(t_loss))}
  assert errs["logits"] < LOGITS_RTOL
  assert errs["h"] < LOGITS_RTOL
  assert errs["loss"] < LOGITS_RTOL
  jax_grads = torch_io.params_to_torch_state_dict(grads, cfg)
  grad_errs = {k: _rel(jax_grads[k], _np(p.grad)) for k, p in tm.named_parameters()}
  worst = max(grad_errs, key=grad_errs.get)
  print(f"\n[{variant}/{name} fp32] rel err logits {errs['logits']:.2e} "
        f"h {errs['h']:.2e} loss {errs['loss']:.2e}; worst grad "
        f"{grad_errs[worst]:.2e} ({worst})")
  for k, err in grad_errs.items():
    assert err < GRAD_RTOL, k


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", tuple(SIZES))
def test_bf16_loss(variant, name):
  kwargs, batch, seq_len = SIZES[name]
  cfg = _cfg(variant, kwargs)
  tm = _torch_model(cfg).to(torch.bfloat16)
  ids = _ids(cfg, batch, seq_len)
  t_ids = torch.from_numpy(ids)
  with torch.no_grad():
    t_logits, _ = _torch_forward(tm, t_ids)
    # The models are compared, not loss kernels: both losses are f32 CE of
    # the bf16 logits. (torch's CE in bf16 rounds the loss itself to bf16,
    # an ulp of 0.0625 near ln V; the trainer owns that choice.)
    t_loss = _torch_loss(t_logits.float(), t_ids)
    t_loss_bf16 = _torch_loss(t_logits, t_ids)
  params = torch_io.params_from_torch_state_dict(tm.state_dict(), cfg)
  assert params["embedding"].dtype == jnp.bfloat16
  loss, (logits, _) = jax.jit(_jax_loss, static_argnums=1)(params, cfg, jnp.asarray(ids))
  assert logits.dtype == jnp.bfloat16
  diff = abs(float(loss) - float(t_loss))
  print(f"\n[{variant}/{name} bf16] loss jax {float(loss):.5f} torch "
        f"{float(t_loss):.5f} |diff| {diff:.2e} (torch bf16 CE "
        f"{float(t_loss_bf16):.5f}); logits rel err {_rel(logits, _np(t_logits)):.2e}")
  assert diff < BF16_LOSS_ATOL


def test_encoder_eval_fast_path():
  # In eval/no_grad torch takes its fused encoder-layer kernel; same answer.
  cfg = ModelConfig(**SMALL)
  tm = _torch_model(cfg).eval()
  ids = _ids(cfg, 3, 16)
  with torch.no_grad():
    t_logits = tm(torch.from_numpy(ids))
  params = torch_io.params_from_torch_state_dict(tm.state_dict(), cfg)
  logits = tinylm.apply(params, cfg, jnp.asarray(ids))
  assert _rel(logits, _np(t_logits)) < LOGITS_RTOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_distributions_match_torch(variant):
  # Same distribution per tensor (not the same bits: torch's RNG is not ours).
  cfg = _cfg(variant, LAB)
  ours = torch_io.params_to_torch_state_dict(tinylm.init_params(jax.random.key(0), cfg), cfg)
  theirs = {k: _np(v) for k, v in _torch_model(cfg).state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  for k, t in theirs.items():
    o = ours[k]
    assert o.shape == t.shape, k
    if np.all(t == t.flat[0]):  # zeros / ones
      np.testing.assert_array_equal(o, t, err_msg=k)
      continue
    assert o.mean() == pytest.approx(0.0, abs=float(0.2 * t.std())), k  # float: approx refuses f32
    assert o.std() / t.std() == pytest.approx(1.0, abs=0.1 if t.size >= 4096 else 0.25), k
    assert np.abs(o).max() / np.abs(t).max() == pytest.approx(1.0, abs=0.25), k


def test_torch_encoder_layers_start_identical():
  # The fact init_params copies: nn.TransformerEncoder deep-copies one layer.
  sd = _torch_model(ModelConfig(**SMALL)).state_dict()
  for k, v in sd.items():
    if k.startswith("transformer.layers.1."):
      torch.testing.assert_close(v, sd[k.replace("layers.1.", "layers.0.")], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_lab_pt_checkpoint_bf16(tmp_path, variant):
  cfg = _cfg(variant, SMALL)
  tm = _torch_model(cfg).to(torch.bfloat16)
  path = os.path.join(tmp_path, "checkpoint_step_0.pt")
  torch.save({"step": 0, "model_state_dict": tm.state_dict(),
              "rng_state": torch.get_rng_state()}, path)
  params = torch_io.load_torch_checkpoint(path, cfg)
  back = torch_io.params_to_torch_state_dict(params, cfg)
  for k, v in tm.state_dict().items():
    np.testing.assert_array_equal(back[k].view(np.uint16), _np(v).view(np.uint16), err_msg=k)
