"""jaxdt entry point: `python run.py --experiment=NAME [flags]`.

`flannel_data` builds or checks the data; every other name is a training
experiment from `experiments/` (a config), run by the one loop in
`jaxdt.training.loop`, with flags overriding the config. Bad input (data, store or
config errors) prints one line, `error: <message>`, to stderr and exits with
status 2, without a traceback. `--verification` (thimble9, crucible4) runs the
experiment's short verification mode and exits with status 1 when its records
differ from `--verify_against` by a single bit. `--analyze=PATH` analyses a
stored run (ours or the lab's files) and `--compare=A,B` compares two runs bit
for bit, both without training. XLA_FLAGS are set by `jaxdt.numerics.backend` first.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

from absl import app
from absl import flags
import jax

import experiments

from jaxdt import cli
from jaxdt import config as config_lib
from jaxdt.analysis import lab_accounting
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import demographics
from jaxdt.data import vocabulary
from jaxdt.io import disk
from jaxdt.io import signals
from jaxdt.io import tensorfile
from jaxdt.numerics import backend
from jaxdt.report import outputs
from jaxdt.report import summary as summary_lib
from jaxdt.report import sweep as sweep_report
from jaxdt.training import loop
from jaxdt import probes as probes_lib
from jaxdt.training import runs
from jaxdt.training import sweep
from jaxdt import verify

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None,
                    f"Experiment to run: flannel_data, or one of {', '.join(experiments.NAMES)}.")
flags.DEFINE_string("output_dir", None, "Run folder (default: runs/<experiment>).")
flags.DEFINE_integer("steps", None, "Override the experiment's number of steps.")
flags.DEFINE_integer("batch_size", None, "Override the batch size.")
flags.DEFINE_integer("seq_len", None, "Override the sequence length.")
flags.DEFINE_float("learning_rate", None, "Override AdamW's lr.")
flags.DEFINE_float("weight_decay", None, "Override AdamW's decoupled weight decay.")
flags.DEFINE_integer("seed", None, "Override the random seed (model init and data order).")
flags.DEFINE_enum("precision", None, list(config_lib.PRECISIONS),
                  "bf16 (the lab's), fp32, mixed (fp32 master weights, bf16 compute), bf16_sr "
                  "(bf16, new params stochastically rounded, torchao's) or bf16_kahan (bf16 with "
                  "Kahan compensation buffers, optimi's).")
flags.DEFINE_enum("gemm_operands", None, list(config_lib.GEMM_OPERANDS),
                  "What bf16 GEMMs read their operands as: auto (default: bf16 where the CPU has "
                  "AVX512_BF16/AMX, else f32; bf16 on accelerators), float32 or bfloat16. Values "
                  "are the same; speed and f32 summation order differ (metadata: gemm_path).")
flags.DEFINE_integer("chunk_steps", None, "Steps per jitted scan chunk (results do not depend on it).")
flags.DEFINE_string("init_checkpoint", None,
                    "Start from a torch state_dict (the lab's step-0 .pt, or .safetensors).")
flags.DEFINE_boolean("resume", False, "Continue the run in --output_dir from its latest checkpoint.")
flags.DEFINE_boolean(
    "allow_host_change", False,
    "With --resume: continue even on a host whose arithmetic fingerprint differs from the "
    "run's (other CPU class or GEMM path); metadata records the step where the host changed.")
flags.DEFINE_boolean(
    "fingerprint", False,
    "Print this host's arithmetic fingerprint (fingerprint=<hex>) with its CPU model and "
    "features, and exit; takes no other flag.")
flags.DEFINE_boolean("progress", True, "Show the progress bar.")
flags.DEFINE_string(
    "data_dir", None,
    "Cache for the embedded default data (default: $XDG_CACHE_HOME/jaxdt or ~/.cache/jaxdt).")
flags.DEFINE_enum(
    "data_source", None, list(config_lib.DATA_SOURCES),
    "default: the embedded data, built offline; fineweb: the lab's Flannel recipe from "
    "FineWeb (build it once with --experiment=flannel_data --data_source=fineweb; needs "
    "pip install -e '.[lab-data]' and a network, or --fineweb_mirror).")
flags.DEFINE_string("fineweb_mirror", None,
                    "A local copy of the hub's files (<dir>/<dataset>/<file>) to build the "
                    "fineweb data from instead of the network.")
flags.DEFINE_string("fineweb_revision", None,
                    "The datasets' revision (a commit or branch) to build from (default main, "
                    "recorded as its commit in the manifest).")
flags.DEFINE_string(
    "corpus_path", None, "The lab's flannel_model_corpus.txt (UTF-8); needs --tokenizer_path.")
flags.DEFINE_string(
    "tokenizer_path", None, "The lab's flannel_tokenizer_chars.json; needs --corpus_path.")
flags.DEFINE_string(
    "dead_mask_path", None,
    "The lab's live_dead_tokens.safetensors; checked against a recount of the corpus.")
flags.DEFINE_boolean(
    "double_shift_labels", None,
    "Score position i against token i+2, as the lab's GPT2 runs did by accident (thimble1 and "
    "thimble6 replay it); --nodouble_shift_labels trains true next-token prediction.")
flags.DEFINE_boolean(
    "verification", False,
    "Run the experiment's verification mode instead (thimble9: 1000 steps into "
    "<output_dir>/verification, W and loss compared bit for bit with --verify_against).")
flags.DEFINE_string(
    "verify_against", None,
    "Reference trajectory for --verification (thimble9: a thimble_8_trajectory.safetensors).")
flags.DEFINE_enum("rows", None, ["dead", "all"],
                  "Record the dead rows or every vocabulary row (the lab's Crucible 3/4).")
flags.DEFINE_list("probes", None,
                  "Override what each step records, e.g. W,h_mean,loss (jaxdt.probes.PROBES).")
flags.DEFINE_string(
    "analyze", None,
    "Analyse a run folder or .safetensors trajectory (ours or the lab's layout) instead of "
    "training: print the summary, write summary.json and PNGs beside it (or --analysis_dir).")
flags.DEFINE_string(
    "compare", None,
    "Compare two runs of one config, A,B (run folders or trajectory files): first differing "
    "step, identical bits per key, loss and freeze-statistics differences, both backends.")
flags.DEFINE_multi_string(
    "set", None,
    "Set any config field by its dotted path, e.g. --set model.hidden_dim=32 --set "
    "store.checkpoint_steps=0,10 (repeatable; applied after the named flags).")
flags.DEFINE_string(
    "sweep", None,
    "Run a family of runs in one process: the cartesian product of ';'-separated axes, e.g. "
    "'learning_rate=1e-3,3e-4;weight_decay=0,0.1'. Axes: any AdamW hyperparameter, seed, "
    "data_seed, precision. Each member is a run folder under --output_dir; the summary is "
    "sweep_summary.json there. Default: the experiment's own sweep, if it declares one.")
flags.DEFINE_enum(
    "sweep_mode", "exact", ["exact", "fast"],
    "exact: members one after another within a device, each byte-identical to its solo run; "
    "fast: members vmapped into wider kernels (other summation order, other bits).")
flags.DEFINE_integer(
    "sweep_devices", None,
    "Local devices a sweep group spreads over (default: all accelerators; one CPU device in "
    "exact mode, since CPU devices share the cores and change the kernels' work split).")
flags.DEFINE_boolean("single", False, "Run the experiment once even if it declares a sweep.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a sweep over several processes/hosts "
                    "(jax.distributed.initialize); with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process sweep.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process sweep.")
flags.DEFINE_list(
    "summarize", None,
    "Summarize finished runs: PATH[,PATH...], each a run folder or a sweep folder (all its "
    "members); prints one row of freeze figures per run and writes summary.json and "
    "frozen_fraction.png to --output_dir (default runs/summary).")
flags.DEFINE_list("group_by", None,
                  "With --summarize: also print each group's mean, sd, min and max; axes: "
                  "framework, seed, data_seed, precision, learning_rate, weight_decay, steps.")
flags.DEFINE_string("study", None, "Run a study declared in experiments/ (findings): each "
                    "missing member, resuming unfinished ones, skipping finished ones, then its "
                    "tables and PNGs (docs/findings.md).")
flags.DEFINE_string("study_plan", None,
                    "Print a study's members, which are done, and the time left on this host.")
flags.DEFINE_string("study_dir", None,
                    "Where a study's member run folders live (default runs/study_<name>).")
flags.DEFINE_string("study_docs", None,
                    "Where a study's member summaries, tables and PNGs go (default docs/<name>).")
flags.DEFINE_boolean("study_tables", False, "With --study: only (re)write the tables and "
                     "PNGs from the committed member summaries; run nothing.")
flags.DEFINE_boolean("study_sweep", False,
                     "Run a study's fresh jaxdt members of one structure together as one exact "
                     "sweep (one process and program; each member byte-identical to its solo run).")
flags.DEFINE_list("study_members", None,
                  "Run only these members of the study (default: all, in declared order).")
flags.DEFINE_enum("study_torch_device", "cpu", ["cpu", "cuda"], "Where a study's torch "
                  "members run (torchref.peer --device; jaxdt members run where JAX does).")
flags.DEFINE_string(
    "detect", None,
    "A finished jaxdt run folder: score Magikarp's weight-based detector against its dead set "
    "at --detect_steps (writes detect.json and detect.png into --analysis_dir, default the "
    "folder).")
flags.DEFINE_list("detect_steps", None,
                  "Steps for --detect (default 0,100,500,1000 and the run's last).")
flags.DEFINE_string("analysis_dir", None,
                    "Where --analyze writes summary.json and plots (and --compare compare.json).")


def data_config(base: config_lib.DataConfig) -> config_lib.DataConfig:
  """`base` with the data flags applied."""
  return dataclasses.replace(
      base, data_dir=FLAGS.data_dir, corpus_path=FLAGS.corpus_path,
      tokenizer_path=FLAGS.tokenizer_path, dead_mask_path=FLAGS.dead_mask_path,
      source=FLAGS.data_source or base.source)


def flannel_data() -> None:
  """Builds or validates the data and prints the lab's notebook counts."""
  cfg = config_lib.ExperimentConfig()
  cfg = dataclasses.replace(cfg, data=data_config(cfg.data))
  if cfg.data.source == "fineweb" and cfg.data.corpus_path is None:
    from jaxdt.data import lab_data  # pylint: disable=g-import-not-at-top
    built = lab_data.build(cfg.data.data_dir, mirror=FLAGS.fineweb_mirror,
                           revision=FLAGS.fineweb_revision,
                           log=lambda s: print(f"[fineweb] {s}", flush=True))
    print(f"{'built' if built.built else 'reused'} {built.directory}")
    print(lab_data.lab_comparison(built.manifest))
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, verbose=True)
  print(demographics.report(corpus, cfg.data))


