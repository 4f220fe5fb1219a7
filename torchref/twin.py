"""A twin's sources: a finished jaxdt run's config, its init (checked) and its batch order.

`--init_from=RUN` starts the lab's loop from RUN's step-0 params (its config's
init recomputed by jaxdt and checked against RUN's row 0) and `--batches_from=RUN`
trains on RUN's batch order (jaxdt's sampler for RUN's config): same start, same
data, only the frameworks' kernels differ.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from jaxdt import config as config_lib
from jaxdt.data import sampler
from jaxdt.io import locks
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import results
from jaxdt.training import layout as layout_lib
from torchref.capture import to_torch


def source_config(path: str, what: str) -> config_lib.ExperimentConfig:
  """The config of a finished jaxdt run folder (refused in one line otherwise)."""
  meta = metadata_lib.read_metadata(path)
  cfg = meta.get("config")
  name = (cfg or {}).get("store", {}).get("trajectory_name")
  if not isinstance(cfg, dict) or meta.get("framework", "jax") != "jax" or not name:
    raise ValueError(f"{what} {path} is not a jaxdt run folder; pass a finished jaxdt run")
  if not metadata_lib.is_complete(path, name):
    raise ValueError(f"{what} {path} is unfinished; {locks.unfinished_advice(path)}")
  return config_lib.from_dict(config_lib.ExperimentConfig, cfg)


def same_data(path: str, corpus) -> config_lib.ExperimentConfig:
  """RUN's config, after checking that RUN trained on the token ids loaded here."""
  meta = metadata_lib.read_metadata(path)
  if meta.get("data_files") != corpus.files:
    raise ValueError(f"{path} trained on other data files than these ({meta.get('data_files')}); "
                     "pass the same --data_dir/--corpus_path/--tokenizer_path as that run")
  return config_lib.from_dict(config_lib.ExperimentConfig, meta["config"])


def init_from(path: str, corpus, model: nn.Module) -> None:
  """Loads RUN's step-0 params into `model`, after checking them against RUN's W row 0."""
  from jaxdt.model import torch_io  # pylint: disable=g-import-not-at-top
  from jaxdt.training import initial  # pylint: disable=g-import-not-at-top
  src = same_data(path, corpus)
  lay = layout_lib.layout(src, corpus)
  params = initial.init_state(src, lay.dims).params
  reader, _, _ = results.open_result(os.path.join(path, src.store.trajectory_name))
  mine = np.asarray(params["embedding"])[corpus.dead_indices]
  with reader:
    if "W" in reader.keys():  # the full record: W row 0, bit for bit
      same = np.array_equal(mine.view(np.uint16), reader.rows("W", 0, 1)[0])
    else:  # the compact freeze record: the init's dead-row centroid norm (f32; 1e-6 rel.)
      import jax  # pylint: disable=g-import-not-at-top
      from jaxdt import probes as probes_lib  # pylint: disable=g-import-not-at-top
      got = float(jax.jit(probes_lib.centroid_norm)(mine))
      want = float(reader.rows("centroid_norm", 0, 1)[0])
      same = abs(got - want) <= 1e-6 * abs(want)
  if not same:
    raise ValueError(f"jaxdt's init for {path}'s config differs from its row 0 (another jaxdt "
                     "or another data set?); the twin needs RUN's own start")
  sd = torch_io.params_to_torch_state_dict(params, src.model)
  model.load_state_dict({k: to_torch(v) for k, v in sd.items()})


def jaxdt_batches(path: str, corpus):
  """batch(t) -> int64 [B, L] input ids of step t in RUN's order (jaxdt's sampler)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdt.training import step  # pylint: disable=g-import-not-at-top
  src = same_data(path, corpus)
  sample = jax.jit(lambda t: sampler.make_sampler(corpus.tokens, src.data)(step.data_key(src), t)
                   .inputs)
  return lambda t: torch.from_numpy(np.asarray(sample(np.int32(t))).astype(np.int64))
