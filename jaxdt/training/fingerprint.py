"""The arithmetic fingerprint of a host: a fixed tiny run through the run's own kernels.

The bits a run produces depend on the host's arithmetic: its GEMM path, its
CPU's kernels (vector width, thread split), the backend. A fingerprint is the
SHA-256 of a fixed, built-in tiny computation: a few steps of a small Crucible
1 through the very program a run compiles (`step.make_chunk`: the model, the
tied loss, torch-exact AdamW with its subnormal-exact moments, the probes),
on the run's GEMM path. Two hosts with equal fingerprints do the same
arithmetic on these kernels; a resume on a host with another fingerprint is
refused (`io.hosts`), since its file would be the bytes of no uninterrupted run.

The tokens are an explicit linear congruential sequence (no library RNG), ids
0..31 of a 64-id vocabulary, so ids 32..63 are dead rows.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdt import config as config_lib
from jaxdt import probes as probes_lib
from jaxdt.model import tinylm
from jaxdt.numerics import backend
from jaxdt.numerics import precision
from jaxdt.training import initial
from jaxdt.training import step

VOCAB, LIVE, HIDDEN, BATCH, SEQ, STEPS = 64, 32, 16, 2, 8, 4
PROBES = ("W", "delta_W_prime", "centroid", "loss", "last_motion_step", "adam_accounting",
          "m", "v", "g")


def fixed_config(gemm: str) -> config_lib.ExperimentConfig:
  """The built-in tiny Crucible 1 (vocab 64, D 16, batch 2 x 8, 4 steps) on GEMM path `gemm`."""
  return config_lib.ExperimentConfig(
      name="fingerprint", steps=STEPS,
      model=config_lib.ModelConfig(vocab_size=VOCAB, hidden_dim=HIDDEN, max_seq_len=SEQ,
                                   gemm_operands=gemm),
      data=config_lib.DataConfig(batch_size=BATCH, seq_len=SEQ),
      probes=config_lib.ProbeConfig(names=PROBES))


def fixed_tokens(n: int = 4096) -> np.ndarray:
  """An LCG's ids in [0, LIVE): the same on every host and numpy version."""
  x, out = 12345, np.empty(n, np.int32)
  for i in range(n):
    x = (1103515245 * x + 12345) % 2**31
    out[i] = (x >> 16) % LIVE
  return out


def tensors(gemm: str) -> dict:
  """{name: sha256} of every record and of the final state of the fixed run."""
  cfg = fixed_config(gemm)
  rows = np.arange(LIVE, VOCAB)
  dims = probes_lib.Dims(rows.size, HIDDEN, precision.get_policy(cfg.precision).param_dtype)
  state = initial.init_state(cfg, dims)
  mesh = Mesh(np.array(jax.local_devices()[:1]), ("m",))
  chunk = step.make_chunk(cfg, fixed_tokens(), rows, mesh)
  stack = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
  data = stack(initial.member_data(cfg))
  final, (records, losses) = chunk(stack(state), data, jnp.int32(0), STEPS)
  final = step.without_coefficients(final)  # the config's constants, not an outcome
  leaves = {f"record/{k}": v for k, v in jax.device_get(records).items()}
  leaves["losses"] = np.asarray(losses)
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(final))[0]:
    leaves["state" + jax.tree_util.keystr(path)] = leaf
  return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
          for k, v in sorted(leaves.items())}


@functools.cache
def fingerprint(gemm_setting: str = "auto") -> str:
  """The host's arithmetic fingerprint on the GEMM path `gemm_setting` resolves to."""
  gemm = tinylm.resolve_gemm(gemm_setting)
  digests = tensors(gemm)
  text = "\n".join(f"{k} {v}" for k, v in digests.items())
  return hashlib.sha256(f"{gemm}\n{text}".encode()).hexdigest()


def describe(gemm_setting: str = "auto") -> str:
  """The `--fingerprint` report: the fingerprint, then the CPU and backend it describes."""
  cpu = backend.cpu_description()
  return "\n".join([
      f"fingerprint={fingerprint(gemm_setting)}",
      f"cpu: {cpu['cpu_model']}; features: {' '.join(cpu['cpu_features']) or 'none known'}",
      f"gemm: {backend.gemm_path(gemm_setting)}; backend {jax.default_backend()}, "
      f"{backend.cpu_threads()} CPU threads, jaxlib {jax.lib.__version__}"])
