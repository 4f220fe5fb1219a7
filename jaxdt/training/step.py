"""The pure step, scanned over chunks under `jit`.

`make_step(...)` builds `step(state, t) -> (state, (record, loss))`: sample
batch t, loss and grads with the lab's bf16 semantics, the torch-exact AdamW
update, and the declared probes over the recorded rows. `make_chunk` is the
one compiled program of a run: its members (a solo run has one) on a leading
axis, spread over a device mesh, each scanned over K steps. Host-side
preparation (initial state, the members' data) lives in `training.runs`.

Keys come from (seed, purpose): the model init and the data order never share
randomness, and the batch of step t is a pure function of (data key, t).
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxdt import config as config_lib
from jaxdt.data import sampler
from jaxdt.data import vocabulary
from jaxdt.model import tied_nll
from jaxdt.model import tinylm
from jaxdt.numerics import lattice
from jaxdt.numerics import ordered
from jaxdt.numerics import precision
from jaxdt.optim import adamw
from jaxdt.optim import policies
from jaxdt import probes as probes_lib


INIT_PURPOSE, DATA_PURPOSE, SR_PURPOSE = 0, 1, 2  # fold_in constants of the root key
EMBEDDING = "embedding"  # the token table's key in model params


class TrainState(NamedTuple):
  """Everything a step carries; all leaves are arrays (checkpointed as one tree)."""

  params: dict
  opt_state: adamw.AdamWState
  probe_state: dict  # tracker key -> array, e.g. last_motion_step
  # The precision policy's own state (`policies.init`): {} for bf16, mixed and fp32 (no
  # leaves, so their checkpoints hold what they always held), the SR key for bf16_sr,
  # the Kahan buffers for bf16_kahan.
  policy_state: dict = {}


def without_coefficients(state: TrainState) -> TrainState:
  """The state without its AdamW coefficients: what a checkpoint stores (the same leaves,
  under the same names, as before the coefficients moved into the state)."""
  return state._replace(opt_state=adamw.without_coefficients(state.opt_state))


def with_coefficients(state: TrainState, coef) -> TrainState:
  """`state` with the AdamW coefficients `coef` (from the config, or a like state)."""
  return state._replace(opt_state=state.opt_state._replace(coef=coef))


def root_keys(seed: int):
  """(init key, data key) from the random seed, split by purpose."""
  root = jax.random.key(seed)
  return jax.random.fold_in(root, INIT_PURPOSE), jax.random.fold_in(root, DATA_PURPOSE)


def sr_key_data(cfg: config_lib.ExperimentConfig) -> np.ndarray:
  """Key data (uint32) of the stochastic rounding's key: `sr_seed`, else `seed`, by purpose."""
  seed = cfg.seed if cfg.sr_seed is None else cfg.sr_seed
  return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), SR_PURPOSE)))


def data_key(cfg: config_lib.ExperimentConfig):
  """The data order's key: from `data_seed` when set, else from `seed` (root_keys)."""
  return root_keys(cfg.seed if cfg.data_seed is None else cfg.data_seed)[1]


class MemberData(NamedTuple):
  """What differs between the members of one compiled program apart from their states, as
  traced data (their AdamW coefficients are in their optimizer states)."""

  data_key: jax.Array  # key data (`jax.random.key_data`) of the member's data order


def loss_and_hidden(params, cfg: config_lib.ModelConfig, batch: sampler.Batch, gemm: str,
                    block_rows: int):
  """Mean next-token cross entropy (f32) and the mean final hidden state.

  The model runs in the params' dtype (bf16 for the lab's runs); logits[:, :L']
  are scored against the targets (the data module's convention), with the
  log-softmax in f32 from the bf16 logits. `tied_nll.tied_logits_nll` does the
  logits and the loss block by block, so the (B, L', V) logits never exist and
  position L' onward is never projected (torch computes and drops it).
  """
  h = tinylm.hidden(params, cfg, batch.inputs, gemm)  # (B, T, D)
  n_targets = batch.targets.shape[1]
  loss = tied_nll.tied_logits_nll(h[:, :n_targets], params[EMBEDDING], batch.targets, gemm=gemm,
                                  block_rows=block_rows)
  h_mean = ordered.mean_rows(h.reshape(-1, h.shape[-1]))  # (D,)
  return loss, h_mean


def arithmetic(cfg: config_lib.ModelConfig, backend: Optional[str] = None) -> tuple:
  """(GEMM operand dtype, NLL block rows): the settings that change a run's bits, resolved
  for this host (`backend`: default JAX's). Recorded in metadata and in the program memo's key."""
  return (tinylm.resolve_gemm(cfg.gemm_operands),
          tied_nll.resolve_block_rows(cfg.nll_block_rows, backend or jax.default_backend()))


def _gather(x, rows):
  return x if rows is None else x[rows]


