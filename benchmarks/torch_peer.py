"""The lab's Crucible 1 loop in PyTorch as a peer run: a run folder `run.py --summarize` reads.

    python benchmarks/torch_peer.py --output_dir=DIR [--seed=42] [--steps=2000] [--threads=0]
    python benchmarks/torch_peer.py --output_dir=DIR --init_from=RUN --batches_from=RUN  # a twin
    python benchmarks/torch_peer.py --output_dir=DIR ... --resume
    python benchmarks/torch_peer.py --output_dir=DIR --gemm=f32 --probes=freeze

The loop is the lab's Crucible 1 notebook, cells 4-11, as `torch_crucible1.py`
ports it (its TinyLM is the one copy of the lab's model class): seeds,
`model.to(torch.bfloat16)`, AdamW, `DataLoader(shuffle=True, drop_last=True)`
over non-overlapping chunks, `torch.autocast(cpu, bf16)` around the forward and
the loss, and the per-step capture of W, ΔW′, centroid, loss and
last_motion_step. Only the storage differs: instead of preallocated histories
the rows stream into a jaxdt run folder (`rundir.RunDir`: lock, checkpoints,
checksums, one commit point), so a run is resumable and `--summarize`,
`--analyze` and `--compare` read it as they read a jaxdt run. The file holds
the lab's own keys (W, delta_W_prime, centroid, loss, last_motion_step,
dead_mask, dead_indices); metadata.json says `"framework": "torch"`.

--probes=freeze writes the compact freeze record instead of the lab's keys (the
keys and row conventions of jaxdt's "freeze" probe): n_frozen, n_moving and
dwp_l2_mean (row t-1 = step t: the dead rows below / at or above the motion
threshold in ||ΔW′_i||₂, a NaN norm counting as frozen, and the mean of the
finite ||ΔW′_i||₂), centroid_norm (row t = after step t, row 0 the init:
||mean of the dead rows of W_t as f32||₂), loss and last_motion_step, beside
dead_mask and dead_indices.

--gemm: torch's bf16 CPU GEMM is a slow fallback on CPUs without bf16 dot
units (AVX2-only). `f32` runs each training step under `torch_gemm.F32Gemm`:
every bf16 GEMM-like op of the forward and backward (mm, addmm, bmm, baddbmm,
the CPU flash attention) is computed from f32-upcast operands with f32
accumulation and rounded once to bf16. `native` is torch's own kernels; `auto`
(the default) measures both GEMMs here and picks native only where bf16 runs at
least half as fast as f32 (`torch_gemm.bf16_dot_is_fast`). metadata.json
records the route ("torch_gemm"), the request and the measurement; the route is
part of the run's identity, so a resume with another route is refused (a
resume with auto keeps the run's route).

Token ids are jaxdt's (the embedded default data, or --corpus_path and
--tokenizer_path), as `jaxdt.data.corpus` loads them.

A twin: `--init_from=RUN` starts from a finished jaxdt run's step-0 params (its
config's init, recomputed by jaxdt and checked bit for bit against RUN's W row
0) and `--batches_from=RUN` trains on RUN's batch order (jaxdt's sampler for
RUN's config) instead of the DataLoader's. Same start and same data: only the
frameworks' kernels differ.

Resume: a checkpoint holds the model, the AdamW state, torch's RNG state at the
current epoch's start and the position in the epoch; a resumed run replays the
epoch's shuffle and skips the batches it did, so its bytes equal an
uninterrupted run's (tests/parity/torch_peer_test.py).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import sys
import time

from absl import app
from absl import flags
import ml_dtypes
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch_crucible1 as lab  # noqa: E402  pylint: disable=g-import-not-at-top
import torch_gemm  # noqa: E402  pylint: disable=g-import-not-at-top

from jaxdt import config as config_lib  # noqa: E402
from jaxdt.data import corpus as corpus_lib  # noqa: E402
from jaxdt.data import sampler  # noqa: E402
from jaxdt.io import disk  # noqa: E402
from jaxdt.io import metadata as metadata_lib  # noqa: E402
from jaxdt.io import rundir  # noqa: E402
from jaxdt.io import results
from jaxdt.io import signals
from jaxdt.io import locks
from jaxdt.io import configdiff
from jaxdt.numerics import backend  # noqa: E402
from jaxdt import probes as probes_lib  # noqa: E402
from jaxdt.training import layout as layout_lib  # noqa: E402

EXPERIMENT = "torch_crucible1"  # the config name of a torch peer run (jaxdt never trains one)
LAB_PROBES = ("W", "delta_W_prime", "centroid", "loss", "last_motion_step")  # the lab's keys
FREEZE_PROBES = ("freeze",)  # jaxdt's compact freeze record
# --probes=freeze's file keys -> (dtype, shape(T, n_dead)), jaxdt's "freeze" probe's.
FREEZE_SPECS = {
    "n_frozen": (np.dtype(np.int32), lambda t, n: (t,)),
    "n_moving": (np.dtype(np.int32), lambda t, n: (t,)),
    "dwp_l2_mean": (np.dtype(np.float32), lambda t, n: (t,)),
    "centroid_norm": (np.dtype(np.float32), lambda t, n: (t + 1,)),
    "loss": (np.dtype(np.float32), lambda t, n: (t + 1,)),
    "last_motion_step": (np.dtype(np.int32), lambda t, n: (n,)),
}
# Per-step series -> whether it has a row 0 (row t = step t) or not (row t-1 = step t).
SERIES = {"lab": {"W": True, "delta_W_prime": False, "centroid": True, "loss": True},
          "freeze": {"n_frozen": False, "n_moving": False, "dwp_l2_mean": False,
                     "centroid_norm": True, "loss": True}}

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("output_dir", None, "the run folder")
  flags.DEFINE_integer("seed", 42, "RANDOM_SEED: torch/random/numpy seeds (init and shuffle)")
  flags.DEFINE_integer("steps", None, "TOTAL_STEPS (default: RUN's with --init_from/--batches_from, "
                       "else the lab's 5000)")
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default)")
  flags.DEFINE_string("init_from", None, "a finished jaxdt run folder: start from its step-0 "
                      "params")
  flags.DEFINE_string("batches_from", None, "a finished jaxdt run folder: train on its batch "
                      "order")
  flags.DEFINE_boolean("resume", False, "continue the unfinished run in --output_dir")
  flags.DEFINE_integer("checkpoint_every", 250, "steps between checkpoints (0: none)")
  flags.DEFINE_integer("chunk_steps", 50, "steps of rows buffered between writes")
  flags.DEFINE_string("data_dir", None, "jaxdt's data cache (the embedded default data)")
  flags.DEFINE_string("corpus_path", None, "the lab's model corpus (with --tokenizer_path)")
  flags.DEFINE_string("tokenizer_path", None, "the lab's tokenizer json")
  flags.DEFINE_enum("gemm", "auto", list(torch_gemm.ROUTES),
                    "bf16 GEMMs: native (torch's kernels), f32 (f32-upcast operands, f32 "
                    "accumulation, one rounding to bf16: fast where bf16 GEMM is not), auto "
                    "(measured here: native where bf16 runs at >= 0.5x f32 speed)")
  flags.DEFINE_enum("probes", "lab", ["lab", "freeze"],
                    "lab: the lab's keys (W, delta_W_prime, centroid, loss, last_motion_step); "
                    "freeze: the compact freeze record (n_frozen, n_moving, dwp_l2_mean, "
                    "centroid_norm, loss, last_motion_step)")
  flags.DEFINE_multi_string("set", None, "a config field of the peer's Crucible 1 config, "
                            "e.g. --set model.vocab_size=256 (as run.py --set); tiny tests")
  flags.mark_flag_as_required("output_dir")


# --- Config, data and the twin's sources -----------------------------------------------


def _source_config(path: str, what: str) -> config_lib.ExperimentConfig:
  """The config of a finished jaxdt run folder (refused in one line otherwise)."""
  meta = metadata_lib.read_metadata(path)
  cfg = meta.get("config")
  name = (cfg or {}).get("store", {}).get("trajectory_name")
  if not isinstance(cfg, dict) or meta.get("framework", "jax") != "jax" or not name:
    raise ValueError(f"{what} {path} is not a jaxdt run folder; pass a finished jaxdt run")
  if not metadata_lib.is_complete(path, name):
    raise ValueError(f"{what} {path} is unfinished; {locks.unfinished_advice(path)}")
  return config_lib.from_dict(config_lib.ExperimentConfig, cfg)


def peer_config() -> tuple[config_lib.ExperimentConfig, dict]:
  """(the peer's config, its sources): Crucible 1 (or RUN's config), the lab's five probes
  (or the freeze record with --probes=freeze)."""
  import experiments  # pylint: disable=g-import-not-at-top
  sources = {"init_from": FLAGS.init_from, "batches_from": FLAGS.batches_from}
  given = [p for p in sources.values() if p]
  base = (_source_config(given[0], "--init_from" if FLAGS.init_from else "--batches_from")
          if given else experiments.load("crucible1"))
  for p in given[1:]:
    other = _source_config(p, "--batches_from")
    if configdiff.config_differences(config_lib.to_dict(other), config_lib.to_dict(base),
                                 labels=("--batches_from has", "--init_from has")):
      raise ValueError("--init_from and --batches_from name runs of different configs; pass "
                       "one run for both")
  if base.precision != "bf16" or base.model.variant != "encoder":
    raise ValueError(f"the lab's loop is bf16 TinyLM; {given[0]} is {base.precision} "
                     f"{base.model.variant}")
  cfg = dataclasses.replace(
      base, name=EXPERIMENT, seed=FLAGS.seed,
      data_seed=base.data_seed if FLAGS.batches_from else None, sweep="", init_checkpoint=None,
      data=dataclasses.replace(base.data, data_dir=FLAGS.data_dir, corpus_path=FLAGS.corpus_path,
                               tokenizer_path=FLAGS.tokenizer_path),
      probes=dataclasses.replace(base.probes, names=(FREEZE_PROBES if FLAGS.probes == "freeze"
                                                     else LAB_PROBES)),
      store=dataclasses.replace(base.store, chunk_steps=FLAGS.chunk_steps,
                                notes="The lab's Crucible 1 loop in PyTorch (benchmarks/"
                                      "torch_peer.py)."))
  for assignment in FLAGS.set or ():
    cfg = config_lib.override(cfg, assignment)
  steps = FLAGS.steps or (base.steps if given else 5000)
  marks = tuple(range(FLAGS.checkpoint_every, steps, FLAGS.checkpoint_every)
                ) if FLAGS.checkpoint_every > 0 else ()
  return config_lib.with_steps(cfg, steps, marks), {k: v and os.path.abspath(v)
                                                    for k, v in sources.items()}


def _same_data(path: str, corpus) -> config_lib.ExperimentConfig:
  """RUN's config, after checking that RUN trained on the token ids loaded here."""
  meta = metadata_lib.read_metadata(path)
  if meta.get("data_files") != corpus.files:
    raise ValueError(f"{path} trained on other data files than these ({meta.get('data_files')}); "
                     "pass the same --data_dir/--corpus_path/--tokenizer_path as that run")
  return config_lib.from_dict(config_lib.ExperimentConfig, meta["config"])


