"""Twins from one start: how fast torch parts from itself, from its f32 route, and from jaxdt.

`python -m torchref.twins --steps=100 --root=DIR` runs, each into DIR/<name>
(resumable; a finished folder is reused):
  jax       jaxdt, Crucible 1 at full size, seed 42, recording the dead rows' g, m, v, W bits;
  native2   the lab's torch loop from jax's init on jax's batches, native bf16, 2 threads;
  native1   the same at 1 thread: torch against itself, the baseline;
  f32       the same on the f32-GEMM route (`torchref.gemm`), 2 threads.
Then, per step, the divergence (`jaxdt.analysis.divergence.state_divergence`) of the
dead rows' g, m, v and W of native1, f32 and jax from native2, and writes twins.json
and twins.png into --out. A departure faster than native1's is one the threads do
not explain; the first step and tensor where it shows name where to look.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from absl import app
from absl import flags

from jaxdt import cli
from jaxdt.analysis import divergence as divergence_lib
from jaxdt.io import metadata as metadata_lib
from jaxdt.numerics import backend
from jaxdt.report import outputs
from jaxdt.report import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAJECTORY = "crucible_1_trajectory.safetensors"
BASE = "native2"
# name -> the torch peer's flags beside the twin's sources (jax is run.py)
TORCH = {"native2": ("--gemm=native", "--threads=2"), "native1": ("--gemm=native", "--threads=1"),
         "f32": ("--gemm=f32", "--threads=2")}
ROLES = ("gradient", "momentum", "variance", "weights")

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("steps", 100, "steps of every twin")
  flags.DEFINE_integer("seed", 42, "jaxdt's seed (the init and batches every twin starts from)")
  flags.DEFINE_string("root", None, "where the four run folders go (outside the repo)")
  flags.DEFINE_string("out", None, "where twins.json and twins.png go (default: --root)")
  flags.DEFINE_string("data_dir", None, "jaxdt's data cache (the embedded default data)")
  flags.DEFINE_string("corpus_path", None, "another model corpus (with --tokenizer_path)")
  flags.DEFINE_string("tokenizer_path", None, "its tokenizer json")
  flags.DEFINE_string("dead_mask_path", None, "its dead mask (jaxdt's run)")
  flags.DEFINE_multi_string("set", None, "config assignments for the jaxdt run (the torch twins "
                            "take its config); tests shrink the model with them")


def commands(root: str, steps: int, seed: int, data: dict, sets=()) -> dict:
  """{name: argv} of the four runs (jax first: the others start from it). `data`: the data
  flags (data_dir, corpus_path, tokenizer_path, dead_mask_path) given; `sets`: --set
  assignments of the jaxdt run."""
  flags_of = lambda names: [f"--{k}={data[k]}" for k in names if data.get(k)]
  data_flags = flags_of(("data_dir", "corpus_path", "tokenizer_path"))
  jax_dir = os.path.join(root, "jax")
  out = {"jax": [sys.executable, "run.py", "--experiment=crucible1", f"--steps={steps}",
                 f"--seed={seed}", "--probes=W,grad_W_bits,momentum_W_bits,variance_W_bits,loss",
                 f"--output_dir={jax_dir}", "--noprogress", *data_flags,
                 *flags_of(("dead_mask_path",)), *(f"--set={a}" for a in sets)]}
  data = data_flags
  for name, extra in TORCH.items():
    out[name] = [sys.executable, "-m", "torchref.peer", f"--output_dir={os.path.join(root, name)}",
                 f"--init_from={jax_dir}", f"--batches_from={jax_dir}", "--probes=twin",
                 "--checkpoint_every=0", *extra] + data
  return out


def run_all(root: str, argvs: dict, log=print) -> None:
  for name, argv in argvs.items():
    folder = os.path.join(root, name)
    if os.path.isdir(folder) and metadata_lib.is_complete(folder, TRAJECTORY):
      log(f"{name}: finished ({folder})")
      continue
    resume = ["--resume"] if os.path.isdir(folder) and os.listdir(folder) else []
    log(f"{name}: {' '.join(argv[1:] + resume)}")
    done = subprocess.run(argv + resume, cwd=ROOT, check=False)
    if done.returncode:
      raise ValueError(f"twin {name} exited with status {done.returncode} (its message is "
                       "above); fix that and rerun (it resumes)")


def compare(root: str) -> dict:
  """{name: {role: Divergence}} of every twin against BASE."""
  base = os.path.join(root, BASE)
  return {name: divergence_lib.state_divergence(base, os.path.join(root, name), ROLES)
          for name in ("native1", "f32", "jax")}


def report(root: str, divs: dict) -> dict:
  """twins.json's content: per twin and tensor, the first differing step, the per-step
  equal fraction and relative distance, and the ratio to the baseline (native1) per step."""
  base = divs["native1"]
  out = {"base": BASE, "baseline": "native1", "root": os.path.abspath(root),
         "cpu": backend.cpu_description(), "twins": {}}
  for name, by_role in divs.items():
    entry = {}
    for role, d in by_role.items():
      with np.errstate(divide="ignore", invalid="ignore"):
        ratio = d.relative_distance / base[role].relative_distance
      finite = ratio[np.isfinite(ratio)]
      entry[role] = {**d.to_json(),
                     "ratio_to_baseline": [None if not np.isfinite(x) else float(x) for x in ratio],
                     "median_ratio_to_baseline": float(np.median(finite)) if finite.size else None,
                     "final_ratio_to_baseline": float(ratio[-1]) if np.isfinite(ratio[-1]) else None}
    out["twins"][name] = entry
  return out


def plot(result: dict, path: str):
  try:
    plt = plots._pyplot()  # pylint: disable=protected-access
  except ImportError:
    return None
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
  for ax, role, label in zip(axes, ROLES, ("g (gradient)", "m (exp_avg)", "v (exp_avg_sq)",
                                           "W")):
    for name, entry in result["twins"].items():
      rel = np.array([np.nan if x is None else x for x in entry[role]["relative_distance"]])
      ax.semilogy(np.arange(rel.size), rel, lw=0.9, label=f"{name} vs {BASE}")
    ax.set(xlabel="step", title=f"dead rows' {label}",
           ylabel="‖A − B‖ / ‖A − A₀‖" if role == "weights" else "‖A − B‖ / ‖A‖")
  axes[0].legend(fontsize=8)
  return plots.save_png(fig, path)


def _print(result: dict, log=print) -> None:
  log(f"divergence from {BASE} (relative distance at steps; ratio to native1 at the end):")
  for name, entry in result["twins"].items():
    for role in ROLES:
      e = entry[role]
      at = ", ".join(f"{s['step']}: {s['relative_distance']:.3g}" for s in e["samples"]
                     if s["relative_distance"] == s["relative_distance"])
      log(f"  {name:<8} {role:<9} first differing step {e['first_differing_step']}; {at}; "
          f"final ratio {e['final_ratio_to_baseline']}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.root:
    print("error: --root is required (a folder outside the repo for the four runs)",
          file=sys.stderr)
    return 2
  root = os.path.abspath(FLAGS.root)
  try:
    data = {k: getattr(FLAGS, k) for k in ("data_dir", "corpus_path", "tokenizer_path",
                                           "dead_mask_path")}
    run_all(root, commands(root, FLAGS.steps, FLAGS.seed, data, FLAGS.set or ()))
    result = report(root, compare(root))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = FLAGS.out or root
  os.makedirs(out, exist_ok=True)
  outputs.write_json(os.path.join(out, "twins.json"), result)
  plot(result, os.path.join(out, "twins.png"))
  _print(result)
  print(f"wrote {os.path.join(out, 'twins.json')} and twins.png")
  return 0


def cli_main() -> None:
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  cli_main()
