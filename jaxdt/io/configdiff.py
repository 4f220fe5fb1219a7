"""Config comparison: one line per field where two runs' configs (`config.to_dict`) differ."""

from __future__ import annotations

import json
from typing import Any, Mapping

from jaxdt import config as config_lib

# Config fields a resume may change: they change no result (the chunk size, where
# checkpoints are kept) or name inputs whose contents are checked by hash instead (the paths).
RESUMABLE_FIELDS = frozenset({
    "store.chunk_steps", "store.checkpoint_steps", "data.data_dir", "data.corpus_path", "data.tokenizer_path",
    "data.dead_mask_path", "init_checkpoint"})


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def show(v: Any) -> str:
  """A config value as the one-line messages print it."""
  return json.dumps(v) if not isinstance(v, float) else repr(v)


def config_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any],
                       ignore=RESUMABLE_FIELDS,
                       labels: tuple = ("the run has", "the flags say")) -> list[str]:
  """One line per field where two config dicts (`config.to_dict`) differ.

  Returns:
    e.g. ["optim.learning_rate: the run has 0.0003, the flags say 0.01"].
  """
  a, b = _flatten(recorded), _flatten(wanted)
  defaults = _flatten(config_lib.to_dict(config_lib.ExperimentConfig()))
  lines = []
  for key in list(b) + [k for k in a if k not in b]:
    if key in ignore or a.get(key, KeyError) == b.get(key, KeyError):
      continue
    if key not in a and key in defaults and b[key] == defaults[key]:
      continue  # a field added since the run began, at its default: the same run
    has = show(a[key]) if key in a else "no such field"
    say = show(b[key]) if key in b else "no such field"
    lines.append(f"{key}: {labels[0]} {has}, {labels[1]} {say}")
  return lines
