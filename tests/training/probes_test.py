"""Probes: factories over the run's constants, explicit file keys, collisions refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdt import config as config_lib
from jaxdt.numerics import lattice
from jaxdt import probes

D = 4


def _view(w_prev, w_next, t=3):
  z = jnp.zeros_like(w_prev)
  return probes.StepView(t=jnp.int32(t), w_prev=w_prev, w_next=w_next, grad=z, m=z, v=z,
                         loss=jnp.float32(2.5), h_mean=jnp.zeros(D), loss_f32=jnp.float32(2.5))


def _rows():
  w = jnp.asarray(np.linspace(0.1, 0.9, 2 * D).reshape(2, D), jnp.bfloat16)
  bits = lattice.bf16_to_bits(w)
  nudged = bits.at[0, 0].add(1)  # row 0 moves one cell, row 1 stays
  return w, lattice.bits_to_bf16(nudged)


def test_the_step_view_holds_arrays_only():
  assert set(probes.StepView._fields) == {"t", "w_prev", "w_next", "grad", "m", "v", "loss",
                                          "h_mean", "loss_f32", "coef"}
  # coef: the step's AdamW coefficients, arrays too (constants solo, traced in a sweep).
  from jaxdt.optim import adamw  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(adamw.coefficients(config_lib.OptimConfig(1e-3)))
  assert leaves and all(isinstance(x, (np.ndarray, np.generic)) for x in leaves)


def test_probes_close_over_the_config():
  w_prev, w_next = _rows()
  view = _view(w_prev, w_next)
  ctx = probes.Context(config_lib.OptimConfig(1e-3))
  tracker, = probes.build(["last_motion_step"], ctx).trackers
  assert tracker.update(jnp.full(2, -1, jnp.int32), view).tolist() == [3, -1]
  strict = ctx._replace(motion_threshold=1.5)  # a one-cell move is below it
  tracker, = probes.build(["last_motion_step"], strict).trackers
  assert tracker.update(jnp.full(2, -1, jnp.int32), view).tolist() == [-1, -1]
  loss, = probes.build(["loss"], ctx._replace(loss_initial=0.0)).series
  assert float(loss.initial(w_prev)) == 0.0
  loss, = probes.build(["loss"], ctx).series
  assert np.isnan(float(loss.initial(w_prev)))


def test_context_of_a_config():
  cfg = config_lib.ExperimentConfig(
      optim=config_lib.OptimConfig(3e-4, weight_decay=0.1),
      probes=config_lib.ProbeConfig(motion_threshold=0.5, loss_initial=0.0))
  assert probes.Context.of(cfg) == probes.Context(cfg.optim, 0.5, 0.0)


def test_file_keys_are_explicit_and_collisions_refused():
  ctx = probes.Context(config_lib.OptimConfig(1e-3))
  built = probes.build(["W", "last_motion_step", "m", "loss", "lab_scalars"], ctx)
  dims = probes.Dims(rows=2, hidden=D, param_dtype=jnp.bfloat16)
  specs = built.file_specs(dims, steps=5)
  assert list(specs) == ["W", "last_motion_step", "m", "loss"]  # declaration order
  assert specs["W"] == (np.dtype(np.uint16), (6, 2, D))
  assert specs["last_motion_step"] == (np.dtype(np.int32), (2,))
  assert built.statics[0].keys[0] == "vocab_size"
  with pytest.raises(ValueError, match="probes 'W' and 'W_bf16' both write the file key 'W'"):
    probes.build(["W", "W_bf16"], ctx)
  with pytest.raises(ValueError, match="'grad_W' and 'grad_W_bits' both write"):
    probes.build(["grad_W", "grad_W_bits"], ctx)
  with pytest.raises(ValueError, match="unknown probes \\['nope'\\]"):
    probes.build(["W", "nope"], ctx)


def test_every_experiments_probes_build(tiny_data):
  import experiments
  for name in experiments.NAMES:
    cfg = experiments.load(name)
    built = probes.of_config(cfg)
    assert built.series or built.trackers, name
  cfg = experiments.load("crucible1")
  bad = dataclasses.replace(cfg, probes=dataclasses.replace(cfg.probes, names=("W", "W_bf16")))
  with pytest.raises(ValueError, match="both write"):
    probes.of_config(bad)