def init_from(path: str, corpus, model: nn.Module) -> None:
  """Loads RUN's step-0 params into `model`, after checking them against RUN's W row 0."""
  from jaxdt.model import torch_io  # pylint: disable=g-import-not-at-top
  from jaxdt.training import state as state_lib  # pylint: disable=g-import-not-at-top
  src = _same_data(path, corpus)
  lay = layout_lib.layout(src, corpus)
  params = state_lib.init_state(src, lay.dims).params
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
  src = _same_data(path, corpus)
  sample = jax.jit(lambda t: sampler.make_sampler(corpus.tokens, src.data)(step.data_key(src), t)
                   .inputs)
  return lambda t: torch.from_numpy(np.asarray(sample(np.int32(t))).astype(np.int64))


# --- torch <-> numpy, bit for bit ---------------------------------------------------


def to_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def bits(w: torch.Tensor) -> np.ndarray:
  """bf16 rows as their uint16 bit patterns (the lab's `.view(torch.uint16)`)."""
  return w.contiguous().view(torch.int16).numpy().view(np.uint16)


def to_torch(a) -> torch.Tensor:
  a = np.asarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def snapshot(model, optimizer, epoch_rng, position, last_motion_step, elapsed) -> dict:
  """The loop's whole state as numpy arrays (a checkpoint's pytree)."""
  named = list(model.named_parameters())
  state = lambda p, k: optimizer.state[p][k] if p in optimizer.state else None
  return {
      "model": {n: to_numpy(p) for n, p in named},
      "exp_avg": {n: to_numpy(state(p, "exp_avg")) for n, p in named},
      "exp_avg_sq": {n: to_numpy(state(p, "exp_avg_sq")) for n, p in named},
      "adam_step": {n: to_numpy(state(p, "step")) for n, p in named},
      "epoch_rng": to_numpy(epoch_rng), "position": np.asarray(position, np.int64),
      "last_motion_step": to_numpy(last_motion_step),
      "elapsed_s": np.asarray(elapsed, np.float64),
  }


