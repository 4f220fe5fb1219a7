"""The pure step, scanned over chunks under `jit`.

`make_step(...)` builds `step(state, t) -> (state, (record, loss))`: sample
batch t, loss and grads with the lab's bf16 semantics, the torch-exact AdamW
update, and the declared probes over the recorded rows. `make_run_chunk`
scans it over K steps under `jit`.

Keys come from (seed, purpose): the model init and the data order never share
randomness, and the batch of step t is a pure function of (data key, t).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdt import config as config_lib
from jaxdt.data import sampler
from jaxdt.model import tied_nll
from jaxdt.model import tinylm
from jaxdt.model import torch_io
from jaxdt.numerics import lattice
from jaxdt.numerics import ordered
from jaxdt.numerics import precision
from jaxdt.optim import adamw
from jaxdt import probes as probes_lib


INIT_PURPOSE, DATA_PURPOSE = 0, 1  # fold_in constants of the root key
EMBEDDING = "embedding"  # the token table's key in model params


class TrainState(NamedTuple):
  """Everything a step carries; all leaves are arrays (checkpointed as one tree)."""

  params: dict
  opt_state: adamw.AdamWState
  probe_state: dict  # tracker key -> array, e.g. last_motion_step


def root_keys(seed: int):
  """(init key, data key) from the random seed, split by purpose."""
  root = jax.random.key(seed)
  return jax.random.fold_in(root, INIT_PURPOSE), jax.random.fold_in(root, DATA_PURPOSE)


def data_key(cfg: config_lib.ExperimentConfig):
  """The data order's key: from `data_seed` when set, else from `seed` (root_keys)."""
  return root_keys(cfg.seed if cfg.data_seed is None else cfg.data_seed)[1]


class Member(NamedTuple):
  """What differs between the members of one compiled sweep group, as traced data."""

  data_key: jax.Array  # key data (`jax.random.key_data`) of the member's data order
  coef: adamw.Coefficients  # the member's AdamW coefficients (f32 scalars and table)


def member_of(cfg: config_lib.ExperimentConfig, table_rows: int) -> Member:
  """A member's traced constants as numpy arrays; its scalar table padded to `table_rows`
  with copies of its last row (the lookup clips there, so the values are unchanged)."""
  c = adamw.coefficients(cfg.optim)
  t = np.asarray(c.table)
  table = np.concatenate([t, np.repeat(t[-1:], table_rows - len(t), axis=0)])
  return Member(np.asarray(jax.random.key_data(data_key(cfg))),
                c._replace(table=table, **{k: np.asarray(getattr(c, k), np.float32)
                                           for k in c._fields if k != "table"}))


def hyper(cfg: config_lib.ExperimentConfig) -> config_lib.OptimConfig:
  """AdamW's hyperparameters: the config's own `OptimConfig`."""
  return cfg.optim


def loss_and_hidden(params, cfg: config_lib.ModelConfig, batch: sampler.Batch):
  """Mean next-token cross entropy (f32) and the mean final hidden state.

  The model runs in the params' dtype (bf16 for the lab's runs); logits[:, :L']
  are scored against the targets (the data module's convention), with the
  log-softmax in f32 from the bf16 logits. `tied_nll.tied_logits_nll` does the
  logits and the loss block by block, so the (B, L', V) logits never exist and
  position L' onward is never projected (torch computes and drops it).
  """
  h = tinylm.hidden(params, cfg, batch.inputs)  # (B, T, D)
  n_targets = batch.targets.shape[1]
  loss = tied_nll.tied_logits_nll(h[:, :n_targets], params[EMBEDDING], batch.targets)
  h_mean = ordered.mean_rows(h.reshape(-1, h.shape[-1]))  # (D,)
  return loss, h_mean


def init_state(cfg: config_lib.ExperimentConfig, dims: probes_lib.Dims) -> TrainState:
  """Step-0 state: PyTorch-style init in f32, cast by the precision policy."""
  init_key, _ = root_keys(cfg.seed)
  policy = precision.get_policy(cfg.precision)
  if cfg.init_checkpoint:
    params = torch_io.load_torch_checkpoint(cfg.init_checkpoint, cfg.model)
  else:
    params = tinylm.init_params(init_key, cfg.model)
  params = precision.cast_params(params, policy)
  adamw.scalar_table(cfg.optim)  # refuses betas whose bias corrections never settle
  trackers = probes_lib.of_config(cfg).trackers
  return TrainState(params, adamw.init(params),
                    {k.key: jnp.asarray(k.init(dims)) for k in trackers})


def _gather(x, rows):
  return x if rows is None else x[rows]


def make_step(cfg: config_lib.ExperimentConfig, tokens: np.ndarray, rows: Optional[np.ndarray],
              member: Optional[Member] = None):
  """The pure step `step(state, t) -> (state, (record, loss))` for this experiment.

  `record` holds the declared probes' values (what the file stores); `loss`
  is the f32 loss, which the host watches for divergence. `member`: a sweep
  member's traced data key and AdamW coefficients (the config then gives only
  the structure); None = the config's own, as constants.
  """
  sample = sampler.make_sampler(tokens, cfg.data)
  key = (data_key(cfg) if member is None
         else jax.random.wrap_key_data(member.data_key, impl=jax.random.key_impl(data_key(cfg))))
  coef = None if member is None else member.coef
  policy = precision.get_policy(cfg.precision)
  hp = cfg.optim
  built = probes_lib.of_config(cfg)
  series, trackers = built.series, built.trackers
  row_idx = None if rows is None else jnp.asarray(rows, jnp.int32)

  def objective(params, batch):
    return loss_and_hidden(precision.compute_params(params, policy), cfg.model, batch)

  def step(state: TrainState, t):
    batch = sample(key, t)
    with tinylm.gemm_operands(cfg.model.gemm_operands):  # traced once, on the host's path
      (loss, h_mean), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch)
    params, opt_state = adamw.step(hp, state.params, grads, state.opt_state, coef)
    view = probes_lib.StepView(
        t=t, w_prev=_gather(state.params[EMBEDDING], row_idx),
        w_next=_gather(params[EMBEDDING], row_idx), grad=_gather(grads[EMBEDDING], row_idx),
        m=_gather(opt_state.mu[EMBEDDING], row_idx), v=_gather(opt_state.nu[EMBEDDING], row_idx),
        loss=lattice.bf16_round_trip(loss), h_mean=h_mean, loss_f32=loss, coef=coef)
    record = {s.key: s.record(view) for s in series}
    probe_state = {k.key: k.update(state.probe_state[k.key], view) for k in trackers}
    return TrainState(params, opt_state, probe_state), (record, loss)

  return step


def make_run_chunk(step):
  """`run_chunk(state, start, length) -> (state, records)`: steps start+1..start+length."""

  def run_chunk(state, start, length):
    ts = start + 1 + jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(step, state, ts)

  return jax.jit(run_chunk, static_argnums=2, donate_argnums=0)


def initial_records(cfg, state: TrainState, rows) -> dict:
  """Row 0 of every series that has one (the state before any step)."""
  w0 = _gather(state.params[EMBEDDING], None if rows is None else jnp.asarray(rows))
  return {s.key: np.asarray(s.initial(w0)) for s in probes_lib.of_config(cfg).series
          if s.initial is not None}
