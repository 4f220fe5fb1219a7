"""The lab's Crucible 1 loop in PyTorch as a peer run: a run folder `run.py --summarize` reads.

    python -m torchref.peer --output_dir=DIR [--seed=42] [--steps=2000] [--threads=0]
    python -m torchref.peer --output_dir=DIR --init_from=RUN --batches_from=RUN  # a twin
    python -m torchref.peer --output_dir=DIR ... --resume
    python -m torchref.peer --output_dir=DIR --gemm=f32 --probes=freeze

(`python benchmarks/torch_peer.py` is the same command.) The loop is the lab's
Crucible 1 notebook, cells 4-11, as `torchref.lab` ports it (the one copy of its TinyLM): seeds,
`model.to(torch.bfloat16)`, AdamW, `DataLoader(shuffle=True, drop_last=True)`
over non-overlapping chunks, `torch.autocast(cpu, bf16)` around the forward and
the loss, and the per-step capture of W, ΔW′, centroid, loss and
last_motion_step. Only the storage differs: instead of preallocated histories
the rows stream into a jaxdt run folder (`rundir.RunDir`: lock, checkpoints,
checksums, one commit point), so a run is resumable and `--summarize`,
`--analyze` and `--compare` read it as they read a jaxdt run. The file holds
the lab's own keys (W, delta_W_prime, centroid, loss, last_motion_step,
dead_mask, dead_indices); metadata.json says `"framework": "torch"`.

--probes=freeze writes jaxdt's compact freeze record instead of the lab's keys,
with the keys and row conventions of jaxdt's "freeze" probe (n_frozen, n_moving,
dwp_l2_mean, centroid_norm, loss, last_motion_step; `capture.freeze_record`).

--gemm: torch's bf16 CPU GEMM is a slow fallback on CPUs without bf16 dot
units (AVX2-only). `f32` runs each training step under `torch_gemm.F32Gemm`:
every bf16 GEMM-like op of the forward and backward (mm, addmm, bmm, baddbmm,
the CPU flash attention) is computed from f32-upcast operands with f32
accumulation and rounded once to bf16. `native` is torch's own kernels; `auto`
(the default) measures both GEMMs here and picks native only where bf16 runs at
least half as fast as f32 (`torch_gemm.bf16_dot_is_fast`). metadata.json records
the route ("torch_gemm"), the request and the measurement; a resume with another
route is refused (a resume with auto keeps the run's route).

--device=cuda: the init drawn on the CPU (a CPU run's bits) and moved to the GPU,
autocast(cuda, bf16), torch's own kernels (`gemm.route_on`); the dead rows are
copied to the CPU each step for the capture. The device is part of the run's
identity; a CUDA resume's byte identity is unchecked (no GPU lent to the tests).
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

import contextlib
import dataclasses
import os
import platform
import random
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from jaxdt import cli
from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import sampler
from jaxdt.io import configdiff
from jaxdt.io import disk
from jaxdt.io import rundir
from jaxdt.io import signals
from jaxdt.numerics import backend
from jaxdt.training import layout as layout_lib
from torchref import gemm as torch_gemm
from torchref import lab
from torchref import twin
from torchref.capture import (Rows, bits, centroid_norm, freeze_record, lab_record, like_snapshot,
                              restore, snapshot, to_torch)

EXPERIMENT = "torch_crucible1"  # the config name of a torch peer run (jaxdt never trains one)
LAB_PROBES = ("W", "delta_W_prime", "centroid", "loss", "last_motion_step")  # the lab's keys
FREEZE_PROBES = ("freeze",)  # jaxdt's compact freeze record
# --probes=twin: the lab's keys and the dead rows' gradient and Adam moments as bf16 bits
# (jaxdt's grad_W_bits / momentum_W_bits / variance_W_bits), for per-step divergence of
# g, m, v and W.
TWIN_PROBES = LAB_PROBES + ("grad_W_bits", "momentum_W_bits", "variance_W_bits")
PROBE_SETS = {"lab": LAB_PROBES, "freeze": FREEZE_PROBES, "twin": TWIN_PROBES}
# Per-step series -> whether it has a row 0 (row t = step t) or not (row t-1 = step t).
SERIES = {"lab": {"W": True, "delta_W_prime": False, "centroid": True, "loss": True},
          "freeze": {"n_frozen": False, "n_moving": False, "dwp_l2_mean": False,
                     "centroid_norm": True, "loss": True}}
SERIES["twin"] = {**SERIES["lab"], "grad_W": True, "momentum_W": True, "variance_W": True}

FLAGS = flags.FLAGS
DEVICES = ("cpu", "cuda")


def define_flags():
  flags.DEFINE_string("output_dir", None, "the run folder")
  flags.DEFINE_integer("seed", 42, "RANDOM_SEED: torch/random/numpy seeds (init and shuffle)")
  flags.DEFINE_integer("steps", None, "TOTAL_STEPS (default: RUN's with --init_from/--batches_from, "
                       "else the lab's 5000)")
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default)")
  flags.DEFINE_enum("device", "cpu", list(DEVICES),
                    "where the lab's loop runs: cpu, or cuda (torch's own bf16 kernels under "
                    "autocast on the GPU; the GEMM route is then native)")
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
  flags.DEFINE_enum("probes", "lab", list(PROBE_SETS),
                    "lab: the lab's keys (W, delta_W_prime, centroid, loss, last_motion_step); "
                    "freeze: the compact freeze record (n_frozen, n_moving, dwp_l2_mean, "
                    "centroid_norm, loss, last_motion_step)")
  flags.DEFINE_multi_string("set", None, "a config field of the peer's Crucible 1 config, "
                            "e.g. --set model.vocab_size=256 (as run.py --set); tiny tests")
  flags.mark_flag_as_required("output_dir")


# --- Config, data and the twin's sources -----------------------------------------------


def peer_config() -> tuple[config_lib.ExperimentConfig, dict]:
  """(the peer's config, its sources): Crucible 1 (or RUN's config), the lab's five probes
  (or the freeze record with --probes=freeze)."""
  import experiments  # pylint: disable=g-import-not-at-top
  sources = {"init_from": FLAGS.init_from, "batches_from": FLAGS.batches_from}
  given = [p for p in sources.values() if p]
  base = (twin.source_config(given[0], "--init_from" if FLAGS.init_from else "--batches_from")
          if given else experiments.load("crucible1"))
  for p in given[1:]:
    other = twin.source_config(p, "--batches_from")
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
      probes=dataclasses.replace(base.probes, names=PROBE_SETS[FLAGS.probes]),
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


# --- The run ---------------------------------------------------------------------------


def peer_layout(cfg, corpus) -> layout_lib.Layout:
  """The file layout: jaxdt's (`layout_lib.layout`) for the lab's keys or the freeze record."""
  return layout_lib.layout(cfg, corpus)


def resolve_route(cfg) -> tuple[str, dict]:
  """(route, facts) of --gemm here; a resume keeps the run's route (auto) or is refused.

  The folder is read here without its lock, for a one-line refusal before any
  work; `RunDir.begin` checks "torch_gemm" again under the lock (a plan input).
  """
  route, facts = torch_gemm.route_on(FLAGS.device, FLAGS.gemm)
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


@dataclasses.dataclass
class _Loop:
  """The lab's loop state between steps: model, optimizer, position, tracker, rows."""

  cfg: config_lib.ExperimentConfig
  model: nn.Module
  optimizer: torch.optim.Optimizer
  dead_mask: torch.Tensor
  mode: Optional[torch_gemm.F32Gemm]  # the f32 route, or None (native)
  device: str = "cpu"
  step: int = 0
  epoch: int = 0
  skip: int = 0  # batches of the current epoch done before a resume
  diverged: Optional[int] = None
  elapsed0: float = 0.0
  loss: Optional[torch.Tensor] = None
  ops_per_step: Optional[dict] = None  # the f32 route's rerouted ops of this process's first step
  w_prev: Optional[torch.Tensor] = None
  last_motion_step: Optional[torch.Tensor] = None

  def dead_rows(self) -> torch.Tensor:
    return self.model.embedding.weight.detach().cpu()[self.dead_mask].to(torch.bfloat16)

  def train_step(self, batch, log) -> None:
    """One step of the lab's cell 11 (under the f32 route when there is one)."""
    V = self.cfg.model.vocab_size
    loss_fn = nn.CrossEntropyLoss()
    with contextlib.nullcontext() if self.mode is None else self.mode:
      self.loss = lab.train_step(self.model, self.optimizer, loss_fn, batch.to(self.device),
                                 self.device, V)
    if self.mode is not None and self.ops_per_step is None:
      self.ops_per_step = dict(self.mode.counts)
      log(f"gemm: f32 route, one step: {sum(self.ops_per_step.values())} ops rerouted "
          f"({', '.join(f'{k} {n}' for k, n in sorted(self.ops_per_step.items()))}), "
          f"{self.mode.total_not_rerouted} bf16 GEMM-like ops not rerouted")

  def capture(self, record) -> dict:
    """The lab's per-step capture after the step just taken: ΔW′, last motion, the rows."""
    w_curr = self.dead_rows()
    delta_w_prime = (w_curr.float() - self.w_prev.float()) / lab.compute_ulp_bf16(self.w_prev)
    magnitude = torch.norm(delta_w_prime, dim=1)
    threshold = self.cfg.probes.motion_threshold
    self.last_motion_step[magnitude >= threshold] = self.step
    loss = self.loss.item()
    if self.diverged is None and not np.isfinite(loss):
      self.diverged = self.step
    self.w_prev = w_curr
    out = {**record(w_curr, delta_w_prime, magnitude, threshold), "loss": np.float32(loss)}
    if FLAGS.probes == "twin":
      out.update(self.moments())
    return out

  def moments(self) -> dict:
    """The dead rows' gradient of the step, exp_avg and exp_avg_sq (bf16, as torch holds
    them) as uint16 bits."""
    weight = self.model.embedding.weight
    state = self.optimizer.state[weight]
    return {"grad_W": bits(weight.grad.detach().cpu()[self.dead_mask]),
            "momentum_W": bits(state["exp_avg"].detach().cpu()[self.dead_mask]),
            "variance_W": bits(state["exp_avg_sq"].detach().cpu()[self.dead_mask])}


