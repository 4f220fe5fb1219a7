"""Probes: what a training step records, and the one table of the file keys.

A probe is a factory: given the run's constants (`Context`: the AdamW
hyperparameters, the motion threshold, loss[0]) it returns a group of series
(one array per step, stacked by `lax.scan`), trackers (state carried in the
scan, written once at the end) and statics (arrays fixed before training, e.g.
the lab's scalar hyperparameter tensors, written once). Each item names its
file key and the key's role (what an analysis reads it as: "weights", "loss",
"momentum", ...); `build` refuses unknown probe names and two items that would
write one key. Every series and tracker function is pure, sees only the arrays
of `StepView`, and runs inside the jitted scan body; the training loop only
calls what `build` returns.

This module is the one place that owns file keys: the analyses and the
comparator find a file's tensors through `keys_with_role` and `kind_of`, which
read the probes' own declarations (plus `LAB_KEYS`, the lab's older names that
no probe writes). A new probe is one factory in `PROBES`.

File layout follows the lab (docs/definitions.md §Steps and files): a series with an `initial`
function has T+1 rows, row 0 being the state before any step and row t the
state after step t; one without has T rows, row t-1 holding step t.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxdt import config as config_lib
from jaxdt.numerics import lattice
from jaxdt.numerics import ordered


class Dims(NamedTuple):
  """Sizes a probe's shapes depend on."""

  rows: int  # recorded rows (n_dead, or the vocabulary)
  hidden: int
  param_dtype: np.dtype  # the stored embedding dtype (bf16 or f32)


class StepView(NamedTuple):
  """The arrays a probe may read about step t (rows already gathered); nothing else."""

  t: jax.Array  # int32, 1-based step
  w_prev: jax.Array  # (R, D) embedding rows before the step
  w_next: jax.Array  # (R, D) after the step
  grad: jax.Array  # (R, D) the step's gradient rows
  m: jax.Array  # (R, D) exp_avg after the step
  v: jax.Array  # (R, D) exp_avg_sq after the step
  loss: jax.Array  # f32 scalar, the bf16-representable loss of step t
  h_mean: jax.Array  # (D,) mean post-LayerNorm hidden state of step t's forward
  # The f32 mean cross entropy, unrounded: HF GPT2's loss (it upcasts the
  # logits), which Thimble 1/6 stored. `loss` above is its bf16 rounding.
  loss_f32: jax.Array
  # The step's AdamW coefficients (`adamw.Coefficients`), from the member's optimizer state.
  coef: Optional[tuple] = None


class Context(NamedTuple):
  """The run's constants that probe factories close over (from the config)."""

  hyper: config_lib.OptimConfig  # AdamW's hyperparameters
  motion_threshold: float = 0.1
  loss_initial: Optional[float] = None  # loss[0]; None = NaN

  @classmethod
  def of(cls, cfg) -> "Context":
    """The context of a `config.ExperimentConfig`."""
    return cls(cfg.optim, cfg.probes.motion_threshold, cfg.probes.loss_initial)


@dataclasses.dataclass(frozen=True)
class Series:
  """One per-step record, stored under file key `key`."""

  key: str
  dtype: Callable[[Dims], np.dtype]
  shape: Callable[[Dims], tuple]
  record: Callable[[StepView], jax.Array]
  initial: Optional[Callable[[jax.Array], jax.Array]] = None  # w0 rows -> row 0
  role: str = ""  # what analyses read it as (ROLES)


@dataclasses.dataclass(frozen=True)
class Tracker:
  """State carried through the scan; its final value is written once."""

  key: str
  dtype: np.dtype
  shape: Callable[[Dims], tuple]
  init: Callable[[Dims], np.ndarray]
  update: Callable[[jax.Array, StepView], jax.Array]
  role: str = ""


class StaticView(NamedTuple):
  """What a static array may depend on: the config and the corpus's live/dead split."""

  cfg: "object"  # jaxdt.config.ExperimentConfig
  live_mask: np.ndarray  # bool [V]
  dead_mask: np.ndarray  # bool [V]
  live_indices: np.ndarray  # int64 [n_live]
  dead_indices: np.ndarray  # int64 [n_dead]


