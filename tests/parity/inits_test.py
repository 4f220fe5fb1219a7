"""torchref.inits: both frameworks' init laws agree tensor by tensor, and a changed law shows."""

import numpy as np
import pytest

import experiments
from torchref import inits

SEEDS = (42, 1, 2)


@pytest.fixture(scope="module")
def draws():
  cfg = experiments.load("crucible1")  # full size: a draw takes about a second
  dead = np.arange(cfg.model.vocab_size) % 3 == 0
  return cfg, dead, {f: {s: inits.draw(cfg, s, f, dead) for s in SEEDS}
                     for f in ("torch", "jaxdt")}


def test_same_tensors_and_torch_names(draws):
  _, _, d = draws
  assert d["torch"][42].keys() == d["jaxdt"][42].keys()
  assert "transformer.layers.1.self_attn.in_proj_weight" in d["torch"][42]
  assert {"row_norm_mean", "centroid_norm"} <= d["jaxdt"][42]["embedding.weight[dead]"].keys()


def test_sd_ranges_overlap_for_every_tensor(draws):
  _, _, d = draws
  table = inits.compare(d)
  # (the extremes of a normal sample are too noisy for three seeds; the uniform laws'
  # extremes are their bounds, checked below)
  off = [(t, s) for t, s in inits.disjoint(table) if s in ("sd", "row_norm_mean")]
  assert not off, off
  # bounds of the uniform laws are the same numbers: 1/sqrt(64) for linear1, xavier for in_proj
  assert d["torch"][42]["transformer.layers.0.linear1.weight"]["max"] == 0.125
  assert d["jaxdt"][42]["transformer.layers.0.linear1.weight"]["max"] == 0.125
  # the two layers start as copies in both frameworks (nn.TransformerEncoder deep-copies)
  for f in d:
    assert (d[f][1]["transformer.layers.0.linear2.weight"]
            == d[f][1]["transformer.layers.1.linear2.weight"])


def test_a_changed_law_is_flagged(draws, monkeypatch):
  cfg, dead, d = draws
  real = inits.jaxdt_init

  def wider(cfg, seed):  # what a wrong std (0.022 for 0.02) would draw
    p = real(cfg, seed)
    return {**p, "embedding.weight": p["embedding.weight"] * 1.1}

  monkeypatch.setattr(inits, "jaxdt_init", wider)
  changed = {"torch": d["torch"], "jaxdt": {s: inits.draw(cfg, s, "jaxdt", dead) for s in SEEDS}}
  off = [(t, s) for t, s in inits.disjoint(inits.compare(changed))
         if s in ("sd", "row_norm_mean")]
  assert ("embedding.weight", "sd") in off
  assert ("embedding.weight[dead]", "row_norm_mean") in off
  assert all(t.startswith("embedding.weight") for t, _ in off), off
