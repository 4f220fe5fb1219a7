"""Analyses on small synthetic trajectories with hand-checked answers, and streaming = in memory."""

import dataclasses
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxdt.analysis import checks
from jaxdt.analysis import compare
from jaxdt.analysis import freeze
from jaxdt.analysis import metrics
from jaxdt.analysis import phases
from jaxdt.analysis import stream
from jaxdt.analysis import trajectory
from jaxdt.io import tensorwriter
from jaxdt.report import text
from jaxdt.numerics import lattice

T, N, D = 10, 3, 4  # steps, rows, hidden (√D = 2)


def cells_schedule() -> np.ndarray:
  """Per-step integer moves in cells, [T, N, D] (step t at index t-1).

  row 0: Early (3) → Midlife (2) → Late (1,1) → Early again (3) → Late (1) → still.
  row 1: never moves.
  row 2: Late (1) at step 1, Midlife (L∞ 2, ‖·‖₂ = 2, not > √D) at 7, Late (−1) at 9.
  """
  k = np.zeros((T, N, D), np.int64)
  k[0, 0] = [3, 0, 0, 0]
  k[1, 0] = [2, 0, 0, 0]
  k[2, 0] = [1, 1, 0, 0]
  k[3, 0] = [3, 0, 0, 0]
  k[4, 0] = [0, 1, 0, 0]
  k[0, 2] = [1, 0, 0, 0]
  k[6, 2] = [0, 0, 2, 0]
  k[8, 2] = [-1, 0, 0, 0]
  return k


def w_bits_from_cells(k: np.ndarray, start: int = 40) -> np.ndarray:
  """W as bf16 bits in [1, 2) (ULP 2^-7 everywhere), moved by k cells per step."""
  mant = start + np.concatenate([np.zeros_like(k[:1]), np.cumsum(k, axis=0)])
  assert mant.min() >= 0 and mant.max() < 128
  return ((127 << 7) | mant).astype(np.uint16)


def delta_of(w_bits):
  w = w_bits.view(ml_dtypes.bfloat16)
  return np.asarray(lattice.lattice_displacement(w[:-1], w[1:]))


def write_file(path, w_bits, *, delta=False, loss=None, extra=None):
  """A trajectory file; delta=True stores ΔW′ of w_bits, an array stores that array."""
  arrays = {"W": w_bits}
  if delta is not False:
    arrays["delta_W_prime"] = delta_of(w_bits) if delta is True else delta
  if loss is not None:
    arrays["loss"] = np.asarray(loss, np.float32)
  arrays.update(extra or {})
  specs = {k: (a.dtype, a.shape) for k, a in arrays.items()}
  with tensorwriter.TrajectoryWriter(path, specs) as writer:
    for k, a in arrays.items():
      writer.write(k, a)
    writer.finalize()
  return path


@pytest.fixture
def synthetic(tmp_path):
  return write_file(str(tmp_path / "t.safetensors"), w_bits_from_cells(cells_schedule()),
                    loss=np.concatenate([[np.nan], 5 - 0.1 * np.arange(T)]))


# --- Lattice displacement ------------------------------------------------------


def test_numpy_lattice_displacement_is_the_lab_formula_bit_for_bit():
  rng = np.random.default_rng(0)
  finite = np.array([u for u in range(1 << 16) if ((u >> 7) & 0xFF) != 0xFF], np.uint16)
  prev = rng.choice(finite, 200_000)
  step = rng.integers(-3, 4, prev.size).astype(np.int32)
  nxt = np.concatenate([
      (prev.astype(np.int32) + step).clip(0, 0xFFFF).astype(np.uint16)[:100_000],  # lattice moves
      rng.choice(finite, 100_000)])  # arbitrary jumps, exponent crossings, sign flips
  nxt = np.where(((nxt >> 7) & 0xFF) == 0xFF, prev, nxt)
  zeros = np.array([0, 0x8000, 1, 0x8001, 0x0080], np.uint16)  # ±0, subnormals, smallest normal
  prev = np.concatenate([prev, zeros, zeros])
  nxt = np.concatenate([nxt, zeros[::-1], np.full(5, 0x3F00, np.uint16)])  # 0.5 / 2^-133: inf
  jnp.ones(3).block_until_ready()  # XLA ran in this process: numpy must still keep subnormals
  ours = trajectory.np_lattice_displacement(prev, nxt)
  ref = np.asarray(lattice.lattice_displacement(prev.view(ml_dtypes.bfloat16),
                                                nxt.view(ml_dtypes.bfloat16)))
  np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
  assert np.isinf(ours[-5:-1]).all()  # W[t-1] = 0 or subnormal: the Crucible 2 caveat


