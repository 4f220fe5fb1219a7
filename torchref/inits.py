"""Both frameworks' step-0 parameters, tensor by tensor, over seeds.

    python -m torchref.inits [--seeds=42,1,2,3,4] [--out=docs/findings/inits]

The 2,000-step twin (torch from jaxdt's init, on jaxdt's batches) tells whether a gap
between the frameworks' seed ranges is an op or what a seed draws. If the twin freezes
like jaxdt, the next suspect is the init: this module draws Crucible 1's parameters as
each framework does for each seed (torch: the lab's cell 4 seeding and `TinyLM(...)
.to(bfloat16)`, as `torchref.peer` does; jaxdt: `tinylm.init_params` from the seed's
init key, cast to bf16) and gives, per tensor (torch's state-dict names), the mean, sd
and extremes of the bf16 values, plus the dead and live rows of the token table (mean
row norm, centroid norm). Then, per tensor and statistic, the range over seeds of each
framework and whether the two ranges overlap. Writes inits.json into --out.

A difference of law (another bound, another std, a missing zero) shows as disjoint
ranges of the sd or the extremes; seed noise keeps them overlapping.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
from absl import app
from absl import flags

from jaxdt import cli
from jaxdt.numerics import backend
from jaxdt.report import outputs

FLAGS = flags.FLAGS
STATS = ("mean", "sd", "min", "max")
ROW_STATS = ("row_norm_mean", "row_norm_sd", "centroid_norm")


def define_flags():
  flags.DEFINE_list("seeds", ["42", "1", "2", "3", "4"], "seeds to draw each framework's init with")
  flags.DEFINE_string("out", None, "where inits.json goes (default: print only)")
  flags.DEFINE_string("data_dir", None, "jaxdt's data cache (the embedded default data)")


def tensor_stats(x: np.ndarray) -> dict:
  """mean, sd (population), min and max of an array's values as f64."""
  x = np.asarray(x, np.float64).ravel()
  return {"mean": float(x.mean()), "sd": float(x.std()), "min": float(x.min()),
          "max": float(x.max())}


def row_stats(table: np.ndarray) -> dict:
  """The token-table rows' mean and sd of ||row|| and ||mean row|| (f64 of the bf16 values)."""
  t = np.asarray(table, np.float64)
  norms = np.linalg.norm(t, axis=1)
  return {"row_norm_mean": float(norms.mean()), "row_norm_sd": float(norms.std()),
          "centroid_norm": float(np.linalg.norm(t.mean(axis=0)))}


def torch_init(cfg, seed: int) -> dict:
  """{state-dict name: f32 array of the bf16 values} of the lab's model seeded as cell 4."""
  from torchref import lab  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  random.seed(seed)
  np.random.seed(seed)
  m = cfg.model
  model = lab.TinyLM(m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads, cfg.data.seq_len)
  model = model.to("cpu").to(torch.bfloat16)
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def jaxdt_init(cfg, seed: int) -> dict:
  """{state-dict name: f32 array of the bf16 values} of jaxdt's init for `seed`."""
  from jaxdt.model import tinylm  # pylint: disable=g-import-not-at-top
  from jaxdt.model import torch_io  # pylint: disable=g-import-not-at-top
  from jaxdt.numerics import precision  # pylint: disable=g-import-not-at-top
  from jaxdt.training import step  # pylint: disable=g-import-not-at-top
  params = tinylm.init_params(step.root_keys(seed)[0], cfg.model)
  params = precision.cast_params(params, precision.get_policy("bf16"))
  sd = torch_io.params_to_torch_state_dict(params, cfg.model)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def draw(cfg, seed: int, framework: str, dead_mask: np.ndarray) -> dict:
  """{tensor: {stat: value}} of one framework's init for one seed; the token table also as
  its dead and live rows ("embedding.weight[dead]", "[live]")."""
  params = (torch_init if framework == "torch" else jaxdt_init)(cfg, seed)
  out = {k: tensor_stats(v) for k, v in sorted(params.items())}
  table = params["embedding.weight"]
  for name, rows in (("dead", dead_mask), ("live", ~dead_mask)):
    out[f"embedding.weight[{name}]"] = {**tensor_stats(table[rows]), **row_stats(table[rows])}
  return out


def compare(draws: dict) -> dict:
  """{tensor: {stat: {framework: [lo, hi], "overlap": bool}}} over seeds."""
  frameworks = list(draws)
  seeds = list(draws[frameworks[0]])
  tensors = draws[frameworks[0]][seeds[0]].keys()
  out = {}
  for t in tensors:
    entry = {}
    for stat in draws[frameworks[0]][seeds[0]][t]:
      ranges = {f: [min(draws[f][s][t][stat] for s in seeds),
                    max(draws[f][s][t][stat] for s in seeds)] for f in frameworks}
      (a0, a1), (b0, b1) = ranges.values()
      entry[stat] = {**ranges, "overlap": bool(a0 <= b1 and b0 <= a1)}
    out[t] = entry
  return out


def disjoint(table: dict) -> list:
  """(tensor, stat) pairs whose ranges over seeds do not overlap."""
  return [(t, s) for t, e in table.items() for s, r in e.items() if not r["overlap"]]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import dataclasses  # pylint: disable=g-import-not-at-top
  import experiments  # pylint: disable=g-import-not-at-top
  from jaxdt.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    print(f"error: --seeds={','.join(FLAGS.seeds)} is not a list of integers; pass e.g. "
          "--seeds=42,1,2", file=sys.stderr)
    return 2
  cfg = experiments.load("crucible1")
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=FLAGS.data_dir))
  dead = np.asarray(corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size).dead_mask, bool)
  draws = {f: {s: draw(cfg, s, f, dead) for s in seeds} for f in ("torch", "jaxdt")}
  table = compare(draws)
  for t, e in table.items():
    cells = "  ".join(f"{s} t[{r['torch'][0]:.4g},{r['torch'][1]:.4g}] "
                      f"j[{r['jaxdt'][0]:.4g},{r['jaxdt'][1]:.4g}]{'' if r['overlap'] else ' !'}"
                      for s, r in e.items() if s in STATS + ROW_STATS)
    print(f"{t:<48} {cells}")
  off = disjoint(table)
  print(f"{len(off)} of {sum(len(e) for e in table.values())} (tensor, statistic) ranges over "
        f"seeds {seeds} do not overlap" + (": " + ", ".join(f"{t} {s}" for t, s in off)
                                           if off else ""))
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "inits.json")
    outputs.write_json(path, {"seeds": seeds, "cpu": backend.cpu_description(),
                              "torch_version": torch.__version__, "dead_rows": int(dead.sum()),
                              "ranges": table, "disjoint": [list(p) for p in off],
                              "draws": {f: {str(s): d for s, d in v.items()}
                                        for f, v in draws.items()}})
    print(f"wrote {path}")
  return 0


def cli_main() -> None:
  cli.run_tool(main, define_flags)


if __name__ == "__main__":
  cli_main()