# Named flags and the config field each one sets (every field also takes --set).
NAMED_FLAGS = {
    "steps": "steps", "seed": "seed", "precision": "precision",
    "init_checkpoint": "init_checkpoint", "batch_size": "data.batch_size",
    "seq_len": "data.seq_len", "double_shift_labels": "data.double_shift_labels",
    "learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
    "chunk_steps": "store.chunk_steps", "rows": "probes.rows", "probes": "probes.names",
    "gemm_operands": "model.gemm_operands",
}


def experiment_config(name: str) -> config_lib.ExperimentConfig:
  """The experiment's config with the data flags, the named flags, then --set applied."""
  cfg = experiments.load(name)
  cfg = dataclasses.replace(cfg, data=data_config(cfg.data))
  if FLAGS.probes is not None:
    probes_lib.check_names(FLAGS.probes)  # unknown names: a one-line error before any work
  for flag, path in NAMED_FLAGS.items():
    value = getattr(FLAGS, flag)
    if value is not None:
      cfg = config_lib.set_path(cfg, path, tuple(value) if flag == "probes" else value)
  for assignment in FLAGS.set or ():
    cfg = config_lib.override(cfg, assignment)
  if FLAGS.steps is not None:  # keep only the checkpoints inside the shortened run
    cfg = config_lib.with_steps(cfg, FLAGS.steps)
  return cfg