def like_snapshot(model, n_rng: int, n_dead: int) -> dict:
  named = list(model.named_parameters())
  zeros = lambda p: np.zeros(p.shape, ml_dtypes.bfloat16)
  return {"model": {n: zeros(p) for n, p in named}, "exp_avg": {n: zeros(p) for n, p in named},
          "exp_avg_sq": {n: zeros(p) for n, p in named},
          "adam_step": {n: np.zeros((), np.float32) for n, _ in named},
          "epoch_rng": np.zeros(n_rng, np.uint8), "position": np.zeros(3, np.int64),
          "last_motion_step": np.zeros(n_dead, np.int32), "elapsed_s": np.zeros((), np.float64)}


def restore(snap: dict, model, optimizer) -> None:
  with torch.no_grad():
    for n, p in model.named_parameters():
      p.copy_(to_torch(snap["model"][n]))
      optimizer.state[p] = {"step": to_torch(snap["adam_step"][n]),
                            "exp_avg": to_torch(snap["exp_avg"][n]),
                            "exp_avg_sq": to_torch(snap["exp_avg_sq"][n])}


# --- The run ---------------------------------------------------------------------------


def peer_layout(cfg, corpus) -> layout_lib.Layout:
  """The file layout: jaxdt's (`layout_lib.layout`), with --probes=freeze checked against
  FREEZE_SPECS; where this jaxdt has no "freeze" probe yet, FREEZE_SPECS themselves."""
  if cfg.probes.names != FREEZE_PROBES:
    return layout_lib.layout(cfg, corpus)
  want = {k: (dt, shape(cfg.steps, corpus.n_dead)) for k, (dt, shape) in FREEZE_SPECS.items()}
  if "freeze" in probes_lib.PROBES:
    lay = layout_lib.layout(cfg, corpus)
    got = {k: (np.dtype(dt), tuple(shape)) for k, (dt, shape) in lay.specs.items()
           if k not in lay.static}
    if got != want:
      raise ValueError(f"jaxdt's freeze probe records {sorted(got.items())}, the torch peer "
                       f"{sorted(want.items())}; bring benchmarks/torch_peer.py's FREEZE_SPECS "
                       "in line")
    return lay
  static = {"dead_mask": corpus.dead_mask, "dead_indices": corpus.dead_indices.astype(np.int64)}
  specs = {**want, **{k: (a.dtype, a.shape) for k, a in static.items()}}
  chunk = sum(np.dtype(dt).itemsize for k, (dt, _) in want.items() if k in SERIES["freeze"])
  return layout_lib.Layout(corpus.dead_indices, None, None, specs, static, chunk)


