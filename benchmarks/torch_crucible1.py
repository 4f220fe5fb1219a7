"""The lab's Crucible 1 training loop in PyTorch, ported for timing (the baseline).

The model and step are `torchref.lab` (the lab's code); this script is its loop with the
lab's per-step capture, timed.

A port of the lab's Crucible 1 notebook, cells 6-11, kept as the lab wrote them:
TinyLM (cell 7, unchanged), `model.to(torch.bfloat16)`, AdamW, a shuffled
DataLoader over non-overlapping chunks, `torch.autocast(bf16)` around the
forward and the loss, and the per-step capture into preallocated histories
(W, ΔW′, centroid, loss, last_motion_step), with `loss.item()` and a tqdm bar
every step. Only the sizes, the step count and the token source are
parameters: tokens come from an .npy file the benchmark driver writes (the same
ids jaxdt trains on), instead of a fresh `tokenizer.encode`.

Not part of the library: jaxdt never imports this (tests/parity/model_parity_test.py
loads its TinyLM, the one copy of the lab's model class). Run by
`benchmarks/crucible1_bench.py` in its own process (allocator settings such as
MALLOC_MMAP_MAX_ must be in the environment before the process starts). Prints
one JSON line with per-step timestamps and RSS.

    python benchmarks/torch_crucible1.py --tokens=t.npy --dead_mask=m.npy \\
        --vocab=10000 --batch=128 --seq=128 --steps=60 --warmup=5
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from absl import app
from absl import flags
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from torchref.lab import (BETA1, BETA2, EPSILON, LEARNING_RATE, MOTION_THRESHOLD, NUM_HEADS,
                          NUM_LAYERS, RANDOM_SEED, WEIGHT_DECAY, HIDDEN_DIM, TextDataset, TinyLM,
                          compute_ulp_bf16, train_step)

try:
  from tqdm import tqdm
except ImportError:  # the lab's loop uses tqdm; without it the bar's cost is simply absent
  tqdm = None

FLAGS = flags.FLAGS


def define_flags():
  """Defines this script's flags; called from `__main__` only.

  Kept out of import time, so that importing this module defines no flag that could
  clash with another script's (run.py's --steps).
  """
  flags.DEFINE_string("tokens", None, ".npy of int token ids (the corpus)")
  flags.DEFINE_string("dead_mask", None, ".npy bool [vocab] dead mask")
  flags.DEFINE_integer("vocab", 10000, None)
  flags.DEFINE_integer("batch", 128, None)
  flags.DEFINE_integer("seq", 128, None)
  flags.DEFINE_integer("hidden", HIDDEN_DIM, None)
  flags.DEFINE_integer("steps", 60, "total steps (TOTAL_STEPS)")
  flags.DEFINE_integer("warmup", 5, "leading steps left out of the rate")
  flags.DEFINE_float("max_seconds", 0.0,
                     "stop early once the timed steps (at least 3) took this long (0: never)")
  flags.DEFINE_string("device", "auto", "auto (cuda if available, else cpu) | cpu | cuda")
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default)")
  flags.DEFINE_bool("bar", False, "show the tqdm bar on stderr (the lab's loop does)")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                    "bfloat16: the lab's; float32: a reference only (model in f32, autocast "
                    "off), to show what torch's f32 kernels do where its bf16 ones are slow")
  flags.mark_flags_as_required(["tokens", "dead_mask"])




def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from procstat import peak_rss_bytes, rss_bytes  # pylint: disable=g-import-not-at-top
  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  device = FLAGS.device
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  TOTAL_STEPS, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE = FLAGS.steps, FLAGS.batch, FLAGS.seq, FLAGS.vocab

  torch.manual_seed(RANDOM_SEED)
  random.seed(RANDOM_SEED)
  np.random.seed(RANDOM_SEED)
  if device == "cuda":
    torch.cuda.manual_seed_all(RANDOM_SEED)

  dead_mask = torch.from_numpy(np.load(FLAGS.dead_mask)).bool()
  n_dead = dead_mask.sum().item()
  dataset = TextDataset(np.load(FLAGS.tokens).tolist(), SEQ_LEN)  # a list, as encoding.ids is

  model = TinyLM(VOCAB_SIZE, FLAGS.hidden, NUM_LAYERS, NUM_HEADS, SEQ_LEN)
  model = model.to(device).to(getattr(torch, FLAGS.dtype))
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(BETA1, BETA2),
                                eps=EPSILON, weight_decay=WEIGHT_DECAY)

  # Cell 10: preallocated histories (the lab's 7.10 GB at 5000 steps).
  W_history = torch.zeros(TOTAL_STEPS + 1, n_dead, FLAGS.hidden, dtype=torch.bfloat16)
  delta_W_prime_history = torch.zeros(TOTAL_STEPS, n_dead, FLAGS.hidden, dtype=torch.float32)
  centroid_history = torch.zeros(TOTAL_STEPS + 1, FLAGS.hidden, dtype=torch.float32)
  loss_history = torch.zeros(TOTAL_STEPS + 1, dtype=torch.float32)
  last_motion_step = torch.full((n_dead,), -1, dtype=torch.int32)
  rss_after_alloc = rss_bytes()

  # Cell 11: the training loop with its per-step capture.
  dataloader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True)
  loss_fn = nn.CrossEntropyLoss()
  W_prev = model.embedding.weight.detach().cpu()[dead_mask].to(torch.bfloat16)
  W_history[0] = W_prev
  centroid_history[0] = W_prev.float().mean(dim=0)
  loss_history[0] = float('nan')

  model.train()
  step = 0
  epoch = 0
  sink = sys.stderr if FLAGS.bar else open(os.devnull, "w")
  pbar = tqdm(total=TOTAL_STEPS, desc="Training", file=sink) if tqdm else None
  stamps = []  # perf_counter after each step, capture included
  rss_marks = []  # (step, VmRSS, ru_maxrss)
  t0 = time.perf_counter()
  stop = False
  while step < TOTAL_STEPS and not stop:
    epoch += 1
    for batch in dataloader:
      if step >= TOTAL_STEPS:
        break
      input_ids = batch.to(device)
      loss = train_step(model, optimizer, loss_fn, input_ids, device, VOCAB_SIZE,
                        autocast=FLAGS.dtype == "bfloat16")
      step += 1

      W_curr = model.embedding.weight.detach().cpu()[dead_mask].to(torch.bfloat16)
      W_history[step] = W_curr
      delta_W = W_curr.float() - W_prev.float()
      ulp = compute_ulp_bf16(W_prev)
      delta_W_prime = delta_W / ulp
      delta_W_prime_history[step - 1] = delta_W_prime
      centroid_history[step] = W_curr.float().mean(dim=0)
      loss_history[step] = loss.item()
      displacement_magnitude = torch.norm(delta_W_prime, dim=1)
      moved = displacement_magnitude >= MOTION_THRESHOLD
      last_motion_step[moved] = step
      W_prev = W_curr
      if pbar is not None:
        pbar.set_postfix({'loss': f'{loss.item():.4f}', 'epoch': epoch})
        pbar.update(1)
      else:
        _ = loss.item()
      stamps.append(time.perf_counter() - t0)
      if step & (step - 1) == 0 or step == TOTAL_STEPS:  # powers of two and the end
        rss_marks.append((step, rss_bytes(), peak_rss_bytes()))
      if (FLAGS.max_seconds and step >= FLAGS.warmup + 3
          and stamps[-1] - stamps[FLAGS.warmup - 1 if FLAGS.warmup else 0] > FLAGS.max_seconds):
        stop = True  # a timing run: enough steps measured
        break
  if pbar is not None:
    pbar.close()

  done = step
  w = min(FLAGS.warmup, done - 1)
  timed = done - w
  span = stamps[-1] - (stamps[w - 1] if w > 0 else 0.0)
  print(json.dumps({
      "side": "torch", "dtype": FLAGS.dtype, "device": device, "threads": torch.get_num_threads(),
      "torch": torch.__version__, "steps": done, "requested_steps": TOTAL_STEPS, "warmup": w,
      "steps_per_s": timed / span, "step_times": np.diff([0.0] + stamps).tolist(),
      "first_step_s": stamps[0], "final_loss": float(loss_history[step]),
      "n_dead": n_dead, "history_bytes": int(
          W_history.numel() * 2 + delta_W_prime_history.numel() * 4
          + centroid_history.numel() * 4 + loss_history.numel() * 4 + n_dead * 4),
      "rss_after_alloc": rss_after_alloc, "rss_marks": rss_marks,
      "peak_rss": peak_rss_bytes(), "epochs": epoch,
      "malloc_env": {k: v for k, v in os.environ.items()
                     if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
  }))


if __name__ == "__main__":
  define_flags()
  from jaxdt.cli import parse_flags  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