def print_analyses(result: loop.RunResult, cfg: config_lib.ExperimentConfig) -> None:
  """The lab's end-of-run printouts for what the run recorded."""
  reader = tensorfile.TrajectoryReader(result.trajectory)
  meta = result.metadata
  print(f"\nTraining complete. Final loss: {meta['final_loss']:.4f}")
  print(f"Completed {meta['total_epochs']} epochs\n")
  # Every analysis the file supports (the lab's FIMBULWINTER CHECK and
  # STILLNESS blocks first), plus summary.json and PNGs in the run folder.
  lab_validation = None
  if lab_accounting.has_accounting_inputs(reader):  # Thimble 1/6: the lab's accounting check
    lab_validation = lab_accounting.format_accounting(
        lab_accounting.accounting_rows(reader, cfg.optim))
  outputs.analyze(result.trajectory, header=False, lab_validation=lab_validation)
  print(f"\nSaved to {result.trajectory}")


def run_verification(name: str) -> int:
  """The experiment's verification mode; 0 when bitwise identical, 1 otherwise."""
  spec = experiments.verification(name)
  cfg = verify.verification_config(experiment_config(name), spec, FLAGS.steps)
  out_dir = os.path.join(FLAGS.output_dir or f"runs/{name}", spec.subdir)
  text, ok = verify.run(cfg, spec, FLAGS.verify_against, out_dir, resume=FLAGS.resume,
                        progress=FLAGS.progress)
  print(text)
  print(f"\n{spec.title} verification run kept in {out_dir}")
  return 0 if ok else 1


