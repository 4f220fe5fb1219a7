"""A run's host-side preparation: the step-0 state, row 0, and a member's traced values."""

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
  return step.TrainState(params, adamw.init(params),
                         {k.key: jnp.asarray(k.init(dims)) for k in trackers},
                         policies.init(policy, params, step.sr_key_data(cfg)))


def initial_records(cfg: config_lib.ExperimentConfig, state: step.TrainState, rows) -> dict:
  """Row 0 of every series that has one (the state before any step)."""
  table = state.params[step.EMBEDDING]
  w0 = table if rows is None else table[jnp.asarray(rows)]
  return {s.key: np.asarray(s.initial(w0)) for s in probes_lib.of_config(cfg).series
          if s.initial is not None}


def member_data(cfg: config_lib.ExperimentConfig, table_rows: int) -> step.MemberData:
  """A member's traced values as numpy arrays; its scalar table padded to `table_rows`
  with copies of its last row (the lookup clips there, so the values are unchanged)."""
  c = adamw.coefficients(cfg.optim)
  t = np.asarray(c.table)
  table = np.concatenate([t, np.repeat(t[-1:], table_rows - len(t), axis=0)])
  return step.MemberData(np.asarray(jax.random.key_data(step.data_key(cfg))),
                         c._replace(table=table, **{k: np.asarray(getattr(c, k), np.float32)
                                                    for k in c._fields if k != "table"}))
