"""Crucible 1, side by side: the lab's PyTorch loop against jaxdt, same config, data and machine.

    python benchmarks/crucible1_bench.py [--size=all|full|small|tiny] [--steps=N]

For each size it runs, each in its own process (allocator settings must be in
the environment before a process starts, and JAX's and torch's thread pools
must not share one):
  * torch, default allocator: benchmarks/torch_crucible1.py, a port of the
    lab's loop (its Crucible 1 notebook) with its per-step capture;
  * torch, tuned allocator: the same with MALLOC_MMAP_MAX_=0 and a huge
    MALLOC_TRIM_THRESHOLD_, so glibc keeps the logits-sized temporaries
    instead of returning them to the kernel every step (the honest bar);
  * jaxdt: benchmarks/jax_crucible1.py, `loop.train` on the experiment's own
    config (all probes, streaming to disk, checkpoints off), timed between its
    per-chunk progress updates: steady state, compile reported apart.
It also measures the machine's GEMM ceilings (torch and XLA, f32 and bf16,
square matrices, all threads) and prints steps/s, achieved GFLOP/s (nominal
FLOPs of the lab's step, the same count for both sides), ratios and peak RSS.
The last two lines, for the largest size run: `ratio_vs_tuned_torch=<x>` (jaxdt's
steps/s over the tuned torch loop's) and `gemm_ceiling_fraction=<y>` (jaxdt's
achieved GFLOP/s over the best square-GEMM ceiling XLA reached in the same run,
f32 or bf16). The GEMM path jaxdt took (`gemm_path`) is printed beside it.

Both sides read the same token ids: the embedded default corpus (or
--corpus_path/--tokenizer_path), tokenised by jaxdt.data.corpus; sizes below the
tokenizer's vocabulary use the same BPE cut to its first `vocab` ids (the
alphabet and the earliest merges), so the text and the tokenizer are the same.
Nothing here is a test; tests/benchmark_smoke_test.py runs --size=tiny.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from jaxdt import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from benchdata import SIZES, Size, prepare_data  # noqa: E402  pylint: disable=g-import-not-at-top

TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
ALLOCATOR_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


GPU_JAX_STEPS = {"full": 5000, "small": 5000, "tiny": 200}  # the full 5000-step run

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "all", ["all", *SIZES], "all = small then full")
flags.DEFINE_integer("steps", None, "jaxdt steps (rounded up to whole chunks; default per size)")
flags.DEFINE_integer("chunk", None, "jaxdt chunk_steps (default per size)")
flags.DEFINE_integer("jax_repeats", None,
                     "jaxdt processes per size (default: 3 at small size, else 1)")
flags.DEFINE_integer("torch_steps", None, "torch steps at most")
flags.DEFINE_float("torch_seconds", None,
                   "stop a torch run once its timed steps took this long (default per size)")
flags.DEFINE_enum("torch", "both", ["both", "default", "tuned", "none"],
                  "which torch allocator variants to run")
flags.DEFINE_bool("torch_f32", False,
                  "also time the torch loop in f32 (tuned allocator), a reference only")
flags.DEFINE_enum("gemm_operands", "auto", ["auto", "float32", "bfloat16"], None)
flags.DEFINE_integer("rss_steps", 0,
                     "also a long jaxdt run of this many steps at the largest size, for RSS")
flags.DEFINE_bool("no_main", False,
                  "skip the side-by-side runs (with --rss_steps: only the RSS run)")
flags.DEFINE_string("rss_experiment", "crucible1", "experiment of the RSS run")
flags.DEFINE_integer("rss_stop_after", None,
                     "stop the RSS run after this many of its --rss_steps steps")
flags.DEFINE_float("ceiling_seconds", 20.0, "time budget per GEMM probe")
flags.DEFINE_string("corpus_path", None, None)
flags.DEFINE_string("tokenizer_path", None, None)
flags.DEFINE_string("data_dir", None, None)
flags.DEFINE_string("work_dir", None, "keep inputs and run folders here")
flags.DEFINE_string("json", None, "write every raw result to this file")


def nominal_flops(s: Size, layers: int = 2) -> float:
  """FLOPs of one step of the lab's loop (forward + backward = 3x forward), as torch does it.

  Per token and layer: QKV 6D^2, out projection 2D^2, FFN 16D^2, scores and
  values 4TD (full T x T, as the count for the unmasked product); logits 2DV
  for all T positions (the lab's loop computes the last and drops it).
  """
  per_token = layers * (24 * s.hidden ** 2 + 4 * s.seq * s.hidden) + 2 * s.hidden * s.vocab
  return 3.0 * s.batch * s.seq * per_token


# --- Machine -----------------------------------------------------------------


def cpu_info() -> dict:
  info = {"model": platform.processor() or platform.machine(), "flags": set()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and info["model"] in ("", platform.machine()):
          info["model"] = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not info["flags"]:
          info["flags"] = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  keys = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
  info["isa"] = {k: k in info["flags"] for k in keys}
  del info["flags"]
  info["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return info


def loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


CEILING_CODE = r"""
import json, sys, time
budget, framework = float(sys.argv[1]), sys.argv[2]
out = {}
def run(name, make, mm, sync, top):
  # Doubles n from 256 until one product takes > 0.25 s (or n = top, or the budget
  # would run out); best of 3 at that n.
  n = 256
  while True:
    a, b = make(n)
    sync(mm(a, b))
    t = time.perf_counter(); sync(mm(a, b)); dt = time.perf_counter() - t
    if dt > 0.25 or n >= top or dt * 8 * 4 > budget:
      best = dt
      for _ in range(2 if dt < budget / 4 else 0):
        t = time.perf_counter(); sync(mm(a, b)); best = min(best, time.perf_counter() - t)
      out[name] = {"gflops": 2 * n ** 3 / best / 1e9, "n": n}
      return
    n *= 2
if framework == "torch":
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = (lambda x: torch.cuda.synchronize()) if dev == "cuda" else (lambda x: None)
  for dt in ("float32", "bfloat16"):
    run(f"torch {dt}", lambda n, dt=dt: (torch.randn(n, n, device=dev).to(getattr(torch, dt)),
                                       torch.randn(n, n, device=dev).to(getattr(torch, dt))),
        torch.matmul, sync, top=16384 if dev == "cuda" else 4096)
  out["torch_threads"] = torch.get_num_threads()
else:
  from jaxdt.numerics import backend
  backend.configure()
  import jax, jax.numpy as jnp
  f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
  for dt in ("float32", "bfloat16"):
    run(f"xla {dt}", lambda n, dt=dt: (jnp.ones((n, n), dt), jnp.ones((n, n), dt)), f,
        lambda x: x.block_until_ready(), top=16384 if jax.default_backend() == "gpu" else 4096)
  out["xla_device"] = jax.devices()[0].device_kind
print(json.dumps(out))
"""


def ceilings(budget: float) -> dict:
  """GEMM ceilings of this machine: torch (MKL/oneDNN) and XLA, f32 and bf16."""
  res = {}
  for framework in ("torch", "xla"):
    out = _run([sys.executable, "-c", CEILING_CODE, str(budget), framework, ROOT],
               env=_clean_env(), label=f"{framework} ceiling")
    if out is not None:
      res.update(out)
  return res


# --- Data --------------------------------------------------------------------


# --- Children ----------------------------------------------------------------


def _clean_env(extra=None) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
  env.update(extra or {})
  return env


def _run(cmd, env, label, timeout=None):
  """Runs a child that prints one JSON line last; None (and its stderr) on failure."""
  t = time.perf_counter()
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
  if p.returncode != 0 or not lines:
    sys.stderr.write(f"[{label}] failed (exit {p.returncode}):\n{p.stderr[-3000:]}\n")
    return None
  out = json.loads(lines[-1])
  out["process_s"] = time.perf_counter() - t
  return out


def run_torch(s: Size, paths: dict, tuned: bool, args, dtype: str = "bfloat16") -> dict:
  cmd = [sys.executable, os.path.join(HERE, "torch_crucible1.py"), f"--tokens={paths['tokens']}",
         f"--dead_mask={paths['dead']}", f"--vocab={s.vocab}", f"--hidden={s.hidden}",
         f"--batch={s.batch}", f"--seq={s.seq}",
         f"--steps={args.torch_steps or s.torch_steps}", f"--warmup={s.torch_warmup}",
         f"--max_seconds={args.torch_seconds if args.torch_seconds is not None else s.torch_seconds}",
         f"--dtype={dtype}"]
  return _run(cmd, _clean_env(TUNED_MALLOC if tuned else None),
              f"torch {'tuned' if tuned else 'default'} {dtype} {s.name}")


def run_jax(s: Size, paths: dict, args, out_dir: str, steps: int, chunk: int,
            experiment: str = "crucible1", stop_after=None, checkpoints=False) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "jax_crucible1.py"), f"--experiment={experiment}",
         f"--corpus_path={paths['corpus']}", f"--tokenizer_path={paths['tokenizer']}",
         f"--vocab={s.vocab}", f"--hidden={s.hidden}", f"--batch={s.batch}", f"--seq={s.seq}",
         f"--steps={steps}", f"--chunk={chunk}", f"--out_dir={out_dir}",
         f"--gemm_operands={args.gemm_operands}"]
  if stop_after:
    cmd.append(f"--stop_after={stop_after}")
  if checkpoints:
    cmd.append("--checkpoints")
  return _run(cmd, _clean_env(), f"jaxdt {experiment} {s.name}")


def gpu_present() -> bool:
  try:
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


# --- Report ------------------------------------------------------------------


def gb(x) -> str:
  return "n/a" if x is None else f"{x / 1e9:.2f} GB"


def fmt_rate(r) -> str:
  return "n/a" if r is None else (f"{r:.3f}" if r < 10 else f"{r:.1f}")


def ratio(a, b):
  return None if not a or not b else a["steps_per_s"] / b["steps_per_s"]


def report(s: Size, res: dict, paths: dict) -> list:
  flops = nominal_flops(s)
  lines = [f"== size={s.name}: vocab {s.vocab}, hidden {s.hidden}, batch {s.batch}, seq {s.seq}; "
           f"{paths['n_tokens']:,} tokens, {paths['n_dead']} dead; "
           f"nominal {flops / 1e9:.2f} GFLOP/step",
           f"{'side':28s} {'steps':>6s} {'steps/s':>9s} {'GFLOP/s':>8s} {'first step':>11s} "
           f"{'compile':>8s} {'peak RSS':>9s}"]
  for key, label in (("torch_default", "torch, default allocator"),
                     ("torch_tuned", "torch, tuned allocator"), ("jaxdt", "jaxdt train.train"),
                     ("torch_f32", "(torch f32, tuned; not seed)")):
    r = res.get(key)
    if r is None and key == "torch_f32":
      continue
    if r is None:
      lines.append(f"{label:28s} (not run or failed)")
      continue
    first = r.get("first_step_s", r.get("first_chunk_s"))
    comp = r.get("compile_s")
    lines.append(f"{label:28s} {r['steps']:>6d} {fmt_rate(r['steps_per_s']):>9s} "
                 f"{r['steps_per_s'] * flops / 1e9:>8.1f} {first:>10.1f}s "
                 f"{'' if comp is None else f'{comp:.1f}s':>8s} {gb(r['peak_rss']):>9s}")
  j = res.get("jaxdt")
  rd, rt = ratio(j, res.get("torch_default")), ratio(j, res.get("torch_tuned"))
  lines.append(f"ratio jaxdt / torch default = {'n/a' if rd is None else f'{rd:.2f}x'}; "
               f"jaxdt / torch tuned = {'n/a' if rt is None else f'{rt:.2f}x'}")
  if res.get("torch_f32"):
    rf = ratio(j, res["torch_f32"])
    lines.append(f"(reference only: jaxdt / torch f32 = {'n/a' if rf is None else f'{rf:.2f}x'}; "
                 "the lab's loop is bf16, this shows torch's f32 kernels on this machine)")
  if j:
    lines.append(f"jaxdt: {j['device']} ({j['device_kind']}), GEMM operands {j['gemm_operands']}, "
                 f"chunk {j['chunk']}, wall {j['wall_s']:.1f}s incl. setup+compile, "
                 f"file {gb(j['trajectory_bytes'])}")
    procs = res.get("jaxdt_processes", [])
    lines.append("jaxdt per process (steps/s, cores busy, context switches/step vol/invol): "
                 + "; ".join(f"{r['steps_per_s']:.3g}, {r['cores_busy']:.2f}, "
                             f"{r['csw_per_step'][0]:.0f}/{r['csw_per_step'][1]:.1f}"
                             for r in procs if r.get("cores_busy") is not None)
                 + (f" (median of {len(procs)} processes)" if len(procs) > 1 else ""))
    lines.append("jaxdt RSS vs steps: " + ", ".join(
        f"{d}: {r / 1e9:.2f}/{pk / 1e9:.2f}" for _, d, r, pk in j["marks"]) + " GB (now/peak)")
  for key in ("torch_default", "torch_tuned"):
    r = res.get(key)
    if r:
      lines.append(f"{key} RSS vs steps: " + ", ".join(
          f"{d}: {x / 1e9:.2f}/{pk / 1e9:.2f}" for d, x, pk in r["rss_marks"]) + " GB (now/peak)")
  return lines




def main(argv):
  if len(argv) > 1:
    _usage_error(f"unexpected arguments {argv[1:]}")
  if (FLAGS.corpus_path is None) != (FLAGS.tokenizer_path is None):
    _usage_error("--corpus_path and --tokenizer_path go together")

  sizes = ["small", "full"] if FLAGS.size == "all" else [FLAGS.size]
  work = FLAGS.work_dir or tempfile.mkdtemp(prefix="jaxdt-bench-")
  os.makedirs(work, exist_ok=True)
  gpu = gpu_present()
  cpu = cpu_info()
  print(f"machine: {cpu['model']}, {cpu['cpus']} CPUs, "
        + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["isa"].items())
        + f", GPU: {'yes' if gpu else 'none'}; python {platform.python_version()}")
  print(f"load average at start: {loadavg()}", flush=True)
  ceil = ceilings(FLAGS.ceiling_seconds if sizes != ["tiny"] else 2.0)
  print("GEMM ceilings (square, all threads): " + ", ".join(
      f"{k} {v['gflops']:.1f} GFLOP/s (n={v['n']})" for k, v in ceil.items()
      if isinstance(v, dict)), flush=True)
  raw = {"machine": cpu, "gpu": gpu, "ceilings": ceil, "sizes": {}}
  last_ratio = last_fraction = None
  for name in ([] if FLAGS.no_main else sizes):
    s = SIZES[name]
    paths = prepare_data(s, FLAGS, work)
    chunk = FLAGS.chunk or s.jax_chunk
    steps = FLAGS.steps or (GPU_JAX_STEPS[name] if gpu else s.jax_steps)
    steps = max(-(-steps // chunk), 3) * chunk  # whole chunks, at least 3
    res = {}
    if FLAGS.torch in ("both", "default"):
      res["torch_default"] = run_torch(s, paths, False, FLAGS)
    if FLAGS.torch in ("both", "tuned"):
      res["torch_tuned"] = run_torch(s, paths, True, FLAGS)
    if FLAGS.torch_f32:
      res["torch_f32"] = run_torch(s, paths, True, FLAGS, "float32")
    runs = []
    for i in range(FLAGS.jax_repeats or s.jax_repeats):
      out_dir = os.path.join(work, f"run_{name}_{i}_{int(time.time())}")
      runs.append(run_jax(s, paths, FLAGS, out_dir, steps, chunk))
      _cleanup(out_dir)
    # The median process stands for jaxdt (None if all failed); every process is printed.
    runs = [r for r in runs if r]
    by_rate = sorted(runs, key=lambda r: r["steps_per_s"])
    res["jaxdt"] = by_rate[(len(runs) - 1) // 2] if runs else None
    res["jaxdt_processes"] = runs
    for line in report(s, res, paths):
      print(line)
    sys.stdout.flush()
    raw["sizes"][name] = {"size": dataclasses.asdict(s), "paths": paths, "results": res,
                          "nominal_flops": nominal_flops(s)}
    last_ratio = ratio(res.get("jaxdt"), res.get("torch_tuned"))
    j = res.get("jaxdt")
    last_fraction = ceiling_fraction(j and j["steps_per_s"] * nominal_flops(s) / 1e9, ceil)
  if FLAGS.rss_steps:
    s = SIZES[sizes[-1]]
    paths = prepare_data(s, FLAGS, work)
    out_dir = os.path.join(work, f"rss_{FLAGS.rss_experiment}_{int(time.time())}")
    r = run_jax(s, paths, FLAGS, out_dir, FLAGS.rss_steps, FLAGS.chunk or s.jax_chunk,
                FLAGS.rss_experiment, FLAGS.rss_stop_after, checkpoints=True)
    if r:
      print(f"== RSS run: {FLAGS.rss_experiment} (its checkpoints on), size={s.name}, "
            f"{FLAGS.rss_steps} steps"
            f"{'' if not FLAGS.rss_stop_after else f' (stopped after {FLAGS.rss_stop_after})'}, "
            f"{fmt_rate(r['steps_per_s'])} steps/s, peak RSS {gb(r['peak_rss'])}")
      for _, d, now, pk in r["marks"]:
        print(f"  step {d:>6d}: RSS {now / 1e9:.3f} GB, peak {pk / 1e9:.3f} GB")
    raw["rss_run"] = r
    _cleanup(out_dir)
  print(f"load average at end: {loadavg()}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(raw, f, indent=1)
  print(f"ratio_vs_tuned_torch={'nan' if last_ratio is None else f'{last_ratio:.3f}'}")
  print(f"gemm_ceiling_fraction={'nan' if last_fraction is None else f'{last_fraction:.3f}'}")


def _usage_error(message: str) -> None:
  """A bad flag combination: one line on stderr, exit status 2 (as run.py)."""
  print(f"error: {message}; see --helpfull", file=sys.stderr)
  sys.exit(2)


def ceiling_fraction(jaxdt_gflops: Optional[float], ceil: dict) -> Optional[float]:
  """jaxdt's achieved GFLOP/s over the best GEMM ceiling XLA reached here (f32 or bf16)."""
  best = max((v["gflops"] for k, v in ceil.items()
              if k.startswith("xla") and isinstance(v, dict)), default=None)
  return None if not jaxdt_gflops or not best else jaxdt_gflops / best


def _cleanup(out_dir: str) -> None:
  """Deletes a run folder (the trajectory can be GBs)."""
  shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
