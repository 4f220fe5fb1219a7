"""The corpus counts the lab's notebooks (1.19b2, 1.19b4) printed, as text."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxdt.config import DataConfig
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import recipe
from jaxdt.data import sampler
from jaxdt.data import vocabulary


# --- Report ------------------------------------------------------------------


def report(corpus: corpus_lib.Corpus, cfg: DataConfig) -> str:
  """The counts the lab's notebooks (1.19b2, 1.19b4) printed, as text.

  Args:
    corpus: a loaded corpus.
    cfg: the data config (for the batch arithmetic).

  Returns:
    A multi-line report.
  """
  v, n = corpus.vocab_size, int(corpus.tokens.size)
  live_counts = corpus.token_occurrence_counts[corpus.live_mask]
  top = np.argsort(-corpus.token_occurrence_counts, kind="stable")[:5]
  lines = []
  if corpus.default is not None:
    d = corpus.default
    how = f"built in {d.seconds:.1f} s" if d.built else "cached, manifest verified"
    lines.append(f"Default data ({recipe.RECIPE_NAME} v{recipe.RECIPE_VERSION}): {d.directory} ({how})")
  for name in sorted(corpus.paths):
    lines.append(f"  {name:9s} {corpus.paths[name]}  sha256 {corpus.files[name][:16]}")
  lines += [
      f"Vocabulary: {v:,} tokens",
      f"Total tokens: {n:,}",
      f"Unique tokens: {corpus.n_live:,}",
      f"Tokens per character: {n / max(corpus.n_chars, 1):.3f} ({corpus.n_chars:,} characters)",
      f"Live: {corpus.n_live:,} ({100 * corpus.n_live / v:.2f}%)",
      f"Dead: {corpus.n_dead:,} ({100 * corpus.n_dead / v:.2f}%)",
  ]
  if live_counts.size:
    lines.append(
        f"Occurrences per live token: min {live_counts.min():,}, max {live_counts.max():,}, "
        f"mean {live_counts.mean():.1f}, median {np.median(live_counts):g}")
  lines.append("Top tokens: " + ", ".join(
      f"{corpus.vocab[i]!r} {corpus.token_occurrence_counts[i]:,}" for i in top))
  for scheme in ("chunks", "windows"):
    c = dataclasses.replace(cfg, scheme=scheme)
    lines.append(f"Batches ({scheme}, {c.batch_size} x {c.seq_len}): "
                 f"{sampler.num_sequences(n, c):,} sequences, {sampler.batches_per_epoch(n, c):,} per epoch")
  lines += _category_table("Vocabulary by category", corpus.vocab, np.ones(v, bool), v)
  lines += _category_table("Dead tokens by category", corpus.vocab, corpus.dead_mask, corpus.n_dead)
  return "\n".join(lines)


def _category_table(title: str, vocab: Sequence[str], mask: np.ndarray, total: int) -> list[str]:
  counts = {c: 0 for c in vocabulary.CATEGORIES}
  for i in np.flatnonzero(mask):
    counts[vocabulary.token_category(vocab[i])] += 1
  lines = [f"{title}:"]
  for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], vocabulary.CATEGORIES.index(kv[0]))):
    lines.append(f"  {name.capitalize():12s} {count:6,} ({100 * count / max(total, 1):5.1f}%)")
  return lines
