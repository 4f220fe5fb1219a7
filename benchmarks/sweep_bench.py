"""N members as one sweep against the same N runs one after another as solo processes.

    python benchmarks/sweep_bench.py [--size=small|full|tiny] [--members=4] [--steps=N]

Both sides are `python run.py --experiment=crucible1` at the size's shape
(vocabulary cut as in crucible1_bench, all Crucible 1 probes, trajectories
streamed to disk, the end-of-run analyses included), members differing by
seed: the solo side runs `--seed=i` N times in a row, the sweep side once with
`--sweep=seed=1,...,N` (exact mode: each member byte-identical to its solo
run, which the benchmark checks by sha256) over `--devices` CPU devices
(`--xla_force_host_platform_device_count`; default 1, which keeps members exact at every
size: two CPU devices share the cores and change the kernels' work split). Wall time is
per whole process (start-up, data, compile, training, analyses), so the
speedup counts what one compiled program saves. Prints member-steps/s both
ways and ends with `sweep_speedup=<x>`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from jaxdt import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from benchdata import SIZES, prepare_data  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "small", ["small", "full", "tiny"], "benchmark shape (crucible1_bench's)")
flags.DEFINE_integer("members", 4, "sweep members (seeds 1..N)")
flags.DEFINE_integer("steps", None, "steps per member (default: 300 small, 30 full, 40 tiny)")
flags.DEFINE_integer("devices", 1, "CPU devices of the sweep process (1: exact on every size; "
                     "more run members side by side, exact only at small sizes)")
flags.DEFINE_string("data_dir", None, "the embedded default data's cache folder")
flags.DEFINE_string("corpus_path", None, None)
flags.DEFINE_string("tokenizer_path", None, None)
flags.DEFINE_string("work_dir", None, "keep inputs and run folders here")

DEFAULT_STEPS = {"small": 300, "full": 30, "tiny": 40}


def cpu_line() -> str:
  model, have = "?", set()
  with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.startswith("model name") and model == "?":
        model = line.split(":", 1)[1].strip()
      elif line.startswith("flags") and not have:
        have = set(line.split(":", 1)[1].split())
  isa = " ".join(f"{k}={'yes' if k in have else 'no'}"
                 for k in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))
  return f"machine: {model}, {os.cpu_count()} CPUs, {isa}"


def _run(args: list[str], env: dict) -> float:
  t = time.perf_counter()
  p = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  if p.returncode != 0:
    raise SystemExit(f"run.py {' '.join(args)} failed (exit {p.returncode}): "
                     f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
  return time.perf_counter() - t


def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; see --helpfull", file=sys.stderr)
    sys.exit(2)
  s = SIZES[FLAGS.size]
  steps = FLAGS.steps or DEFAULT_STEPS[FLAGS.size]
  n, devices = FLAGS.members, FLAGS.devices
  work = FLAGS.work_dir or tempfile.mkdtemp(prefix="jaxdt-sweep-bench-")
  os.makedirs(work, exist_ok=True)
  print(cpu_line())
  paths = prepare_data(s, FLAGS, work)
  common = ["--experiment=crucible1", f"--steps={steps}", f"--batch_size={s.batch}",
            f"--seq_len={s.seq}", f"--set=model.vocab_size={s.vocab}",
            f"--set=model.hidden_dim={s.hidden}", f"--set=model.max_seq_len={s.seq}",
            f"--corpus_path={paths['corpus']}", f"--tokenizer_path={paths['tokenizer']}",
            "--set=store.checkpoint_steps=", "--noprogress"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  print(f"size={s.name}: vocab {s.vocab}, hidden {s.hidden}, batch {s.batch}, seq {s.seq}; "
        f"{n} members x {steps} steps; sweep on {devices} CPU device(s)", flush=True)
  solo_s, solo_sha = 0.0, {}
  for i in range(1, n + 1):
    out = os.path.join(work, f"solo_{i}")
    solo_s += _run(common + [f"--seed={i}", f"--output_dir={out}"], env)
    solo_sha[i] = _sha(os.path.join(out, "crucible_1_trajectory.safetensors"))
  print(f"solo: {n} processes one after another, {solo_s:.1f} s, "
        f"{n * steps / solo_s:.2f} member-steps/s", flush=True)
  out = os.path.join(work, "sweep")
  sweep_env = {**env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()}
  sweep_s = _run(common + [f"--sweep=seed={','.join(str(i) for i in range(1, n + 1))}",
                           f"--output_dir={out}", f"--sweep_devices={devices}"], sweep_env)
  names = sorted(d for d in os.listdir(out) if d.startswith("m"))
  same = [_sha(os.path.join(out, d, "crucible_1_trajectory.safetensors")) == solo_sha[i + 1]
          for i, d in enumerate(names)]
  print(f"sweep: one process, {sweep_s:.1f} s, {n * steps / sweep_s:.2f} member-steps/s; "
        f"members byte-identical to their solo runs: {sum(same)}/{len(same)}")
  print(f"sweep_speedup={solo_s / sweep_s:.3f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