@dataclasses.dataclass(frozen=True)
class Static:
  """Arrays known before step 1, written once (the lab's scalar tensors, masks)."""

  keys: tuple  # the file keys `value` returns, in file order
  value: Callable[[StaticView], dict]  # view -> {key: numpy array}


# --- Pure record functions ---------------------------------------------------


def stored_bits(w) -> jax.Array:
  """bf16 rows as uint16 bits (the lab's storage); f32 rows unchanged."""
  return lattice.bf16_to_bits(w) if w.dtype == jnp.bfloat16 else w.astype(jnp.float32)


def displacement(w_prev, w_next) -> jax.Array:
  """ΔW′ in cells of the stored format's lattice (bf16: the lab's ULP; f32: f32 spacing)."""
  if w_prev.dtype == jnp.bfloat16:
    return lattice.lattice_displacement(w_prev, w_next)
  return lattice.in_ulps(w_next.astype(jnp.float32) - w_prev.astype(jnp.float32), w_prev)


def row_norms(view: StepView) -> jax.Array:
  """‖ΔW′_i‖₂ per recorded row, f32 (the lab's displacement magnitude)."""
  d = displacement(view.w_prev, view.w_next)
  return jnp.sqrt(jnp.sum(d * d, axis=-1))


def moved(view: StepView, threshold: float) -> jax.Array:
  """Per-row motion: ‖ΔW′_i‖₂ ≥ threshold (nonzero ΔW′ is ≥ 0.5, so: any bit changed)."""
  return row_norms(view) >= threshold


def _f32(x):
  return x.astype(jnp.float32)


def _as_stored(x) -> jax.Array:
  """bf16 stays bf16 (safetensors BF16, the lab's Thimble 1 tensors); else f32."""
  return x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)


def _zeros_like_stored(w0):
  return jnp.zeros(w0.shape, w0.dtype if w0.dtype == jnp.bfloat16 else jnp.float32)


_zeros_bits = lambda w0: stored_bits(_zeros_like_stored(w0))
_zeros_f32 = lambda w0: jnp.zeros(w0.shape, jnp.float32)


_W_DTYPE = lambda d: np.dtype(np.uint16) if d.param_dtype == jnp.bfloat16 else np.dtype(np.float32)
_BF16_DTYPE = lambda d: (np.dtype(ml_dtypes.bfloat16) if d.param_dtype == jnp.bfloat16
                         else np.dtype(np.float32))
_ROWS = lambda d: (d.rows, d.hidden)
_F32 = lambda d: np.dtype(np.float32)


def lab_scalars(view: StaticView) -> dict:
  """Thimble 1's scalar tensors (the lab's Thimble 1 `save_dict`, docs/experiments.md): int64 and f32 0-d arrays."""
  c = view.cfg
  i64 = lambda x: np.asarray(x, np.int64)
  f32 = lambda x: np.asarray(x, np.float32)
  return {
      "vocab_size": i64(c.model.vocab_size), "hidden_dim": i64(c.model.hidden_dim),
      "n_layers": i64(c.model.num_layers), "n_heads": i64(c.model.num_heads),
      "num_steps": i64(c.steps), "batch_size": i64(c.data.batch_size),
      "learning_rate": f32(c.optim.learning_rate), "weight_decay": f32(c.optim.weight_decay),
      "adam_beta1": f32(c.optim.b1), "adam_beta2": f32(c.optim.b2),
      "adam_epsilon": f32(c.optim.eps), "init_scale": f32(c.model.init_std),
      "seed": i64(c.seed), "n_live": i64(view.live_mask.sum()),
      "n_dead": i64(view.dead_mask.sum()),
  }


_LAB_SCALAR_KEYS = ("vocab_size", "hidden_dim", "n_layers", "n_heads", "num_steps",
                    "batch_size", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                    "adam_epsilon", "init_scale", "seed", "n_live", "n_dead")


