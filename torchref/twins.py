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

With `--checkpoint_every=N` every twin keeps its whole state every N steps, and
twins.json gains "live": per parameter tensor (torch's names) and kept step, the
fraction of elements bitwise equal to native2 and ||A - B|| / ||A - A_0||, for the
tensors that make the dead rows' gradient (h, through every layer) as well as the
token table: the next place to look when the dead rows' g departs first.
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
  flags.DEFINE_integer("checkpoint_every", 0, "keep every twin's state every this many steps "
                       "and compare the live parameters tensor by tensor there (0: none)")
  flags.DEFINE_multi_string("set", None, "config assignments for the jaxdt run (the torch twins "
                            "take its config); tests shrink the model with them")


def commands(root: str, steps: int, seed: int, data: dict, sets=(), every: int = 0) -> dict:
  """{name: argv} of the four runs (jax first: the others start from it). `data`: the data
  flags (data_dir, corpus_path, tokenizer_path, dead_mask_path) given; `sets`: --set
  assignments of the jaxdt run; `every`: steps between kept states (0: none)."""
  marks = ",".join(str(s) for s in range(every, steps, every)) if every > 0 else ""  # as the peer
  flags_of = lambda names: [f"--{k}={data[k]}" for k in names if data.get(k)]
  data_flags = flags_of(("data_dir", "corpus_path", "tokenizer_path"))
  jax_dir = os.path.join(root, "jax")
  out = {"jax": [sys.executable, "run.py", "--experiment=crucible1", f"--steps={steps}",
                 f"--seed={seed}", "--probes=W,grad_W_bits,momentum_W_bits,variance_W_bits,loss",
                 f"--output_dir={jax_dir}", "--noprogress", *data_flags,
                 *flags_of(("dead_mask_path",)), *(f"--set={a}" for a in sets),
                 *([f"--set=store.checkpoint_steps={marks}"] if marks else [])]}
  data = data_flags
  for name, extra in TORCH.items():
    out[name] = [sys.executable, "-m", "torchref.peer", f"--output_dir={os.path.join(root, name)}",
                 f"--init_from={jax_dir}", f"--batches_from={jax_dir}", "--probes=twin",
                 f"--checkpoint_every={max(every, 0)}", *extra] + data
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


def live_params(folder: str, steps=None) -> dict:
  """{step: {torch name: f32 values of the bf16 parameter}} at every state a twin keeps (or
  those of `steps` it keeps): a jaxdt run's checkpoints (and its init, step 0) through
  `training.replay`, a torch peer's checkpoints by leaf name (both checked against their
  markers' SHA-256)."""
  from jaxdt.io import checkpoints  # pylint: disable=g-import-not-at-top
  kept = {s: p for s, p in checkpoints.intact_checkpoints(os.path.join(folder, "checkpoints"))
          if steps is None or s in steps}
  meta = metadata_lib.read_metadata(folder)
  if meta.get("framework") == "torch":
    out = {}
    for step, path in sorted(kept.items()):
      names = [leaf["name"] for leaf in checkpoints.checkpoint_meta(path)["leaves"]
               if leaf["name"].startswith("['model']")]
      arrays = checkpoints.read_arrays(path, names)
      out[step] = {n[len("['model']['"):-2]: np.asarray(a, np.float32) for n, a in arrays.items()}
    return out
  from jaxdt.model import torch_io  # pylint: disable=g-import-not-at-top
  from jaxdt.training import replay  # pylint: disable=g-import-not-at-top
  _, cfg = replay.run_config(folder)
  return {s.step: {k: np.asarray(v, np.float32) for k, v in
                   torch_io.params_to_torch_state_dict(s.state.params, cfg.model).items()}
          for s in replay.states_at(folder, [0, *sorted(kept)] if steps is None or 0 in steps
                                    else sorted(kept), log=lambda _: None)}


def live_divergence(base: dict, other: dict, init: dict) -> dict:
  """{tensor: {"steps", "equal_fraction", "relative_distance"}} at the steps both keep:
  the fraction of elements bitwise equal and ||A - B|| / ||A - A_0|| (A the base, A_0 the
  common init), tensor by tensor (torch names). A tensor whose distance outgrows the
  baseline's first names where two twins part."""
  steps = sorted(set(base) & set(other) - {0})
  out = {}
  for name in init:
    eq, rel = [], []
    for s in steps:
      a, b = base[s][name], other[s][name]
      eq.append(float(np.mean(a.view(np.uint32) == b.view(np.uint32))))
      moved = float(np.linalg.norm(a - init[name]))
      rel.append(float(np.linalg.norm(a - b)) / moved if moved else None)
    out[name] = {"steps": steps, "equal_fraction": eq, "relative_distance": rel}
  return out


def live_report(root: str, names=("native1", "f32", "jax")) -> dict:
  """{twin: live_divergence from BASE} for the twins that keep states; {} if none do."""
  base = live_params(os.path.join(root, BASE))
  if not base:
    return {}
  kept = {n: live_params(os.path.join(root, n)) for n in names
          if os.path.isdir(os.path.join(root, n))}
  init = kept["jax"][0]  # every twin starts from jax's init
  return {n: live_divergence(base, params, init) for n, params in kept.items()}


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
    run_all(root, commands(root, FLAGS.steps, FLAGS.seed, data, FLAGS.set or (),
                           FLAGS.checkpoint_every))
    result = report(root, compare(root))
    if FLAGS.checkpoint_every > 0:
      result["live"] = live_report(root)
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
  cli.run_tool(main, define_flags)


if __name__ == "__main__":
  cli_main()
