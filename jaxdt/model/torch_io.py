"""torch state_dict <-> params: the lab's checkpoints in, ours out.

Parameters keep torch's names and layouts, so a state_dict maps on by
renaming; shapes and missing or extra keys are refused with the key named.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdt.config import ModelConfig
from jaxdt.model import tinylm


# -- torch state_dict <-> params -----------------------------------------------
# Non-parameter buffers older HF GPT-2 checkpoints carry (causal mask, -1e4).
_GPT2_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias$")


def _torch_key(cfg: ModelConfig, path: tuple[str, ...]) -> str:
  """The torch state_dict key of the parameter at `path` in params."""
  top, rest = path[0], list(path[1:])
  if cfg.variant == "encoder":
    tables = {"embedding": "embedding.weight", "pos_embedding": "pos_embedding.weight"}
    layers, ln_f = "transformer.layers.", "ln_f"
  else:
    tables = {"embedding": "transformer.wte.weight", "pos_embedding": "transformer.wpe.weight"}
    layers, ln_f = "transformer.h.", "transformer.ln_f"
  if top in tables:
    return tables[top]
  if top == "ln_f":
    return ".".join([ln_f] + rest)
  return layers + ".".join([top.split("_")[-1]] + rest)  # layers_1 / h_1 -> 1


def _torch_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{torch state_dict key: (params path, shape)} for every parameter of `cfg`."""
  shapes = jax.eval_shape(lambda: tinylm.init_params(jax.random.key(0), cfg))
  flat = traverse_util.flatten_dict(shapes)
  return {_torch_key(cfg, p): (p, tuple(s.shape)) for p, s in flat.items()}


def params_to_torch_state_dict(params: tinylm.Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Params as a torch-named dict of numpy arrays (dtype kept; bf16 as ml_dtypes).

  gpt2 adds `lm_head.weight`, the same array as `transformer.wte.weight` (tied).
  """
  flat = traverse_util.flatten_dict(params)
  sd = {_torch_key(cfg, p): np.asarray(a) for p, a in flat.items()}
  if cfg.variant == "gpt2":
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
  return sd


def _to_numpy(x) -> np.ndarray:
  """numpy view of an array or torch tensor, bit for bit (bf16 included)."""
  if type(x).__module__.startswith("torch"):
    import torch  # pylint: disable=g-import-not-at-top
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
      return x.view(torch.int16).numpy().view(jnp.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _few(keys: list[str]) -> str:
  return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "") or "none"


def params_from_torch_state_dict(state_dict: dict[str, Any], cfg: ModelConfig) -> tinylm.Params:
  """Params from a torch state_dict (numpy arrays or torch tensors), dtype kept.

  Args:
    state_dict: TinyLM (encoder) or GPT2LMHeadModel (gpt2) keys. gpt2 accepts a
      tied `lm_head.weight` (must equal wte) or none, and ignores attn mask buffers.
    cfg: the architecture to load into.

  Returns:
    A nested params dict of jax arrays with the checkpoint's dtypes.

  Raises:
    ValueError: on missing or unexpected keys, a wrong shape, or an untied lm_head.
  """
  tinylm.check_config(cfg)
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  expected = _torch_shapes(cfg)
  if cfg.variant == "gpt2":
    sd = {k: v for k, v in sd.items() if not _GPT2_BUFFERS.match(k)}
    head = sd.pop("lm_head.weight", None)
    wte = sd.get("transformer.wte.weight")
    if head is not None and wte is not None and not np.array_equal(head, wte):
      raise ValueError("lm_head.weight differs from transformer.wte.weight; TinyLM is tied")
  missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(f"checkpoint does not match the {cfg.variant} TinyLM: missing "
                     f"{_few(missing)}, unexpected {_few(unexpected)}")
  flat = {}
  for key, (path, shape) in expected.items():
    if sd[key].shape != shape:
      raise ValueError(f"{key}: checkpoint shape {sd[key].shape} != {shape} "
                       f"expected for {cfg}")
    flat[path] = jnp.asarray(sd[key])
  return traverse_util.unflatten_dict(flat)


def load_torch_checkpoint(path: str | pathlib.Path, cfg: ModelConfig) -> tinylm.Params:
  """Params from a .safetensors file, or a torch .pt/.pth (needs torch).

  A .pt may be the lab's `{'model_state_dict': ...}` checkpoint or a bare
  state_dict. Array dtypes are kept (bf16 stays bf16, bit for bit).

  Args:
    path: checkpoint file.
    cfg: the architecture to load into.

  Returns:
    Params as in `params_from_torch_state_dict`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"--init_checkpoint {path} does not exist; pass the lab's step-0 .pt or a "
                     ".safetensors state_dict")
  unreadable = (f"--init_checkpoint {path} is not a readable torch state_dict; pass the lab's "
                "step-0 .pt or a .safetensors state_dict")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = load_file(path)
    except Exception:  # safetensors raises its own error types
      raise ValueError(unreadable) from None
    return params_from_torch_state_dict(state, cfg)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"reading {path} needs torch; install it or convert the checkpoint to "
                     ".safetensors") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception:  # pickle, zip and torch errors alike: not a state_dict we can read
    raise ValueError(unreadable) from None
  if isinstance(obj, dict) and "model_state_dict" in obj:
    obj = obj["model_state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  return params_from_torch_state_dict(obj, cfg)