def live_dead_ids(view: StaticView) -> dict:
  """Thimble 4-7's masks and ids (dead_mask is always written by the loop)."""
  return {"live_mask": np.asarray(view.live_mask, np.bool_),
          "live_ids": np.asarray(view.live_indices, np.int64),
          "dead_ids": np.asarray(view.dead_indices, np.int64)}


def _accounting(ctx: Context) -> tuple:
  from jaxdt.optim import accounting, adamw  # pylint: disable=g-import-not-at-top
  form = adamw.form(ctx.hyper)
  return tuple(Series(
      key=f"adam_{name}", dtype=_F32, shape=lambda d: (),
      record=lambda v, name=name: accounting.metrics(
          v.w_prev, v.w_next, v.m, v.v, v.t, adamw.Rule(v.coef, form))[name], role="accounting")
      for name in accounting.METRIC_NAMES)


def _loss0(ctx: Context):
  return lambda w0: jnp.float32(np.nan if ctx.loss_initial is None else ctx.loss_initial)


def _last_motion(ctx: Context) -> tuple:
  return (Tracker("last_motion_step", np.dtype(np.int32), lambda d: (d.rows,),
                  lambda d: np.full((d.rows,), -1, np.int32),
                  lambda state, v: jnp.where(moved(v, ctx.motion_threshold),
                                             v.t.astype(jnp.int32), state),
                  role="last_motion"),)


def centroid_norm(w) -> jax.Array:
  """‖mean of the rows‖₂ in f32 (the freeze record's centroid_norm)."""
  c = ordered.mean_rows(w)
  return jnp.sqrt(jnp.sum(c * c))


def _freeze(ctx: Context) -> tuple:
  """The compact freeze record (what `run.py --summarize` reads): per step the rows frozen
  (not ‖ΔW′_i‖₂ ≥ threshold: a NaN norm is frozen, as in analysis.stream) and moving, the
  mean finite norm; ‖centroid‖₂ per W row (row 0: the init); the loss; last motion per row."""
  i32, thr = (lambda d: np.dtype(np.int32)), ctx.motion_threshold

  def count(frozen: bool):
    return lambda v: jnp.sum((~(row_norms(v) >= thr) if frozen else row_norms(v) >= thr)
                             .astype(jnp.int32))

  def mean_norm(v):
    n = row_norms(v)
    ok = jnp.isfinite(n)
    return jnp.sum(jnp.where(ok, n, 0)) / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1)

  return (Series("n_frozen", i32, lambda d: (), count(True), role="frozen_count"),
          Series("n_moving", i32, lambda d: (), count(False), role="moving_count"),
          Series("dwp_l2_mean", _F32, lambda d: (), mean_norm, role="displacement_norm_mean"),
          Series("centroid_norm", _F32, lambda d: (), lambda v: centroid_norm(v.w_next),
                 initial=centroid_norm, role="centroid_norm"),
          ) + PROBES["loss"](ctx) + _last_motion(ctx)


def _const(*items):
  """A factory for items that need no context."""
  return lambda ctx: items


def _per_row(key, dtype, value, initial, role):
  """A factory for one series with a row per recorded embedding row: value(view) per step."""
  return _const(Series(key, dtype, _ROWS, value, initial=initial, role=role))