def _start(loop: _Loop, run: rundir.RunDir, snap, lay) -> None:
  """Row 0 of a fresh run, or the loop's state from a checkpoint; then the statics."""
  loop.w_prev = loop.dead_rows()
  loop.last_motion_step = torch.full((int(loop.dead_mask.sum()),), -1, dtype=torch.int32)
  if snap is None:
    if FLAGS.probes == "freeze":
      run.write_rows("centroid_norm", 0, np.array([centroid_norm(loop.w_prev)], np.float32))
    else:
      run.write_rows("W", 0, bits(loop.w_prev)[None])
      run.write_rows("centroid", 0, loop.w_prev.float().mean(dim=0).numpy()[None])
    if FLAGS.probes == "twin":  # nothing before step 1: zeros, as jaxdt's row 0
      for k in ("grad_W", "momentum_W", "variance_W"):
        run.write_rows(k, 0, np.zeros((1,) + tuple(loop.w_prev.shape), np.uint16))
    run.write_rows("loss", 0, np.array([np.nan], np.float32))
  else:
    restore(snap, loop.model, loop.optimizer)
    torch.set_rng_state(to_torch(snap["epoch_rng"]))
    loop.epoch, loop.skip = int(snap["position"][0]) - 1, int(snap["position"][1])
    loop.diverged = None if snap["position"][2] < 0 else int(snap["position"][2])
    loop.last_motion_step = to_torch(snap["last_motion_step"])
    loop.elapsed0 = float(snap["elapsed_s"])
    loop.w_prev = loop.dead_rows()
  for k, a in lay.static.items():
    run.write(k, a)


