"""The compact freeze record (`--probes=freeze`): the same summary figures as a full trajectory."""

import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import single_trace, tiny_config

from jaxdt import probes
from jaxdt.analysis import metrics
from jaxdt.io import tensorfile
from jaxdt.report import summary as summary_lib
from jaxdt.training import loop

QUIET = dict(progress=False, log=lambda s: None)


def _with_probes(cfg, names):
  return dataclasses.replace(cfg, probes=dataclasses.replace(cfg.probes, names=names))


@pytest.fixture(scope="module")
def pair(tiny_data, tmp_path_factory):
  """One tiny config (40 steps, lr 2e-6: rows freeze as their small components grow) recorded both ways."""
  base = single_trace(tiny_config(tiny_data, steps=40))
  base = dataclasses.replace(base, optim=dataclasses.replace(base.optim, learning_rate=2e-6))
  root = tmp_path_factory.mktemp("freeze_record")
  full = loop.train(base, str(root / "full"), **QUIET)
  compact = loop.train(_with_probes(base, ("freeze",)), str(root / "compact"), **QUIET)
  return full, compact


def _keys(result):
  with tensorfile.TrajectoryReader(result.trajectory) as r:
    return set(r.keys())


def test_the_compact_file_holds_only_the_freeze_keys(pair):
  _, compact = pair
  assert _keys(compact) == set(probes.FREEZE_KEYS) | set(probes.RESERVED_KEYS)


def test_summary_figures_are_the_same_from_both_records(pair, tmp_path):
  full, compact = pair
  got = summary_lib.summarize([os.path.dirname(full.trajectory),
                               os.path.dirname(compact.trajectory)], str(tmp_path),
                              echo=lambda s: None)
  a, b = got["runs"]
  for figure in summary_lib.FIGURES:
    assert a[figure] == b[figure], figure
  assert a["frozen_50"] is not None and a["stillness_runs"] is not None


def test_per_step_counts_and_trackers_equal_the_full_pass(pair):
  full, compact = pair
  s_full, series_full = metrics.measure(full.trajectory)
  s_compact, series_compact = metrics.measure(compact.trajectory)
  np.testing.assert_array_equal(series_full["frozen_fraction"], series_compact["frozen_fraction"])
  np.testing.assert_array_equal(series_full["any_motion"], series_compact["any_motion"])
  np.testing.assert_array_equal(series_full["last_motion"], series_compact["last_motion"])
  assert s_full.fimbulwinter_check == s_compact.fimbulwinter_check
  assert s_full.stillness == s_compact.stillness
  assert s_full.frozen_fraction.milestones == s_compact.frozen_fraction.milestones
  assert s_full.frozen_fraction.moving_at == s_compact.frozen_fraction.moving_at
  assert s_compact.frozen_fraction.reheat is None  # counts only: not claimed
  # The mean norm is f32 in the scan and f64 in the pass: equal to f32 rounding.
  for t, v in s_full.mean_l2_at.items():
    assert s_compact.mean_l2_at[t] == pytest.approx(v, rel=1e-5, abs=1e-6)
  # The centroid norm against the full file's stored centroid.
  with tensorfile.TrajectoryReader(full.trajectory) as r:
    c = r.read("centroid").astype(np.float64)
  np.testing.assert_allclose(series_compact["centroid_norm"], np.linalg.norm(c, axis=1),
                             rtol=1e-5)


def test_both_records_train_the_same_bits(pair):
  """Recording less changes nothing in training: the loss rows agree bit for bit."""
  full, compact = pair
  with tensorfile.TrajectoryReader(full.trajectory) as a, \
       tensorfile.TrajectoryReader(compact.trajectory) as b:
    np.testing.assert_array_equal(a.read("loss").view(np.uint32), b.read("loss").view(np.uint32))
    np.testing.assert_array_equal(a.read("last_motion_step"), b.read("last_motion_step"))


def test_a_lying_count_is_refused(pair, tmp_path):
  """n_frozen + n_moving must be the recorded rows; a file that says otherwise is refused."""
  _, compact = pair
  with tensorfile.TrajectoryReader(compact.trajectory) as r:
    arrays = {k: r.read(k) for k in r.keys()}
  arrays["n_frozen"] = arrays["n_frozen"].copy()
  arrays["n_frozen"][3] += 1
  from safetensors.numpy import save_file
  path = str(tmp_path / "lying.safetensors")
  save_file(arrays, path)
  with pytest.raises(metrics.AnalysisError, match="n_frozen \\+ n_moving"):
    metrics.measure(path)


def test_weight_of_a_compact_folder(pair):
  _, compact = pair
  meta = json.load(open(os.path.join(os.path.dirname(compact.trajectory), "metadata.json")))
  assert os.path.getsize(compact.trajectory) < 4096 + 40 * 20 + 256 * 8
  assert meta["config"]["probes"]["names"] == ["freeze"]