def lab_record(w, dwp, magnitude, threshold) -> dict:
  """The lab's per-step rows: W's bits, ΔW′, the centroid (loss apart)."""
  del magnitude, threshold
  return {"W": bits(w), "delta_W_prime": dwp.numpy(), "centroid": w.float().mean(dim=0).numpy()}


def centroid_norm(w: torch.Tensor) -> np.float32:
  """||mean over the dead rows of W (as f32)||₂."""
  return np.float32(torch.linalg.vector_norm(w.float().mean(dim=0)).item())


def freeze_record(w, dwp, magnitude, threshold) -> dict:
  """The freeze record's per-step rows (loss apart), from the lab's ||ΔW′_i||₂ (`magnitude`).

  As jaxdt's "freeze" probe: a row is frozen unless ||ΔW′_i||₂ ≥ threshold (a NaN
  norm is frozen), so the counts sum to the rows; the mean is over the finite
  norms (0 where none is).
  """
  del dwp
  finite = magnitude[torch.isfinite(magnitude)]
  return {"n_frozen": np.int32((~(magnitude >= threshold)).sum().item()),
          "n_moving": np.int32((magnitude >= threshold).sum().item()),
          "dwp_l2_mean": np.float32(finite.double().mean().item() if finite.numel() else 0.0),
          "centroid_norm": centroid_norm(w)}