def _model(cfg, corpus, sources, device: str = "cpu") -> tuple:
  """(model, optimizer): the lab's TinyLM in bf16 (or RUN's init) and AdamW, seeded as cell 4
  (drawn on the CPU, then moved to `device`: the same init bits on every device)."""
  torch.manual_seed(cfg.seed)
  random.seed(cfg.seed)
  np.random.seed(cfg.seed)
  m = cfg.model
  model = lab.TinyLM(m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads, cfg.data.seq_len)
  model = model.to("cpu").to(torch.bfloat16)
  if sources["init_from"]:
    twin.init_from(sources["init_from"], corpus, model)
  model = model.to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.learning_rate,
                                betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay)
  return model, optimizer


def _epochs(loop: _Loop, corpus, sources):
  """Yields (epoch's RNG state at its start, batches done in it, batch) in the lab's order
  (DataLoader(shuffle=True)) or RUN's (--batches_from), skipping a resumed epoch's done ones."""
  cfg = loop.cfg
  batch_of = twin.jaxdt_batches(sources["batches_from"], corpus) if sources["batches_from"] else None
  dataset = lab.TextDataset(corpus.tokens.tolist(), cfg.data.seq_len)  # a list, as encoding.ids
  dataloader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
  per_epoch = sampler.batches_per_epoch(len(corpus.tokens), cfg.data)
  while loop.step < cfg.steps:
    loop.epoch += 1
    epoch_rng = torch.get_rng_state()
    within = loop.skip if batch_of else 0  # batches of this epoch done
    batches = (map(batch_of, range(loop.step + 1, loop.step + 1 + per_epoch - loop.skip))
               if batch_of else dataloader)
    for batch in batches:
      if loop.step >= cfg.steps:
        break
      if loop.skip and not batch_of:  # a resumed epoch: the batches done before the checkpoint
        loop.skip, within = loop.skip - 1, within + 1
        continue
      within += 1
      yield epoch_rng, within, batch
    loop.skip = 0