# Probe name -> factory(Context) -> its items. Keys are the lab's file keys.
PROBES = {
    # Crucible / Thimble 8/9 names.
    "W": _per_row("W", _W_DTYPE, lambda v: stored_bits(v.w_next), stored_bits, "weights"),
    "delta_W_prime": _const(Series("delta_W_prime", _F32, _ROWS,
                                   lambda v: displacement(v.w_prev, v.w_next),
                                   role="displacement")),
    "centroid": _const(Series("centroid", _F32, lambda d: (d.hidden,),
                              lambda v: ordered.mean_rows(v.w_next), initial=ordered.mean_rows,
                              role="centroid")),
    "loss": lambda ctx: (Series("loss", _F32, lambda d: (), lambda v: v.loss,
                                initial=_loss0(ctx), role="loss"),),
    "last_motion_step": _last_motion,
    # Thimble 8: m, v, g as f32 copies; row 0 is zeros (nothing before step 1).
    "m": _per_row("m", _F32, lambda v: _f32(v.m), _zeros_f32, "momentum"),
    "v": _per_row("v", _F32, lambda v: _f32(v.v), _zeros_f32, "variance"),
    "g": _per_row("g", _F32, lambda v: _f32(v.grad), _zeros_f32, "gradient"),
    # Crucible 3/4: mean final hidden state, h_mean[t-1] for step t.
    "h_mean": _const(Series("h_mean", _F32, lambda d: (d.hidden,), lambda v: v.h_mean,
                            role="hidden_mean")),
    # Thimble 1 (docs/experiments.md): W and grad_W as bf16 tensors (safetensors BF16),
    # momentum_W / variance_W as `.float()` of the bf16 Adam state, losses f32
    # with losses[0] = NaN. grad_W[t] is step t's gradient (taken before the
    # step); row 0 is zeros. Under fp32/mixed precision W and grad_W are f32.
    "W_bf16": _per_row("W", _BF16_DTYPE, lambda v: _as_stored(v.w_next), _as_stored, "weights"),
    "grad_W": _per_row("grad_W", _BF16_DTYPE, lambda v: _as_stored(v.grad), _zeros_like_stored,
                       "gradient"),
    "momentum_W": _per_row("momentum_W", _F32, lambda v: _f32(v.m), _zeros_f32, "momentum"),
    "variance_W": _per_row("variance_W", _F32, lambda v: _f32(v.v), _zeros_f32, "variance"),
    # The f32 loss unrounded (HF GPT2 upcasts logits; Thimble 1-7's losses are
    # not bf16 values, e.g. 6.4703); NaN before step 1 unless loss_initial.
    "losses": lambda ctx: (Series("losses", _F32, lambda d: (), lambda v: v.loss_f32,
                                  initial=_loss0(ctx), role="loss"),),
    # Thimble 6, exact: grad_W and the Adam state as uint16 bits of the bf16
    # tensors (the lab's Thimble 7 layout; its Thimble 6 float16 lost bits).
    "grad_W_bits": _per_row("grad_W", _W_DTYPE, lambda v: stored_bits(v.grad), _zeros_bits,
                            "gradient"),
    "momentum_W_bits": _per_row("momentum_W", _W_DTYPE, lambda v: stored_bits(v.m), _zeros_bits,
                                "momentum"),
    "variance_W_bits": _per_row("variance_W", _W_DTYPE, lambda v: stored_bits(v.v), _zeros_bits,
                                "variance"),
    # Written once: Thimble 1's scalar tensors; Thimble 4-7's masks and ids.
    "lab_scalars": _const(Static(_LAB_SCALAR_KEYS, lab_scalars)),
    "live_dead_ids": _const(Static(("live_mask", "live_ids", "dead_ids"), live_dead_ids)),
    # In-scan Adam accounting over the recorded rows (jaxdt.optim.accounting).
    "adam_accounting": _accounting,
}
# The compact freeze record (`--probes=freeze`): counts, mean norm, centroid
# norm, loss, last motion; defined after PROBES since it reuses "loss".
PROBES["freeze"] = _freeze
FREEZE_KEYS = ("n_frozen", "n_moving", "dwp_l2_mean", "centroid_norm", "loss",
               "last_motion_step")
# File keys the loop writes itself, beside the probes'.
RESERVED_KEYS = ("dead_mask", "dead_indices")


def _file_keys(item) -> tuple:
  return item.keys if isinstance(item, Static) else (item.key,)


