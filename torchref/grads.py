"""One gradient at a fixed state, three ways: where two frameworks' arithmetic parts.

    python -m torchref.grads --root=DIR --steps=10,60,80 [--set=model.layernorm_backward=...]

DIR is a `torchref.twins --checkpoint_every=N` root. From native2's parameters at each
of --steps (its checkpoints) and the twins' batch of the next step, the full gradient
of the lab's loss is computed by torch natively at 2 threads (the base) and at 1
thread, and by jaxdt (its config from DIR/jax, with --set assignments on top, e.g.
another LayerNorm backward). Per parameter tensor (torch's names): ||g - g_base|| /
||g_base|| and the fraction of elements bitwise equal. A tensor where jaxdt differs
far more than torch's threads do names the op, without the dynamics in between.
Writes its figures as JSON (grads.json) into --out (default DIR).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app
from absl import flags

from jaxdt import cli

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("root", None, "a torchref.twins root whose twins kept checkpoints")
  flags.DEFINE_list("steps", None, "kept steps of native2 whose parameters to start from")
  flags.DEFINE_string("out", None, "where grads.json goes (default: --root)")
  flags.DEFINE_multi_string("set", None, "config assignments for jaxdt's side")


def torch_gradient(model, sd: dict, ids, threads: int, vocab: int) -> dict:
  """{name: f32 values of the bf16 .grad} of one forward and backward of the lab's loss
  (cell 11: autocast bf16, shifted cross entropy) from parameters `sd`."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  model.load_state_dict({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()})
  model.train()
  model.zero_grad(set_to_none=True)
  with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
    logits = model(ids)
    loss = torch.nn.CrossEntropyLoss()(logits[:, :-1, :].contiguous().view(-1, vocab),
                                       ids[:, 1:].contiguous().view(-1))
  loss.backward()
  return {n: p.grad.float().numpy() for n, p in model.named_parameters()}


def compare(base: dict, other: dict) -> dict:
  """{name: [relative distance (None for a zero base), bitwise-equal fraction]}."""
  out = {}
  for n, g in base.items():
    ref = float(np.linalg.norm(g))
    out[n] = [float(np.linalg.norm(other[n] - g)) / ref if ref else None,
              float(np.mean(other[n].view(np.uint32) == g.view(np.uint32)))]
  return out


def gradients(root: str, steps: list, sets=()) -> dict:
  """{step: {"native1": compare, "jax": compare, "norm": {name: ||g_base||}}}."""
  from jaxdt.numerics import backend  # pylint: disable=g-import-not-at-top
  backend.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from jaxdt import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxdt.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from jaxdt.data import sampler  # pylint: disable=g-import-not-at-top
  from jaxdt.io import checkpoints  # pylint: disable=g-import-not-at-top
  from jaxdt.model import torch_io  # pylint: disable=g-import-not-at-top
  from jaxdt.training import replay  # pylint: disable=g-import-not-at-top
  from jaxdt.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from torchref import lab  # pylint: disable=g-import-not-at-top
  from torchref import twins  # pylint: disable=g-import-not-at-top
  _, cfg = replay.run_config(os.path.join(root, "jax"))
  for assignment in sets:
    cfg = config_lib.override(cfg, assignment)
  kept = twins.live_params(os.path.join(root, twins.BASE), steps)  # only the states asked for
  missing = [s for s in steps if s not in kept or s == 0]
  if missing:
    every = sorted(k for k, _ in checkpoints.intact_checkpoints(
        os.path.join(root, twins.BASE, "checkpoints")))
    raise ValueError(f"{twins.BASE} keeps no checkpoint at step {missing[0]} (it keeps "
                     f"{every}); pick kept steps")
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  sample = sampler.make_sampler(corpus.tokens, cfg.data)
  key = step_lib.data_key(cfg)
  gemm, block = step_lib.arithmetic(cfg.model)
  m = cfg.model
  model = lab.TinyLM(m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads,
                     cfg.data.seq_len).to(torch.bfloat16)

  @jax.jit
  def jax_gradient(params, inputs, targets):
    objective = lambda p: step_lib.loss_and_hidden(p, cfg.model, sampler.Batch(inputs, targets),
                                                   gemm, block)[0]
    return jax.grad(objective)(params)

  threads = torch.get_num_threads()
  out = {}
  try:
    for s in steps:
      sd, batch = kept[s], sample(key, jnp.int32(s + 1))
      ids = torch.from_numpy(np.asarray(batch.inputs).astype(np.int64))
      base = torch_gradient(model, sd, ids, 2, m.vocab_size)
      one = torch_gradient(model, sd, ids, 1, m.vocab_size)
      params = torch_io.params_from_torch_state_dict(
          {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, cfg.model)
      params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
      g = torch_io.params_to_torch_state_dict(jax_gradient(params, batch.inputs, batch.targets),
                                              cfg.model)
      out[s] = {"native1": compare(base, one),
                "jax": compare(base, {k: np.asarray(v, np.float32) for k, v in g.items()}),
                "norm": {n: float(np.linalg.norm(v)) for n, v in base.items()}}
  finally:
    torch.set_num_threads(threads)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.root or not FLAGS.steps:
    print("error: pass --root (a twins root kept with --checkpoint_every) and --steps",
          file=sys.stderr)
    return 2
  try:
    steps = [int(s) for s in FLAGS.steps]
    result = gradients(FLAGS.root, steps, FLAGS.set or ())
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from jaxdt.numerics import backend  # pylint: disable=g-import-not-at-top
  from jaxdt.report import outputs  # pylint: disable=g-import-not-at-top
  for s, r in result.items():
    print(f"state after step {s}, batch {s + 1}: tensor, native1 and jax against native2 "
          "(relative distance, bitwise equal)")
    for n, (a, b) in zip(r["jax"], zip(r["native1"].values(), r["jax"].values())):
      cell = lambda x: f"{'-' if x[0] is None else f'{x[0]:.2e}'} {x[1]:.3f}"
      print(f"  {n:<48} {cell(a):>16}   {cell(b):>16}")
  out = FLAGS.out or FLAGS.root
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "grads.json")
  outputs.write_json(path, {"root": os.path.abspath(FLAGS.root), "sets": FLAGS.set or [],
                            "cpu": backend.cpu_description(),
                            "steps": {str(s): r for s, r in result.items()}})
  print(f"wrote {path}")
  return 0


def cli_main() -> None:
  cli.run_tool(main, define_flags)


if __name__ == "__main__":
  cli_main()