def _finish(loop: _Loop, run: rundir.RunDir, meta_of, start: int, t_start: float) -> None:
  cfg, T = loop.cfg, loop.cfg.steps
  run.write("last_motion_step", loop.last_motion_step.numpy())
  final = float(loop.loss.item()) if loop.loss is not None else float("nan")
  extra = {}
  if loop.mode is not None:
    extra["torch_gemm_ops"] = {"first_step": loop.ops_per_step, "not_rerouted": dict(
        loop.mode.not_rerouted), "steps": T - start}
  meta = {**meta_of(final, T, extra), "wall_time_s": loop.elapsed0 + time.perf_counter() - t_start,
          "steps_completed": T, "diverged_at_step": loop.diverged}
  meta["global_last_motion"] = int(loop.last_motion_step.max())
  meta["fimbulwinter_duration"] = T - meta["global_last_motion"]
  run.commit(meta)


def train(log=print) -> str:
  """Runs (or resumes) the peer run; returns its trajectory path."""
  t_start = time.perf_counter()
  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  cfg, sources = peer_config()
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  lay = peer_layout(cfg, corpus)
  route, facts = resolve_route(cfg)
  device = FLAGS.device if FLAGS.device == "cpu" else f"{FLAGS.device} ({facts['gpu']})"
  gemm = {"torch_gemm": route, "torch_gemm_requested": FLAGS.gemm, "torch_gemm_facts": facts,
          "torch_device": device, "device": FLAGS.device}
  log(f"gemm: {route} ({facts['why']})")
  model, optimizer = _model(cfg, corpus, sources, FLAGS.device)
  loop = _Loop(cfg, model, optimizer, torch.from_numpy(corpus.dead_mask),
               torch_gemm.F32Gemm() if route == "f32" else None, FLAGS.device)
  like = like_snapshot(model, torch.get_rng_state().numel(), int(loop.dead_mask.sum()))
  record = freeze_record if FLAGS.probes == "freeze" else lab_record
  inputs = {"data_files": corpus.files, "framework": "torch",
            "torch_threads": torch.get_num_threads(), "torch_gemm": route}
  if FLAGS.device != "cpu":  # CPU folders keep the inputs they had before the flag existed
    inputs["torch_device"] = device
  meta_of = lambda final, steps, extra: {
      **_metadata(cfg, corpus, lay, sources, final, steps, {**gemm, **extra}), **inputs}
  with rundir.RunDir(FLAGS.output_dir, cfg.store.trajectory_name, log=log) as run:
    plan = rundir.FolderPlan(
        EXPERIMENT, config_lib.to_dict(cfg), inputs, lay.specs, layout_lib.FILE_METADATA,
        cfg.store.checkpoint_steps, 4 * sum(a.nbytes for a in like["model"].values()) + (1 << 20))
    begun = run.begin(plan, _metadata(cfg, corpus, lay, sources, None, 0, gemm), like,
                      FLAGS.resume)
    start = loop.step = begun.step
    _start(loop, run, begun.state, lay)
    rows, t_run = Rows(run, SERIES[FLAGS.probes]), time.perf_counter()
    model.train()
    try:
      for epoch_rng, within, batch in _epochs(loop, corpus, sources):
        loop.train_step(batch, log)
        loop.step += 1
        rows.add(loop.step, loop.capture(record))
        step = loop.step
        if step % cfg.store.chunk_steps == 0 or step in cfg.store.checkpoint_steps or step == cfg.steps:
          rows.flush()
          rate = (step - start) / (time.perf_counter() - t_run)
          log(f"step {step}/{cfg.steps} loss {loop.loss.item():.4f} epoch {loop.epoch} "
              f"{rate:.3f} steps/s")
        if step in cfg.store.checkpoint_steps:
          run.checkpoint(step, snapshot(
              model, optimizer, epoch_rng,
              (loop.epoch, within, -1 if loop.diverged is None else loop.diverged),
              loop.last_motion_step, loop.elapsed0 + time.perf_counter() - t_start))
        signals.check_signals()
      _finish(loop, run, meta_of, start, t_start)
    except KeyboardInterrupt as e:
      raise signals.Interrupted.from_signal(e, loop.step, run.resume_from) from None
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


def cli_main() -> None:
  """The command line: `python -m torchref.peer` and benchmarks/torch_peer.py."""
  cli.run_tool(main, define_flags)


if __name__ == "__main__":
  cli_main()