class Rows:
  """The capture of a chunk of steps, written to the run folder at its end."""

  def __init__(self, run: rundir.RunDir, series: dict):
    self.run, self.first, self.initial = run, None, series  # key -> has a row 0
    self.buf = {k: [] for k in series}

  def add(self, step, values: dict):
    self.first = step if self.first is None else self.first
    for k, rows in self.buf.items():
      rows.append(values[k])

  def flush(self):
    if self.first is None:
      return
    for k, rows in self.buf.items():
      row = self.first if self.initial[k] else self.first - 1  # e.g. ΔW′: row t-1 = step t
      self.run.write_rows(k, row, np.stack(rows))
      rows.clear()
    self.first = None


def resolve_route(cfg) -> tuple[str, dict]:
  """(route, facts) of --gemm here; a resume keeps the run's route (auto) or is refused.

  The folder is read here without its lock, for a one-line refusal before any
  work; `RunDir.begin` checks "torch_gemm" again under the lock (a plan input).
  """
  route, facts = torch_gemm.resolve_gemm(FLAGS.gemm)
  facts = {**facts, "cpu_model": backend.cpu_description()["cpu_model"]}
  if not (FLAGS.resume and os.path.isdir(FLAGS.output_dir)):
    return route, facts
  run = rundir.RunDir(FLAGS.output_dir, cfg.store.trajectory_name)
  folder = run.inspect(EXPERIMENT)
  if folder.kind != "unfinished":
    return route, facts  # begin says what the folder holds
  recorded = folder.metadata.get("torch_gemm", "native")  # runs before --gemm were native
  if FLAGS.gemm == "auto" and route != recorded:
    return recorded, {**facts, "why": f"resume: the run's route (auto measured {route})"}
  if route != recorded:
    raise ValueError(f"cannot resume {run.path}: the run used --gemm={recorded}, this resume "
                     f"--gemm={FLAGS.gemm} ({route}); resume with --gemm={recorded} or auto, "
                     "or choose another --output_dir")
  return route, facts


def _metadata(cfg, corpus, lay, sources, final_loss, steps_done, gemm) -> dict:
  return {**layout_lib.lab_metadata(cfg, corpus, lay, steps_done, final_loss),
          "completed": False, "trajectory_bytes": None, "framework": "torch",
          "config": config_lib.to_dict(cfg), "data_files": corpus.files,
          "data_manifest": None if corpus.default is None else corpus.default.manifest,
          "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
          "data_order": (f"jaxdt's sampler of {sources['batches_from']}" if sources["batches_from"]
                         else f"torch DataLoader(shuffle=True), seed {cfg.seed}"),
          **gemm, **sources, **backend.cpu_description(), "python": platform.python_version(),
          "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
          "wall_time_s": None}


