"""A finished run's state at any step: its checkpoint, its init, or an exact replay.

A jaxdt run is a pure function of its config, its data and its host's
arithmetic, and a resume gives the uninterrupted run's bytes (tests/io). So the
state after step s is the checkpoint at s where one was kept, the step-0 state
(`initial.init_state`) at s = 0, and otherwise the newest checkpoint before s run
forward by the run's own compiled program (`runs.program`) for the steps between.
A replay is refused on a host whose arithmetic fingerprint differs from the run's:
there it would give other bits, not the run's state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import hosts
from jaxdt.io import metadata as metadata_lib
from jaxdt.training import fingerprint as fingerprint_lib
from jaxdt.training import layout as layout_lib
from jaxdt.training import runs
from jaxdt.training import initial
from jaxdt.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class StateAt:
  step: int
  state: Any  # a TrainState of numpy arrays
  source: str  # "checkpoint", "init" or "replayed N steps from checkpoint S"


def run_config(folder: str) -> tuple[dict, config_lib.ExperimentConfig]:
  """(metadata.json, the config it records) of a finished jaxdt run folder."""
  meta = metadata_lib.read_metadata(folder)
  if meta.get("framework", "jax") != "jax" or not isinstance(meta.get("config"), dict):
    raise disk.StoreError(f"{folder} is not a jaxdt run (framework {meta.get('framework')!r}); "
                          "pass the folder of a run.py run")
  cfg = config_lib.from_dict(config_lib.ExperimentConfig, meta["config"])
  if not metadata_lib.is_complete(folder, cfg.store.trajectory_name):
    raise disk.StoreError(f"{folder} is not a finished run (no committed "
                          f"{cfg.store.trajectory_name}); finish it with --resume first")
  return meta, cfg


def _check_host(meta: dict, cfg: config_lib.ExperimentConfig, why: str) -> None:
  recorded = hosts.host_of(meta).get("arithmetic_fingerprint")
  here = fingerprint_lib.fingerprint(cfg.model.gemm_operands)
  if recorded != here:
    raise disk.StoreError(f"{why}, and this host's arithmetic (fingerprint {here[:12]}) is not "
                          f"the run's ({str(recorded)[:12]}), so a replay would give other bits; "
                          "run it on the run's CPU class, or keep checkpoints at these steps "
                          "(--set store.checkpoint_steps=...)")


def states_at(folder: str, steps: Sequence[int], log: Callable[[str], None] = print) -> list:
  """[StateAt] of a finished jaxdt run at each of `steps` (each 0..the run's steps).

  Raises:
    disk.StoreError: not a finished jaxdt run, no intact checkpoint, a corrupt one,
      or a replay needed on a host with other arithmetic (one line each).
  """
  meta, cfg = run_config(folder)
  bad = [s for s in steps if not 0 <= s <= cfg.steps]
  if bad:
    raise ValueError(f"step {bad[0]} is outside the run's 0..{cfg.steps}; choose steps in it")
  ckpt_dir = f"{folder}/checkpoints"
  kept = dict(checkpoints.intact_checkpoints(ckpt_dir))
  if not kept:
    raise disk.StoreError(f"{folder} has no checkpoints; rerun it with "
                          "--set store.checkpoint_steps=... to keep some")
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  if corpus.files != meta.get("data_files"):
    raise disk.StoreError(f"the data files differ from the ones {folder} was trained on; pass "
                          "the run's --data_dir")
  lay = layout_lib.layout(cfg, corpus)
  init = initial.init_state(cfg, lay.dims)
  like = step_lib.without_coefficients(init)  # as checkpoints store it
  restore = lambda path: step_lib.with_coefficients(checkpoints.load_checkpoint(path, like)[0],
                                                    init.opt_state.coef)
  program = None
  out = []
  for s in sorted(set(steps)):
    if s in kept:
      out.append(StateAt(s, jax.device_get(restore(kept[s])), "checkpoint"))
      continue
    if s == 0:
      out.append(StateAt(0, jax.device_get(init), "init"))
      continue
    base = max((k for k in kept if k < s), default=0)
    _check_host(meta, cfg, f"{folder} keeps no checkpoint at step {s}")
    state = init if base == 0 else restore(kept[base])
    if program is None:
      devs = runs.program_devices(1, exact=True)
      program = runs.program([cfg], corpus.tokens, lay.rows, devs)
    dispatch, sharding = program
    stacked = runs.stacked([state], sharding)
    log(f"replaying steps {base + 1}..{s} from {'the init' if base == 0 else f'checkpoint {base}'}")
    done = base
    while done < s:
      n = min(cfg.store.chunk_steps, s - done)
      stacked, _ = dispatch(stacked, done, n)
      done += n
    state = jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(stacked))
    out.append(StateAt(s, state, f"replayed {s - base} step{'s' * (s - base != 1)} from "
                                 f"{'the init' if base == 0 else f'checkpoint {base}'}"))
  return out


def embedding(state) -> np.ndarray:
  """The (tied) token table of a state, as f32."""
  return np.asarray(state.params[step_lib.EMBEDDING], np.float32)


def bytes_per_param(state) -> float:
  """Bytes of the training state (parameters, optimizer moments, the precision policy's own
  state; not the probes' trackers) per model parameter."""
  n = sum(np.asarray(x).size for x in jax.tree.leaves(state.params))
  held = (state.params, step_lib.without_coefficients(state).opt_state, state.policy_state)
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(held)) / n