def test_numpy_ulp_matches_lattice_ulp_for_every_bf16():
  bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
  np.testing.assert_array_equal(
      trajectory.np_ulp(bits).view(np.uint32),
      np.asarray(lattice.ulp(bits.view(ml_dtypes.bfloat16))).view(np.uint32))


# --- Pure analyses, hand-checked ----------------------------------------------


def test_stillness_runs_with_the_seeds_median_and_mean():
  moved = np.array([1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0], bool)  # runs 2, 1, 4, 1
  s = freeze.Stillness.of(moved)
  assert s.runs == (4, 2, 1, 1)
  assert s.count == 4 and s.mean == 2.0
  assert s.median == 2  # the lab's sorted(runs)[len // 2]: upper middle of [1, 1, 2, 4]
  assert s.final_vs_second == 2.0
  printed = text.format_stillness(s)
  assert "Median stillness: 2 steps" in printed and "Mean stillness: 2.0 steps" in printed
  assert freeze.Stillness.of(np.ones(5, bool)).count == 0


def test_global_freeze_cycles_and_windows():
  frozen = np.zeros(20, bool)
  frozen[[2, 3, 4, 9, 15, 16, 17, 18, 19]] = True  # steps 3-5, 10, 16-20
  g = freeze.GlobalFreeze.of(frozen, window=10)
  assert g.frozen_steps == 9 and g.fraction == 0.45 and g.cycles == 3
  assert g.longest == freeze.Span(start=16, end=20, length=5)
  assert g.mean_run == 3.0 and g.median_run == 3.0
  assert g.first_frozen_step == 3 and g.final_run_to_end
  assert [w.fraction for w in g.windows] == [0.4, 0.5]
  assert freeze.GlobalFreeze.of(np.zeros(4, bool)).longest is None


def test_milestones_are_exact_counts():
  n_frozen = np.array([0, 1, 2, 2, 3, 2, 3])  # of n = 3 rows
  f = freeze.FrozenFraction.of(n_frozen, 3)
  assert f.milestones == {"50%": 3, "90%": 5, "99%": 5, "100%": 5}
  assert f.milestone(90) == 5 and f.first_frozen_token_step == 2
  assert f.moving_at == {"1": 3, "7": 0}
  assert freeze.first_step_reaching(np.array([99, 100]), 100, 100) == 2
  assert freeze.first_step_reaching(np.array([99, 99]), 100, 100) is None  # 99% is not 100%


def test_centroid_efficiency_cosine_and_liftoff():
  c = np.array([[0, 0], [1, 0], [2, 0], [2, 1], [2, 1]], float)
  x = phases.CentroidDrift.of(c, radius=np.array([2, 2, 1, 1, 0.5]),
                              max_radius=np.array([3, 3, 1.5, 1.5, 1.5]))
  assert x.path_length == 3.0 and x.crow_flies == pytest.approx(math.sqrt(5))
  assert x.efficiency == pytest.approx(math.sqrt(5) / 3)
  assert x.cos_pairs == 2  # the last step did not move: no pair with it
  assert x.cos_mean == pytest.approx(0.5) and x.cos_std == pytest.approx(math.sqrt(0.5))
  assert x.l2_over_l1 == pytest.approx(math.sqrt(5) / 3)
  assert x.last_motion_step == 3 and x.radius_ratio == 0.25
  assert x.liftoff_step == 2  # ‖c(2)‖ = 2 > 1.5


def test_accounting_summary_counts_like_the_lab():
  ratio = np.array([1.0, 0.99, 1.011, np.inf, 0.5])
  cos = np.array([0.999, 0.995, 0.98, np.nan, 0.2])
  a = checks.AccountingSummary.of(np.array([1, 1, 0.5, 1, 1]), cos, ratio, np.zeros(5),
                                  np.array([0, 1, 2, 0, 3]), source="test")
  assert a.ratio_within_1pct == 2 and a.cosine_above_0_99 == 2
  assert a.replay_exact_steps == 4 and a.replay_match_min == 0.5
  assert a.ratio_mean == pytest.approx((1 + 0.99 + 1.011 + 0.5) / 4)  # inf skipped
  assert a.max_ulp_error == 3 and [s.t for s in a.samples] == [1]


# --- The synthetic trajectory, end to end ----------------------------------------


