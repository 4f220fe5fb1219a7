"""Experiment configuration: frozen, nested dataclasses with a JSON round trip.

An experiment is data. `experiments/<name>.py` defines `config() -> ExperimentConfig`
and `run.py` applies flag overrides with `dataclasses.replace`; nothing here is
ever mutated in place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Optional

PRECISIONS = ("bf16", "fp32", "mixed", "bf16_sr", "bf16_kahan")  # numerics.precision.POLICIES
DATA_SOURCES = ("default", "fineweb")
GEMM_OPERANDS = ("auto", "float32", "bfloat16")
LAYERNORM_BACKWARDS = ("f32", "torch_cpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The TinyLM architecture."""

  variant: str = "encoder"  # "encoder" (lab's TinyLM) | "gpt2" (HF GPT2LMHeadModel)
  vocab_size: int = 10000
  hidden_dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  max_seq_len: int = 128  # rows of the learned positional table
  init_std: float = 0.02  # N(0, init_std) for the token and position tables
  # What a bf16 GEMM reads its operands as: "auto" (the host's capability,
  # `numerics.backend.gemm_operands`), "float32" or "bfloat16". Values are the
  # same either way (exact products, f32 sums); speed and summation order differ.
  gemm_operands: str = "auto"
  # Target rows per block of the tied logits + loss (`model.tied_nll`): it sets
  # the f32 summation order of the embedding gradient, so it changes bits. 0 =
  # auto: 512 on CPU (a slab that stays in cache), one block on accelerators;
  # resolved on the host (`tied_nll.resolve_block_rows`) and recorded in metadata.
  nll_block_rows: int = 0
  # LayerNorm's backward: "f32" (every sum in f32, rounded once) or "torch_cpu" (the bits
  # of torch's CPU kernel for bf16 params at `layernorm_threads` threads: rounded saved
  # statistics, weight and bias gradients summed in bf16 per thread; `tinylm.LayerNorm`).
  layernorm_backward: str = "f32"
  layernorm_threads: int = 2

  def __post_init__(self):
    if self.gemm_operands not in GEMM_OPERANDS:
      raise ValueError(f"gemm_operands={self.gemm_operands!r} is not one of "
                       f"{', '.join(GEMM_OPERANDS)}; pass e.g. --gemm_operands=auto")
    if self.layernorm_backward not in LAYERNORM_BACKWARDS:
      raise ValueError(f"layernorm_backward={self.layernorm_backward!r} is not one of "
                       f"{', '.join(LAYERNORM_BACKWARDS)}; pass e.g. "
                       "--set model.layernorm_backward=f32")
    if self.layernorm_threads < 1:
      raise ValueError(f"layernorm_threads={self.layernorm_threads} is not a thread count; "
                       "pass 1 or more, e.g. --set model.layernorm_threads=2")
    if self.nll_block_rows < 0:
      raise ValueError(f"nll_block_rows={self.nll_block_rows} is negative; pass 0 (auto) or "
                       "a number of target rows, e.g. --set model.nll_block_rows=512")

  @property
  def ffn_dim(self) -> int:
    return 4 * self.hidden_dim


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """torch.optim.AdamW hyperparameters (the lab's names)."""

  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0

  def __post_init__(self):
    # torch.optim.AdamW's own checks (0 <= lr, 0 <= eps, 0 <= betas < 1,
    # 0 <= weight_decay), plus finiteness, which torch leaves to fail later.
    for name, low, high, flag in (
        ("learning_rate", 0.0, math.inf, "--learning_rate"), ("eps", 0.0, math.inf, None),
        ("b1", 0.0, 1.0, None), ("b2", 0.0, 1.0, None),
        ("weight_decay", 0.0, math.inf, "--weight_decay")):
      value = getattr(self, name)
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value < high)
      if not ok:
        rng = f"in [{low:g}, {high:g})" if high < math.inf else f"finite and >= {low:g}"
        fix = f"pass {flag}=<value>" if flag else "fix the experiment's config"
        raise ValueError(f"{name}={value!r} is invalid: torch's AdamW needs it {rng}; {fix}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from and how batches are drawn."""

  scheme: str = "chunks"  # "chunks" (Thimble 8/9, Crucible) | "windows" (Thimble 1/6)
  batch_size: int = 128
  seq_len: int = 128
  # Thimble 1/6 fed already-shifted labels to HF GPT2, which shifts again: the
  # model then learns to predict two tokens ahead. False = true next-token.
  double_shift_labels: bool = False
  # "default" (the embedded data, built offline) | "fineweb" (the lab's recipe from FineWeb,
  # built by `run.py --experiment=flannel_data --data_source=fineweb`)
  source: str = "default"
  data_dir: Optional[str] = None  # cache for the built data; None = per-user cache
  corpus_path: Optional[str] = None  # the lab's own files, taken unchanged
  tokenizer_path: Optional[str] = None
  dead_mask_path: Optional[str] = None

  def __post_init__(self):
    if self.source not in DATA_SOURCES:
      raise ValueError(f"data source {self.source!r} is not one of {', '.join(DATA_SOURCES)}; "
                       "pass --data_source=default or fineweb")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """What a step records, for which rows, and the analyses' thresholds."""

  # Probe names from jaxdt.probes.PROBES, in file order.
  names: tuple = ("W", "delta_W_prime", "centroid", "loss", "last_motion_step",
                  "adam_accounting")
  rows: str = "dead"  # "dead" (the dead ids) | "all" (every vocabulary row)
  motion_threshold: float = 0.1  # ‖ΔW′_i‖₂ ≥ this counts as motion (Crucible 1)
  # loss[0] before any step: None = NaN (Crucible), 0.0 for Thimble 8. (None,
  # not NaN, so that configs compare equal after a JSON round trip.)
  loss_initial: Optional[float] = None

  def __post_init__(self):
    if not self.names:
      raise ValueError("no probes: a run must record something; pass e.g. --probes=W,loss")
    if self.rows not in ("dead", "all"):
      raise ValueError(f"rows={self.rows!r} is not 'dead' or 'all'; pass --rows=dead or all")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  """Output file names and checkpointing."""

  trajectory_name: str = "crucible_1_trajectory.safetensors"
  checkpoint_steps: tuple = ()  # steps after which a checkpoint is saved (0 = initial state)
  chunk_steps: int = 100  # steps per jitted scan chunk (changes nothing in the result)
  experiment_title: str = "Crucible 1"  # the lab's metadata "experiment"
  series: str = "Crucible"
  notes: str = ""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One run: what to train, how, and what to record."""

  name: str = "crucible1"
  seed: int = 42  # the model init (and the data order unless data_seed is set)
  # The data order apart from the init; None = seed (so existing runs keep their bits).
  data_seed: Optional[int] = None
  steps: int = 5000
  # "bf16" | "fp32" | "mixed" (fp32 master + moments, bf16 compute) | "bf16_sr" (bf16,
  # stochastic rounding of the new params) | "bf16_kahan" (bf16 with Kahan buffers)
  precision: str = "bf16"
  # The stochastic rounding's bits (bf16_sr only); None = from `seed`, with a purpose of
  # its own (`training.step.sr_key_data`), so existing runs keep their bits.
  sr_seed: Optional[int] = None
  # Start from these weights (a torch state_dict: the lab's step-0 .pt or a
  # .safetensors) instead of our own init; None = PyTorch-style init from `seed`.
  init_checkpoint: Optional[str] = None
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  probes: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
  store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
  # The experiment's own sweep, in --sweep's syntax ("learning_rate=1e-3,3e-4;
  # weight_decay=0,0.1"); "" = a single run. `python run.py --experiment=E` runs it.
  sweep: str = ""

  def __post_init__(self):
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}; "
                       "pass e.g. --precision=bf16")
    if self.sr_seed is not None and self.precision != "bf16_sr":
      raise ValueError(f"sr_seed={self.sr_seed} is only read by --precision=bf16_sr (this run "
                       f"is {self.precision}); drop --set sr_seed")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps}: need at least 1 step")
    if self.store.chunk_steps < 1:
      raise ValueError(f"chunk_steps={self.store.chunk_steps}: need at least 1")
    if self.data.seq_len > self.model.max_seq_len:
      raise ValueError(f"seq_len={self.data.seq_len} exceeds the model's "
                       f"max_seq_len={self.model.max_seq_len}; lower --seq_len")


def with_steps(cfg: ExperimentConfig, steps: int,
               checkpoint_steps: Optional[tuple] = None) -> ExperimentConfig:
  """`cfg` run for `steps` steps, keeping only the checkpoints inside the run.

  Args:
    cfg: the config.
    steps: the new number of steps.
    checkpoint_steps: checkpoints to filter instead of cfg's own (e.g. a
      verification's).
  """
  marks = cfg.store.checkpoint_steps if checkpoint_steps is None else checkpoint_steps
  store = dataclasses.replace(cfg.store, checkpoint_steps=tuple(c for c in marks if c <= steps))
  return dataclasses.replace(cfg, steps=steps, store=store)


def _parse(text: str, hint: Any, name: str) -> Any:
  """A flag's text as a value of the field's type (int, float, bool, str, tuple, Optional)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union:  # Optional[X]
    if text.lower() in ("none", "null", ""):
      return None
    hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
  if hint is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"--set {name}={text}: expected true or false")
  if hint is tuple or origin is tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(int(t) if t.lstrip("-").isdigit() else t for t in items)
  try:
    return hint(text)
  except (TypeError, ValueError):
    raise ValueError(f"--set {name}={text}: expected {getattr(hint, '__name__', hint)}") from None