def train(log=print) -> str:
  """Runs (or resumes) the peer run; returns its trajectory path."""
  t_start = time.perf_counter()
  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  cfg, sources = peer_config()
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  lay = peer_layout(cfg, corpus)
  route, facts = resolve_route(cfg)
  gemm = {"torch_gemm": route, "torch_gemm_requested": FLAGS.gemm, "torch_gemm_facts": facts}
  mode = torch_gemm.F32Gemm() if route == "f32" else None
  log(f"gemm: {route} ({facts['why']})")
  T, B, L, V = cfg.steps, cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  device = "cpu"
  torch.manual_seed(cfg.seed)
  random.seed(cfg.seed)
  np.random.seed(cfg.seed)
  dead_mask = torch.from_numpy(corpus.dead_mask)
  n_dead = int(dead_mask.sum())
  dataset = lab.TextDataset(corpus.tokens.tolist(), L)  # a list, as encoding.ids is
  model = lab.TinyLM(V, cfg.model.hidden_dim, cfg.model.num_layers, cfg.model.num_heads, L)
  model = model.to(device).to(torch.bfloat16)
  if sources["init_from"]:
    init_from(sources["init_from"], corpus, model)
  optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.learning_rate,
                                betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay)
  batch_of = jaxdt_batches(sources["batches_from"], corpus) if sources["batches_from"] else None
  dataloader = DataLoader(dataset, batch_size=B, shuffle=True, drop_last=True)
  loss_fn = nn.CrossEntropyLoss()
  per_epoch = sampler.batches_per_epoch(len(corpus.tokens), cfg.data)
  like = like_snapshot(model, torch.get_rng_state().numel(), n_dead)
  series = SERIES[FLAGS.probes]
  record = freeze_record if FLAGS.probes == "freeze" else lab_record
  with rundir.RunDir(FLAGS.output_dir, cfg.store.trajectory_name, log=log) as run:
    inputs = {"data_files": corpus.files, "framework": "torch",
              "torch_threads": torch.get_num_threads(), "torch_gemm": route}
    meta = _metadata(cfg, corpus, lay, sources, None, 0, gemm)
    plan = rundir.FolderPlan(
        EXPERIMENT, config_lib.to_dict(cfg), inputs, lay.specs, layout_lib.FILE_METADATA,
        cfg.store.checkpoint_steps, 4 * sum(a.nbytes for a in like["model"].values()) + (1 << 20))
    begun = run.begin(plan, meta, like, FLAGS.resume)
    start, snap = begun.step, begun.state
    W_prev = model.embedding.weight.detach().cpu()[dead_mask].to(torch.bfloat16)
    epoch, skip, elapsed0, diverged = 0, 0, 0.0, None
    last_motion_step = torch.full((n_dead,), -1, dtype=torch.int32)
    if snap is None:
      if FLAGS.probes == "freeze":
        run.write_rows("centroid_norm", 0, np.array([centroid_norm(W_prev)], np.float32))
      else:
        run.write_rows("W", 0, bits(W_prev)[None])
        run.write_rows("centroid", 0, W_prev.float().mean(dim=0).numpy()[None])
      run.write_rows("loss", 0, np.array([np.nan], np.float32))
    else:
      restore(snap, model, optimizer)
      torch.set_rng_state(to_torch(snap["epoch_rng"]))
      epoch, skip = int(snap["position"][0]) - 1, int(snap["position"][1])
      diverged = None if snap["position"][2] < 0 else int(snap["position"][2])
      last_motion_step = to_torch(snap["last_motion_step"])
      elapsed0 = float(snap["elapsed_s"])
      W_prev = model.embedding.weight.detach().cpu()[dead_mask].to(torch.bfloat16)
    for k, a in lay.static.items():
      run.write(k, a)
    rows, step, loss, t_run = Rows(run, series), start, None, time.perf_counter()
    ops_per_step = None  # the f32 route's rerouted ops of this process's first step
    model.train()
    try:
      while step < T:
        epoch += 1
        epoch_rng = torch.get_rng_state()
        within = skip if batch_of else 0  # batches of this epoch done
        batches = (map(batch_of, range(step + 1, step + 1 + per_epoch - skip)) if batch_of
                   else dataloader)
        for batch in batches:
          if step >= T:
            break
          if skip and not batch_of:  # a resumed epoch: the batches done before the checkpoint
            skip, within = skip - 1, within + 1
            continue
          within += 1
          if mode is None:
            loss = lab.train_step(model, optimizer, loss_fn, batch.to(device), device, V)
          else:
            with mode:
              loss = lab.train_step(model, optimizer, loss_fn, batch.to(device), device, V)
            if ops_per_step is None:
              ops_per_step = dict(mode.counts)
              log(f"gemm: f32 route, one step: {sum(ops_per_step.values())} ops rerouted "
                  f"({', '.join(f'{k} {n}' for k, n in sorted(ops_per_step.items()))}), "
                  f"{mode.total_not_rerouted} bf16 GEMM-like ops not rerouted")
          step += 1
          W_curr = model.embedding.weight.detach().cpu()[dead_mask].to(torch.bfloat16)
          delta_W = W_curr.float() - W_prev.float()
          ulp = lab.compute_ulp_bf16(W_prev)
          delta_W_prime = delta_W / ulp
          displacement_magnitude = torch.norm(delta_W_prime, dim=1)
          moved = displacement_magnitude >= cfg.probes.motion_threshold
          last_motion_step[moved] = step
          rows.add(step, {**record(W_curr, delta_W_prime, displacement_magnitude,
                                   cfg.probes.motion_threshold), "loss": np.float32(loss.item())})
          if diverged is None and not np.isfinite(loss.item()):
            diverged = step
          W_prev = W_curr
          if step % cfg.store.chunk_steps == 0 or step in cfg.store.checkpoint_steps or step == T:
            rows.flush()
            rate = (step - start) / (time.perf_counter() - t_run)
            log(f"step {step}/{T} loss {loss.item():.4f} epoch {epoch} {rate:.3f} steps/s")
          if step in cfg.store.checkpoint_steps:
            run.checkpoint(step, snapshot(
                model, optimizer, epoch_rng, (epoch, within, -1 if diverged is None else diverged),
                last_motion_step, elapsed0 + time.perf_counter() - t_start))
          signals.check_signals()
        skip = 0
      run.write("last_motion_step", last_motion_step.numpy())
      final = float(loss.item()) if loss is not None else float("nan")
      if mode is not None:
        gemm["torch_gemm_ops"] = {"first_step": ops_per_step, "not_rerouted": dict(
            mode.not_rerouted), "steps": T - start}
      meta = {**_metadata(cfg, corpus, lay, sources, final, T, gemm), **inputs,
              "wall_time_s": elapsed0 + time.perf_counter() - t_start, "steps_completed": T,
              "diverged_at_step": diverged}
      meta["global_last_motion"] = int(last_motion_step.max())
      meta["fimbulwinter_duration"] = T - meta["global_last_motion"]
      run.commit(meta)
    except KeyboardInterrupt as e:
      raise signals.Interrupted.from_signal(e, step, run.resume_from) from None
  return run.trajectory


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  signals.raise_on_signals()
  backend.quiet_backend_probe()
  try:
    path = train()
  except signals.Interrupted as e:
    print(str(e), file=sys.stderr)
    return signals.exit_status(e.signum)
  except (ValueError, disk.StoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {disk.os_error_message(e)}", file=sys.stderr)
    return 2
  print(f"Saved to {path}")
  return 0


if __name__ == "__main__":
  define_flags()
  from cli import parse_flags  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