@dataclasses.dataclass(frozen=True)
class Probes:
  """The built probes of one run: what its step records and its file holds."""

  items: tuple  # every series, tracker and static, in declaration order (the file's)

  def _of(self, cls) -> tuple:
    return tuple(i for i in self.items if isinstance(i, cls))

  @property
  def series(self) -> tuple:
    return self._of(Series)

  @property
  def trackers(self) -> tuple:
    return self._of(Tracker)

  @property
  def statics(self) -> tuple:
    return self._of(Static)

  def file_specs(self, dims: Dims, steps: int) -> dict:
    """Ordered {key: (dtype, full shape)} of the per-step records and trackers.

    Statics are not listed: their arrays are known up front (`static_arrays`).
    """
    specs = {}
    for p in self.items:
      if isinstance(p, Series):
        n = steps + 1 if p.initial is not None else steps
        specs[p.key] = (p.dtype(dims), (n,) + tuple(p.shape(dims)))
      elif isinstance(p, Tracker):
        specs[p.key] = (p.dtype, tuple(p.shape(dims)))
    return specs

  def static_arrays(self, view: StaticView) -> dict:
    """Ordered {key: numpy array} of the statics."""
    out = {}
    for p in self.statics:
      values = p.value(view)
      out.update((k, values[k]) for k in p.keys)
    return out


def check_names(names) -> None:
  """Refuses unknown probe names (one line, before any work)."""
  unknown = [n for n in names if n not in PROBES]
  if unknown:
    raise ValueError(f"unknown probes {unknown}; known: {sorted(PROBES)}")


def build(names, ctx: Context) -> Probes:
  """The named probes' items, in order, built over `ctx`.

  Raises:
    ValueError: an unknown name, or two items (or an item and the loop's own
      dead_mask/dead_indices) that would write the same file key.
  """
  check_names(names)
  items, owner = [], {k: "the run itself" for k in RESERVED_KEYS}
  for name in names:
    for item in PROBES[name](ctx):
      for key in _file_keys(item):
        if key in owner:
          raise ValueError(f"probes {owner[key]!r} and {name!r} both write the file key "
                           f"{key!r}; record only one of them")
        owner[key] = name
      items.append(item)
  return Probes(tuple(items))


def of_config(cfg) -> Probes:
  """The probes a config declares (`cfg.probes.names`), built over its constants."""
  return build(cfg.probes.names, Context.of(cfg))


def file_row(series: Series, t: int) -> int:
  """The file row holding step t's record."""
  return t if series.initial is not None else t - 1


# --- The file keys, for readers ------------------------------------------------

# The lab's older file keys that no probe writes (Flannel 1-3, Thimble 4-5):
# key -> (role, kind).
LAB_KEYS = {"embeddings": ("weights", "series"), "momentum": ("momentum", "series"),
            "variance": ("variance", "series"), "grads": ("gradient", "series"),
            "recorded_steps": ("static", "static"), "logits": ("logits", "series")}


class KeySpec(NamedTuple):
  """What a file key holds: its role and kind ("series": one row per step, "final": a
  tracker's value at the end, "static": written once before step 1)."""

  role: str
  kind: str


@functools.cache
def key_specs() -> dict:
  """{file key: KeySpec} of every probe's items, then the run's own and the lab's keys.

  Keys come in `PROBES` order, so each role lists jaxdt's name before the lab's
  older ones (`keys_with_role`).
  """
  out = {}
  ctx = Context(config_lib.OptimConfig())
  for factory in PROBES.values():
    for item in factory(ctx):
      for key in _file_keys(item):
        spec = (KeySpec(item.role, "series") if isinstance(item, Series) else
                KeySpec(item.role, "final") if isinstance(item, Tracker) else
                KeySpec("static", "static"))
        assert out.setdefault(key, spec) == spec, f"probes disagree about {key!r}"
  for key in RESERVED_KEYS:
    out[key] = KeySpec("static", "static")
  for key, (role, kind) in LAB_KEYS.items():
    out.setdefault(key, KeySpec(role, kind))
  return out


def keys_with_role(role: str) -> tuple:
  """The file keys that hold `role` (e.g. "weights": ("W", "embeddings")), jaxdt's first."""
  return tuple(k for k, s in key_specs().items() if s.role == role)


def kind_of(key: str) -> Optional[str]:
  """"series", "final" or "static" for a known file key; None for one no probe declares."""
  spec = key_specs().get(key)
  return None if spec is None else spec.kind