def make_step(cfg: config_lib.ExperimentConfig, tokens: np.ndarray, rows: Optional[np.ndarray],
              member: Optional[MemberData] = None):
  """The pure step `step(state, t) -> (state, (record, loss))` for this experiment.

  `record` holds the declared probes' values (what the file stores); `loss`
  is the f32 loss, which the host watches for divergence. The AdamW coefficients
  are the state's own (`adamw.AdamWState.coef`; the config gives the form).
  `member`: a sweep member's traced data key; None = the config's own.
  """
  sample = sampler.make_sampler(tokens, cfg.data)
  key = (data_key(cfg) if member is None
         else jax.random.wrap_key_data(member.data_key, impl=jax.random.key_impl(data_key(cfg))))
  policy = precision.get_policy(cfg.precision)
  form = adamw.form(cfg.optim)
  built = probes_lib.of_config(cfg)
  series, trackers = built.series, built.trackers
  row_idx = None if rows is None else jnp.asarray(rows, jnp.int32)

  # Values decided here on the host (`arithmetic`), never read from a global at trace time.
  gemm, block_rows = arithmetic(cfg.model)

  def objective(params, batch):
    return loss_and_hidden(precision.compute_params(params, policy), cfg.model, batch, gemm,
                           block_rows)

  def step(state: TrainState, t):
    batch = sample(key, t)
    (loss, h_mean), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch)
    params, opt_state, policy_state = policies.step(
        policy, form, state.params, grads, (state.opt_state, state.policy_state))
    view = probes_lib.StepView(
        t=t, w_prev=_gather(state.params[EMBEDDING], row_idx),
        w_next=_gather(params[EMBEDDING], row_idx), grad=_gather(grads[EMBEDDING], row_idx),
        m=_gather(opt_state.mu[EMBEDDING], row_idx), v=_gather(opt_state.nu[EMBEDDING], row_idx),
        loss=lattice.bf16_round_trip(loss), h_mean=h_mean, loss_f32=loss,
        coef=state.opt_state.coef)
    record = {s.key: s.record(view) for s in series}
    probe_state = {k.key: k.update(state.probe_state[k.key], view) for k in trackers}
    return TrainState(params, opt_state, probe_state, policy_state), (record, loss)

  return step


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()  # make_chunk's memo
_PROGRAMS_KEPT = 4


def _digest(a: Optional[np.ndarray]) -> Optional[tuple]:
  if a is None:
    return None
  a = np.ascontiguousarray(a)
  return (a.dtype.str, a.shape, vocabulary.sha256_bytes(a.data))


def make_chunk(cfg: config_lib.ExperimentConfig, tokens: np.ndarray, rows: Optional[np.ndarray],
               mesh: Mesh, exact: bool = True):
  """`_make_chunk`, memoized on the values of all its inputs.

  The program is a pure function of (config, token ids, rows, devices, mode),
  so a process that runs the same experiment again (a resume, a test suite's
  many tiny runs) reuses one jitted function and with it jit's traces and
  executables, instead of tracing and lowering the step again. Arrays are keyed
  by their bytes' SHA-256; the last few programs are kept.
  """
  key = (config_lib.to_json(cfg), arithmetic(cfg.model), _digest(tokens), _digest(rows),
         tuple(d.id for d in mesh.devices.flat), mesh.devices.shape, mesh.axis_names, exact)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
  else:
    _PROGRAMS[key] = _make_chunk(cfg, np.array(tokens), None if rows is None else np.array(rows),
                                 mesh, exact)
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]


def _make_chunk(cfg: config_lib.ExperimentConfig, tokens: np.ndarray, rows: Optional[np.ndarray],
                mesh: Mesh, exact: bool = True):
  """`run(states, members, start, length) -> (states, (records, losses))`, jitted.

  The leading axis of states, members (`MemberData`) and the outputs is the
  members, sharded over `mesh`'s "m" axis. Within a device, exact mode runs
  the members one after another (`lax.map`) through the very step a single
  member compiles, so each member's bits are its own run's whatever the group;
  fast mode vmaps them into wider kernels (other summation orders, other bits).
  Steps start+1..start+length; `length` is static, `states` donated.
  """

  def member_chunk(state, member, start, length):
    one_step = make_step(cfg, tokens, rows, member)
    coef = state.opt_state.coef  # loop-invariant: read by every step, not carried

    def body(carry, t):
      new, out = one_step(with_coefficients(carry, coef), t)
      return without_coefficients(new), out

    ts = start + 1 + jnp.arange(length, dtype=jnp.int32)
    carry, out = jax.lax.scan(body, without_coefficients(state), ts)
    return with_coefficients(carry, coef), out

  def run(states, members, start, length):
    def local(states, members, start):
      if exact:
        return jax.lax.map(lambda sm: member_chunk(sm[0], sm[1], start, length),
                           (states, members))
      return jax.vmap(member_chunk, in_axes=(0, 0, None, None))(states, members, start, length)

    return jax.shard_map(local, mesh=mesh, in_specs=(P("m"), P("m"), P()),
                         out_specs=P("m"), check_vma=False)(states, members, start)

  return jax.jit(run, static_argnums=3, donate_argnums=0)
