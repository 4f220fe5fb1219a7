"""A run's step-0 state, row 0, and a member's traced values (the TrainState itself is
`step.TrainState`: this module builds its first value)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt import config as config_lib
from jaxdt import probes as probes_lib
from jaxdt.model import tinylm
from jaxdt.model import torch_io
from jaxdt.numerics import precision
from jaxdt.optim import adamw
from jaxdt.optim import policies
from jaxdt.training import step


def init_state(cfg: config_lib.ExperimentConfig, dims: probes_lib.Dims) -> step.TrainState:
  """Step-0 state: PyTorch-style init in f32 (or --init_checkpoint), cast by the precision."""
  init_key, _ = step.root_keys(cfg.seed)
  policy = precision.get_policy(cfg.precision)
  if cfg.init_checkpoint:
    params = torch_io.load_torch_checkpoint(cfg.init_checkpoint, cfg.model)
  else:
    params = tinylm.init_params(init_key, cfg.model)
  params = precision.cast_params(params, policy)
  adamw.scalar_table(cfg.optim)  # refuses betas whose bias corrections never settle
  trackers = probes_lib.of_config(cfg).trackers
  return step.TrainState(params, adamw.torch_adamw(cfg.optim).init(params),
                         {k.key: jnp.asarray(k.init(dims)) for k in trackers},
                         policies.init(policy, params, step.sr_key_data(cfg)))


def initial_records(cfg: config_lib.ExperimentConfig, state: step.TrainState, rows) -> dict:
  """Row 0 of every series that has one (the state before any step)."""
  table = state.params[step.EMBEDDING]
  w0 = table if rows is None else table[jnp.asarray(rows)]
  return {s.key: np.asarray(s.initial(w0)) for s in probes_lib.of_config(cfg).series
          if s.initial is not None}


def member_data(cfg: config_lib.ExperimentConfig) -> step.MemberData:
  """A member's traced values besides its state, as numpy arrays."""
  return step.MemberData(np.asarray(jax.random.key_data(step.data_key(cfg))))


def pad_coefficients(states: list) -> list:
  """Member states whose AdamW scalar tables are padded to one length (`adamw.pad_table`:
  the same values at every step), so they stack."""
  rows = max(len(s.opt_state.coef.table) for s in states)
  return [step.with_coefficients(s, adamw.pad_table(s.opt_state.coef, rows)) for s in states]
