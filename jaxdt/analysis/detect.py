"""The dead set from the weights alone: Magikarp's unembedding indicator, scored.

Land & Bartolo (EMNLP 2024, arXiv 2405.05417, "Fishing for Magikarp") find
under-trained tokens of a released model from its weights: for a model whose
unembedding is its embedding (tied, as TinyLM), they remove the unembedding's
first principal component (the constant direction the model uses to push every
unused token's logit down) and rank tokens by their distance to the mean of a
reference set of known-unused rows. jaxdt knows the true dead set, so the
ranking can be scored: precision and recall of the dead set among the top k.

Our computation, and where it departs from the paper:
- The principal component is the first right singular vector of the centered
  unembedding (f32, numpy's SVD); it is projected out of the uncentered rows.
- The reference set is a seeded random sample of the dead set (`REFERENCE_FRACTION`,
  at least `MIN_REFERENCE` rows). The paper takes tokens known to be unused from the
  tokenizer (never-reachable or special tokens); here a sample of the true dead set
  plays that part. The reference rows are held out: they are neither ranked nor counted.
- The indicator is the cosine distance to the reference mean (smaller = more likely
  dead). The paper reports E_in norms and cosine indicators for verification by
  prompting; we stop at the ranking (there is no generation check in jaxdt).
- k is the number of dead tokens outside the reference set, so precision equals
  recall; both are printed, with the ranking's average precision beside them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

REFERENCE_FRACTION = 0.05
MIN_REFERENCE = 8
REFERENCE_SEED = 0


def without_first_pc(table: np.ndarray) -> np.ndarray:
  """The rows of `table` with the first principal component of the centered table removed."""
  u = np.asarray(table, np.float64)
  _, _, vt = np.linalg.svd(u - u.mean(axis=0), full_matrices=False)
  pc = vt[0]
  return u - np.outer(u @ pc, pc)


def indicator(table: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Cosine distance of every row (first PC removed) to the mean of the `reference` rows."""
  u = without_first_pc(table)
  ref = u[np.asarray(reference)].mean(axis=0)
  norms = np.linalg.norm(u, axis=1) * np.linalg.norm(ref)
  cos = np.divide(u @ ref, norms, out=np.zeros(len(u)), where=norms > 0)
  return 1.0 - cos


def reference_rows(dead_indices: np.ndarray, seed: int = REFERENCE_SEED,
                   fraction: float = REFERENCE_FRACTION) -> np.ndarray:
  """A seeded random sample of the dead rows, sorted: the known-unused reference set."""
  dead = np.asarray(dead_indices)
  n = min(len(dead), max(MIN_REFERENCE, int(round(fraction * len(dead)))))
  return np.sort(np.random.default_rng(seed).choice(dead, size=n, replace=False))


@dataclasses.dataclass(frozen=True)
class Score:
  """How well the indicator finds the dead rows outside the reference set."""

  k: int  # dead rows scored (= the top-k cut)
  scored: int  # rows ranked (the vocabulary less the reference set)
  precision: float
  recall: float
  average_precision: float
  chance: float  # precision a random ranking expects: k / scored


def score(table: np.ndarray, dead_mask: np.ndarray, reference: np.ndarray) -> Score:
  """Precision and recall at k = the scored dead rows, and the ranking's average precision."""
  dead_mask = np.asarray(dead_mask, bool)
  held = np.zeros(len(dead_mask), bool)
  held[np.asarray(reference)] = True
  if not dead_mask[held].all():
    raise ValueError("the reference rows must be dead rows")
  d = indicator(table, reference)[~held]
  truth = dead_mask[~held]
  k = int(truth.sum())
  order = np.argsort(d, kind="stable")  # most dead-like first; ties by token id
  hits = truth[order]
  found = int(hits[:k].sum())
  ranks = np.flatnonzero(hits) + 1
  ap = float(np.mean(np.arange(1, len(ranks) + 1) / ranks)) if len(ranks) else float("nan")
  return Score(k, int(truth.size), found / k if k else float("nan"),
               found / k if k else float("nan"), ap, k / truth.size if truth.size else float("nan"))


def score_steps(tables: Sequence[tuple[int, np.ndarray]], dead_mask: np.ndarray,
                reference: np.ndarray) -> list:
  """[(step, Score)] for (step, embedding table) pairs."""
  return [(s, score(t, dead_mask, reference)) for s, t in tables]