def run_sweep(name: str, cfg: config_lib.ExperimentConfig, spec: str) -> int:
  """--sweep (or the experiment's declared sweep): every member, then the summary."""
  out_root = FLAGS.output_dir or f"runs/{name}_sweep"
  opts = runs.Options(resume=FLAGS.resume, progress=FLAGS.progress,
                      exact=FLAGS.sweep_mode == "exact", devices=FLAGS.sweep_devices,
                      allow_host_change=FLAGS.allow_host_change)
  done = sweep.train_sweep(cfg, spec, out_root, opts)
  names = [m.name for m in sweep.members(cfg, spec)]
  if jax.process_index() != 0:
    print(f"process {jax.process_index()}: {len(done)} member(s) finished; process 0 writes "
          "the summary")
    return 0
  sweep_report.wait_for(out_root, names, cfg.store.trajectory_name)
  sweep_report.summarize(out_root, names, spec)
  return 0


def _distributed() -> None:
  """jax.distributed.initialize from the flags (all three, or none)."""
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if all(v is None for v in given):
    return
  if any(v is None for v in given):
    raise ValueError("a multi-process sweep needs --coordinator_address, --num_processes and "
                     "--process_id together")
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def run_experiment(name: str) -> int:
  if FLAGS.verification:
    return run_verification(name)
  if FLAGS.verify_against:
    raise ValueError("--verify_against needs --verification")
  cfg = experiment_config(name)
  spec = FLAGS.sweep if FLAGS.sweep is not None else ("" if FLAGS.single else cfg.sweep)
  if spec:
    _distributed()
    return run_sweep(name, cfg, spec)
  out_dir = FLAGS.output_dir or f"runs/{name}"
  result = loop.train(cfg, out_dir, resume=FLAGS.resume, progress=FLAGS.progress,
                      allow_host_change=FLAGS.allow_host_change)
  try:
    print_analyses(result, cfg)
  except OSError as e:  # the run itself is finished and intact
    raise ValueError(f"the run in {out_dir} finished, but its analysis failed "
                     f"({disk.os_error_message(e).split(';')[0]}); fix that and see it with "
                     f"--analyze={out_dir}") from None
  return 0


def analyze_or_compare() -> int:
  """--analyze / --compare / --summarize: from stored files only, no training."""
  given = [n for n in ("experiment", "analyze", "compare", "summarize") if getattr(FLAGS, n)]
  if len(given) > 1:
    raise ValueError(f"pass one of --experiment, --analyze, --compare, --summarize (got "
                     f"{', '.join('--' + n for n in given)})")
  if FLAGS.group_by and not FLAGS.summarize:
    raise ValueError("--group_by needs --summarize")
  if FLAGS.summarize:
    summary_lib.summarize(FLAGS.summarize, FLAGS.output_dir or "runs/summary",
                          FLAGS.group_by or ())
    return 0
  if FLAGS.analyze:
    outputs.analyze(FLAGS.analyze, FLAGS.analysis_dir)
    return 0
  paths = FLAGS.compare.split(",")
  if len(paths) != 2 or not all(paths):
    raise ValueError(f"--compare takes two paths A,B separated by a comma, got {FLAGS.compare!r}")
  outputs.compare(paths[0], paths[1], FLAGS.analysis_dir)
  return 0


EXPERIMENTS = {"flannel_data": flannel_data}