def test_scan_counts_and_last_exit_steps(synthetic):
  sc = stream.scan(trajectory.open_trajectory(synthetic), 0.1)
  np.testing.assert_array_equal(sc.any_motion, [1, 1, 1, 1, 1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(sc.global_frozen, ~sc.any_motion)
  np.testing.assert_array_equal(sc.n_frozen, [1, 2, 2, 2, 2, 3, 2, 3, 2, 3])
  np.testing.assert_array_equal(sc.classes, [  # Early, Midlife, Late, Still
      [1, 0, 1, 1], [0, 1, 0, 2], [0, 0, 1, 2], [1, 0, 0, 2], [0, 0, 1, 2],
      [0, 0, 0, 3], [0, 1, 0, 2], [0, 0, 0, 3], [0, 0, 1, 2], [0, 0, 0, 3]])
  np.testing.assert_array_equal(sc.last_motion, [5, -1, 9])
  np.testing.assert_array_equal(sc.last_early, [4, -1, -1])
  np.testing.assert_array_equal(sc.last_midlife, [4, -1, 7])
  np.testing.assert_array_equal(sc.last_l1, [5, -1, 9])
  np.testing.assert_array_equal(sc.last_spherical, [4, -1, 7])
  np.testing.assert_array_equal(sc.last_hypernova, [-1, -1, -1])
  assert (sc.cold_to_hot, sc.hot_to_cold) == (2, 4)


def test_lifecycle_last_exit_rule_and_populations(synthetic):
  sc = stream.scan(trajectory.open_trajectory(synthetic), 0.1)
  x = dataclasses.asdict(phases.Lifecycle.of(sc.last_early, sc.last_midlife, sc.last_l1, T,
                                              last_spherical=sc.last_spherical))
  b, d = x["boundaries"], x["durations"]
  assert (b["last_early"]["median"], b["last_early"]["count"], b["last_early_never"]) == (4, 1, 2)
  assert b["last_midlife"]["median"] == 4 and b["last_midlife"]["mean"] == 5.5  # lower median
  assert (b["last_motion"]["min"], b["last_motion"]["max"]) == (5, 9)
  assert (b["fimbulwinter_onset"]["min"], b["fimbulwinter_onset"]["max"]) == (6, 10)
  # Row 0 re-entered Early at step 4, so its Early phase lasts to 4 and Midlife is empty.
  assert [d[p]["mean"] for p in ("early", "midlife", "late", "fimbulwinter")] == [
      4 / 3, 7 / 3, 1.0, 16 / 3]
  assert x["stumbling"]["max"] == 2  # row 2: last L1 > 1 at 7, last motion at 9
  pops = phases.phase_populations(sc.last_early, sc.last_midlife, sc.last_l1, T)
  np.testing.assert_array_equal(pops, [
      [1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1],
      [0, 1, 0, 2], [0, 1, 0, 2], [0, 0, 1, 2], [0, 0, 1, 2], [0, 0, 0, 3]])
  assert (pops.sum(1) == N).all()


def test_phase_populations_match_a_brute_force_classification():
  rng = np.random.default_rng(1)
  le = rng.integers(-1, 30, 50)
  lm = np.maximum(le, rng.integers(-1, 40, 50))
  ll = np.maximum(lm, rng.integers(-1, 60, 50))
  pops = phases.phase_populations(le, lm, ll, 60)
  for t in range(1, 61):
    phase = np.where(t <= le, 0, np.where(t <= lm, 1, np.where(t <= ll, 2, 3)))
    np.testing.assert_array_equal(pops[t - 1], np.bincount(phase, minlength=4))


def test_full_analysis_of_the_synthetic_file(synthetic):
  summary, series = metrics.measure(synthetic)
  s = summary.to_json()
  assert s["layout"] == "lab" and s["delta_w_prime"] == "computed from W"
  assert s["fimbulwinter_check"]["global_last_motion"] == 9
  assert s["fimbulwinter_check"]["never_moved"] == 1
  assert s["stillness"]["runs"] == [1, 1, 1]
  assert s["frozen_fraction"]["milestones"] == {"50%": 2, "90%": 6, "99%": 6, "100%": 6}
  assert s["global_freeze"]["cycles"] == 3 and s["global_freeze"]["longest"]["start"] == 6
  assert s["loss"]["final"] == pytest.approx(4.1) and s["loss"]["min_step"] == T
  assert s["centroid"]["source"] == "mean of W rows (f64)"
  skipped = {x["analysis"] for x in s["skipped"]}
  assert skipped == {"Adam accounting"}
  w = trajectory.np_bf16_to_f32(w_bits_from_cells(cells_schedule())).astype(np.float64)
  np.testing.assert_allclose(series["centroid"], w.mean(1), rtol=0, atol=0)
  assert s["centroid"]["radius_start"] == pytest.approx(
      np.linalg.norm(w[0] - w[0].mean(0), axis=1).mean())


def _assert_same(a, b, path=""):
  if isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for k in a:
      _assert_same(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same(x, y, f"{path}[{i}]")
  elif isinstance(a, np.ndarray):
    np.testing.assert_array_equal(a, b, err_msg=path)
  else:
    assert a == b or (a != a and b != b), path


@pytest.mark.parametrize("delta", [False, True])
def test_streaming_in_tiny_blocks_equals_one_block(tmp_path, delta):
  rng = np.random.default_rng(2)
  k = np.where(rng.random((40, 7, D)) < 0.3, rng.integers(-2, 3, (40, 7, D)), 0)
  k[30:] = 0  # a final freeze
  path = write_file(str(tmp_path / "r.safetensors"), w_bits_from_cells(k, 64), delta=delta,
                    loss=rng.random(41))
  whole = metrics.measure(path, block_steps=1000)
  for block in (1, 3, 7):
    s, series = metrics.measure(path, block_steps=block)
    _assert_same(s.to_json(), whole[0].to_json())
    _assert_same(series, whole[1])
  assert whole[0].fimbulwinter_check.fimbulwinter_duration >= 10
  assert whole[0].delta_w_prime == ("stored" if delta else "computed from W")


def test_stored_and_computed_delta_give_the_same_analysis(tmp_path):
  w = w_bits_from_cells(cells_schedule())
  a = metrics.measure(write_file(str(tmp_path / "a.safetensors"), w))[0].to_json()
  b = metrics.measure(write_file(str(tmp_path / "b.safetensors"), w, delta=True))[0].to_json()
  for k in ("fimbulwinter_check", "stillness", "frozen_fraction", "lifecycle", "global_freeze",
            "centroid"):
    _assert_same(a[k], b[k], k)


def test_all_row_files_analyse_the_dead_rows(tmp_path):
  w = w_bits_from_cells(cells_schedule())
  live = w_bits_from_cells(np.ones((T, 2, D), np.int64))  # two live rows that always move
  full = np.concatenate([live[:, :1], w, live[:, 1:]], axis=1)  # rows: live, 3 dead, live
  mask = np.array([False, True, True, True, False])
  path = write_file(str(tmp_path / "all.safetensors"), full, extra={"dead_mask": mask})
  s, _ = metrics.measure(path)
  assert s.rows == 3 and s.rows_recorded == 5 and "dead rows" in s.notes[0]
  assert s.fimbulwinter_check.global_last_motion == 9  # the live rows move to the end
  assert s.global_freeze.cycles == 3


def test_bad_paths_are_one_line_errors(tmp_path):
  with pytest.raises(metrics.AnalysisError, match="does not exist"):
    trajectory.open_trajectory(str(tmp_path / "missing.safetensors"))
  with pytest.raises(metrics.AnalysisError, match="no .safetensors"):
    trajectory.open_trajectory(str(tmp_path))
  (tmp_path / "x.safetensors.partial").write_bytes(b"")
  with pytest.raises(metrics.AnalysisError, match="unfinished"):
    trajectory.open_trajectory(str(tmp_path))
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"not a safetensors file")
  with pytest.raises(metrics.AnalysisError, match="corrupt safetensors header"):
    trajectory.open_trajectory(str(junk))


def test_compare_finds_the_first_differing_step_and_bits(tmp_path):
  w = w_bits_from_cells(cells_schedule())
  loss = np.concatenate([[np.nan], np.linspace(5, 4, T)])
  a = write_file(str(tmp_path / "a.safetensors"), w, delta=True, loss=loss)
  b = write_file(str(tmp_path / "b.safetensors"), w, delta=True, loss=loss)
  same = compare.compare(a, b)
  assert same["identical"] and same["first_difference"] is None
  assert same["loss"]["max_abs_diff"] == 0
  assert all(v in (0, None) for v in same["freeze"]["diff"].values())
  w2 = w.copy()
  w2[7, 1, 2] ^= 1  # one bit of W at step 7
  loss2 = loss.copy()
  loss2[9] += 0.25
  c = write_file(str(tmp_path / "c.safetensors"), w2, delta=delta_of(w), loss=loss2)
  diff = compare.compare(a, c)
  keys = {k["key"]: k for k in diff["keys"]}
  assert not diff["identical"] and diff["first_difference"] == {"step": 7, "key": "W"}
  assert keys["W"]["first_diff_step"] == 7
  assert keys["W"]["identical_element_fraction"] == 1 - 1 / w.size
  assert keys["W"]["identical_bit_fraction"] == 1 - 1 / (16 * w.size)
  assert keys["delta_W_prime"]["identical"]  # stored records, untouched
  assert diff["loss"] == {"max_abs_diff": 0.25, "step": 9, "steps_differing": 1}
