"""Benchmark sizes and the data both sides read (shared by crucible1_bench and sweep_bench).

Sizes below the tokenizer's vocabulary use the same BPE cut to its first
`vocab` ids (the alphabet and the earliest merges), so the text and the
tokenizer are the same.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Size:
  """One benchmark configuration."""

  name: str
  vocab: int
  hidden: int
  batch: int
  seq: int
  jax_steps: int  # steps of the jaxdt run (a multiple of jax_chunk; >= 3 chunks)
  jax_chunk: int
  torch_steps: int  # upper bound; --torch_seconds may stop a torch run earlier
  torch_warmup: int
  torch_seconds: float
  jax_repeats: int = 1  # jaxdt processes (the median is reported; the spread shows modes)


SIZES = {
    "full": Size("full", 10000, 64, 128, 128, jax_steps=300, jax_chunk=100,
                 torch_steps=40, torch_warmup=2, torch_seconds=100.0),
    "small": Size("small", 2000, 64, 16, 64, jax_steps=1500, jax_chunk=100,
                  torch_steps=1000, torch_warmup=20, torch_seconds=60.0, jax_repeats=3),
    "tiny": Size("tiny", 256, 32, 4, 16, jax_steps=60, jax_chunk=20,
                 torch_steps=40, torch_warmup=5, torch_seconds=10.0, jax_repeats=2),
}


def truncated_tokenizer(src: str, vocab: int, dst: str) -> str:
  """The BPE tokenizer `src` cut to its first `vocab` ids (alphabet + earliest merges)."""
  with open(src, encoding="utf-8") as f:
    spec = json.load(f)
  m = spec["model"]
  if len(m["vocab"]) == vocab:
    return src
  if m["type"] != "BPE" or len(m["vocab"]) < vocab:
    raise SystemExit(f"cannot cut {src} ({m['type']}, {len(m['vocab'])} ids) to {vocab} ids")
  m["vocab"] = {t: i for t, i in m["vocab"].items() if i < vocab}
  merges = []
  for pair in m["merges"]:
    a, b = pair if isinstance(pair, list) else pair.split(" ", 1)
    if m["vocab"].get(a + b, vocab) >= vocab:
      break  # merges are in id order: every later merge makes a later id
    merges.append(pair)
  m["merges"] = merges
  spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab]
  with open(dst, "w", encoding="utf-8") as f:
    json.dump(spec, f, ensure_ascii=False)
  return dst


def prepare_data(s: Size, args, work: str) -> dict:
  """Paths both sides read, plus tokens/dead-mask .npy for the torch port."""
  from jaxdt.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from jaxdt.data import recipe  # pylint: disable=g-import-not-at-top
  from jaxdt.config import DataConfig  # pylint: disable=g-import-not-at-top
  if args.corpus_path:
    corpus_path, tok_path = args.corpus_path, args.tokenizer_path
  else:
    default = recipe.build_default(args.data_dir)
    corpus_path, tok_path = default.corpus_path, default.tokenizer_path
  tok_path = truncated_tokenizer(tok_path, s.vocab, os.path.join(work, f"tokenizer_{s.vocab}.json"))
  cfg = DataConfig(batch_size=s.batch, seq_len=s.seq, corpus_path=corpus_path,
                   tokenizer_path=tok_path)
  corpus = corpus_lib.load_corpus(cfg, s.vocab)
  paths = {"corpus": corpus_path, "tokenizer": tok_path,
           "tokens": os.path.join(work, f"tokens_{s.name}.npy"),
           "dead": os.path.join(work, f"dead_{s.name}.npy"),
           "n_tokens": int(corpus.tokens.size), "n_dead": int(corpus.n_dead)}
  np.save(paths["tokens"], corpus.tokens)
  np.save(paths["dead"], corpus.dead_mask)
  return paths