def _field(cfg: Any, dotted: str) -> tuple:
  """(owner config, field name, type hint) of a dotted path; ValueError if there is none."""
  *sections, name = dotted.split(".")
  owner = cfg
  for i, sec in enumerate(sections):
    if not dataclasses.is_dataclass(owner) or not hasattr(owner, sec):
      raise ValueError(f"--set {dotted}: no config section {'.'.join(sections[:i + 1])!r}")
    owner = getattr(owner, sec)
  fields = {f.name for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
  if name not in fields:
    raise ValueError(f"--set {dotted}: no such field; {'.'.join(sections) or 'the config'} has "
                     f"{sorted(fields)}")
  hint = typing.get_type_hints(type(owner))[name]
  if dataclasses.is_dataclass(hint):
    raise ValueError(f"--set {dotted}: {name!r} is a section; set one of its fields, e.g. "
                     f"{dotted}.{dataclasses.fields(hint)[0].name}=...")
  return owner, name, hint


def get_path(cfg: Any, dotted: str) -> Any:
  """The value at a dotted path, e.g. get_path(cfg, "optim.learning_rate")."""
  owner, name, _ = _field(cfg, dotted)
  return getattr(owner, name)


def set_path(cfg: Any, dotted: str, value: Any) -> Any:
  """`cfg` with the field at a dotted path (e.g. "optim.learning_rate") replaced.

  Raises:
    ValueError: no such field, or the new config is invalid (its __post_init__).
  """
  _field(cfg, dotted)
  head, _, rest = dotted.partition(".")
  if not rest:
    return dataclasses.replace(cfg, **{head: value})
  return dataclasses.replace(cfg, **{head: set_path(getattr(cfg, head), rest, value)})


def override(cfg: Any, assignment: str) -> Any:
  """`cfg` with one `path=value` applied, the value parsed by the field's type.

  Every config field can be set this way from the command line
  (`run.py --set model.hidden_dim=32 --set store.checkpoint_steps=0,10`).

  Raises:
    ValueError: not `path=value`, no such field, a value of the wrong type, or
      an invalid config.
  """
  dotted, eq, text = assignment.partition("=")
  if not eq or not dotted:
    raise ValueError(f"--set {assignment!r}: write path=value, e.g. --set model.hidden_dim=32")
  _, _, hint = _field(cfg, dotted.strip())
  return set_path(cfg, dotted.strip(), _parse(text.strip(), hint, dotted.strip()))


def to_dict(cfg: Any) -> dict:
  """A JSON-ready dict of a (nested) config dataclass."""
  out = dataclasses.asdict(cfg)
  return json.loads(json.dumps(out))  # tuples -> lists, so the round trip is stable


def to_json(cfg: Any) -> str:
  """Canonical JSON text (sorted keys) of a config."""
  return json.dumps(to_dict(cfg), sort_keys=True, indent=2)


def from_dict(cls: type, d: dict) -> Any:
  """Rebuild config dataclass `cls` from `to_dict` output; unknown keys are an error."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; remove them")
  kwargs = {}
  for name, value in d.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      value = from_dict(hint, value)
    elif (hint is tuple or typing.get_origin(hint) is tuple) and isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


def from_json(cls: type, text: str) -> Any:
  """Inverse of `to_json`."""
  return from_dict(cls, json.loads(text))