def print_fingerprint() -> int:
  """--fingerprint: this host's arithmetic fingerprint, alone (any other flag is refused)."""
  others = sorted(f.name for f in FLAGS.get_flags_for_module(sys.modules[__name__])
                  if f.present and f.name != "fingerprint")
  if others:
    raise ValueError(f"--fingerprint takes no other flag (got --{', --'.join(others)}); run "
                     "python run.py --fingerprint alone")
  from jaxdt.training import fingerprint as fingerprint_lib  # pylint: disable=g-import-not-at-top
  print(fingerprint_lib.describe())
  return 0


def run_study() -> int:
  """--study / --study_plan: a study's members and its tables (jaxdt.study)."""
  from jaxdt import study as study_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.study and FLAGS.study_plan:
    raise ValueError("pass one of --study and --study_plan")
  if FLAGS.experiment or FLAGS.output_dir:
    raise ValueError("--study takes no --experiment or --output_dir; members run into "
                     "--study_dir/<member>")
  name = FLAGS.study or FLAGS.study_plan
  study = dataclasses.replace(study_lib.load(name), torch_device=FLAGS.study_torch_device)
  study_dir = FLAGS.study_dir or f"runs/study_{name}"
  docs = FLAGS.study_docs or os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs",
                                          name)
  if FLAGS.study_plan:
    print(study_lib.plan(study, study_dir, docs))
    return 0
  if FLAGS.study_tables:
    from jaxdt.report import findings as findings_lib  # pylint: disable=g-import-not-at-top
    findings_lib.write_tables(study, docs)
    return 0
  study_lib.run(study, study_dir, docs, only=tuple(FLAGS.study_members or ()),
                data_dir=FLAGS.data_dir, sweep=FLAGS.study_sweep)
  return 0


def run_detect() -> int:
  """--detect=RUN: the dead set from the weights alone, scored (jaxdt.detection)."""
  from jaxdt import detection  # pylint: disable=g-import-not-at-top
  if FLAGS.experiment or FLAGS.output_dir:
    raise ValueError("--detect takes no --experiment or --output_dir; its files go into "
                     "--analysis_dir (default: the run folder)")
  try:
    steps = [int(s) for s in FLAGS.detect_steps or ()]
  except ValueError:
    raise ValueError(f"--detect_steps takes step numbers, got {FLAGS.detect_steps}") from None
  detection.detect(FLAGS.detect, FLAGS.analysis_dir, steps)
  return 0


def _dispatch() -> int:
  if FLAGS.fingerprint:
    return print_fingerprint()
  if FLAGS.detect:
    return run_detect()
  if FLAGS.study or FLAGS.study_plan:
    return run_study()
  if FLAGS.analyze or FLAGS.compare or FLAGS.summarize or FLAGS.group_by:
    return analyze_or_compare()
  name = FLAGS.experiment
  known = sorted(EXPERIMENTS) + list(experiments.NAMES)
  if name is None:
    raise ValueError(f"--experiment is required; pass --experiment=one of {known} (or "
                     "--analyze=PATH, --compare=A,B)")
  if name not in known:
    raise ValueError(f"unknown experiment {name!r}; use --experiment=one of {known}")
  if name in EXPERIMENTS:
    EXPERIMENTS[name]()
    return 0
  return 1 if run_experiment(name) else 0  # 1: a failed verification


def _exit_now(line: str, status: int) -> None:
  """Prints one line and leaves at once: a chunk may still be running on the
  XLA threads (dispatched before the signal came), and tearing the interpreter
  down under it crashes; the run folder is crash-safe, so nothing is lost."""
  print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def main(argv: list[str]) -> int:
  """Every failure ends in one line on stderr: bad input or OS errors exit 2,
  SIGINT/SIGTERM 130/143 (the run folder left resumable), a failed
  verification 1."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  signals.raise_on_signals()
  try:
    backend.configure()  # XLA_FLAGS, before anything starts JAX's backend
    backend.quiet_backend_probe()
    status = _dispatch()
    sys.stdout.flush()  # here, not at exit: a closed pipe is then reported below
    return status
  except signals.Interrupted as e:
    _exit_now(str(e), signals.exit_status(e.signum))
  except KeyboardInterrupt as e:
    _exit_now("interrupted", signals.exit_status(getattr(e, "signum", signal.SIGINT)))
  except (vocabulary.DataError, disk.StoreError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except BrokenPipeError:  # stdout's reader left (`| head`): not the run folder's fault
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    print("error: the output pipe closed before the report was printed (e.g. | head); files "
          "are written atomically, none half-written; redirect to a file", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {disk.os_error_message(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
