"""bf16_sr and bf16_kahan: their arithmetic against numpy references, and their runs' bytes.

The references here are written from the definitions, by value (float64 and ml_dtypes),
not from the bit tricks of `jaxdt.optim.policies`:

- stochastic rounding of an f32 x: its bf16 neighbours toward zero (t) and away from zero
  (a) found from x's binade, and a with probability (|x| − |t|) / (|a| − |t|), decided by
  the 16 random bits r as r < (|x| − |t|) / (|a| − |t|) · 2^16;
- optimi's Kahan write-back: c ← bf16(c + u), p' ← bf16(p + c), c ← bf16(c + bf16(p − p')),
  each sum in f32 (numpy, which keeps subnormals).

Bounds are stated where they are used; the statistical ones are 5 standard errors of a
binomial, with the variance known exactly from the rounding's definition.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config

from jaxdt import config as config_lib
from jaxdt import probes
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.numerics import lattice
from jaxdt.numerics import precision
from jaxdt.optim import adamw
from jaxdt.optim import policies
from jaxdt.training import loop
from jaxdt.training import runs
from jaxdt.training import step as step_lib
from jaxdt.training import sweep

BF16 = ml_dtypes.bfloat16
QUIET = dict(log=lambda s: None, progress=False)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- numpy references -----------------------------------------------------------------


def np_neighbours(x: np.ndarray) -> tuple:
  """(toward zero, away from zero, spacing) of finite f32 x on the bf16 lattice, float64."""
  x = x.astype(np.float64)
  mag = np.abs(x)
  _, e = np.frexp(mag)  # mag = f · 2^e, f in [0.5, 1): the binade is 2^(e-1)
  spacing = np.ldexp(1.0, np.maximum(e - 1, -126) - 7)  # bf16: 7 stored mantissa bits
  toward = np.floor(mag / spacing) * spacing
  return np.copysign(toward, x), np.copysign(toward + spacing, x), spacing


def np_stochastic_round(x: np.ndarray, rand: np.ndarray) -> np.ndarray:
  """The reference SR of f32 x with 16-bit random numbers `rand`, as bf16."""
  toward, away, spacing = np_neighbours(x)
  frac = (np.abs(x.astype(np.float64)) - np.abs(toward)) / spacing  # in [0, 1), exact
  out = np.where((rand & 0xFFFF) < frac * 65536, away, toward)
  with np.errstate(over="ignore"):
    return out.astype(BF16)  # exact: both are bf16 values (or past the max: inf)


def np_kahan(p0: np.ndarray, updates: np.ndarray) -> tuple:
  """optimi's Kahan write-back over a sequence of updates: (p, c) bf16 after each."""
  p, c = p0.astype(BF16), np.zeros_like(p0, BF16)
  ps, cs = [], []
  f32 = lambda a: a.astype(np.float32)
  for u in updates:
    c = (f32(c) + u).astype(BF16)
    new = (f32(p) + f32(c)).astype(BF16)
    c = (f32(c) + f32((f32(p) - f32(new)).astype(BF16))).astype(BF16)
    p = new
    ps.append(p)
    cs.append(c)
  return np.stack(ps), np.stack(cs)


def _random_f32(rng, n: int) -> np.ndarray:
  """Finite f32 values of every kind: normal over the whole range, tiny and subnormal,
  exact bf16 values, the largest binade, zeros; both signs."""
  bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
  kinds = rng.integers(0, 5, n)
  exp = (bits >> 23) & 0xFF
  bits = np.where(exp == 0xFF, bits & ~np.uint32(0x40000000), bits)  # no inf / NaN
  bits = np.where(kinds == 1, bits & np.uint32(0x80FFFFFF), bits)  # tiny: exponent < 2
  bits = np.where(kinds == 2, bits & np.uint32(0xFFFF0000), bits)  # exact bf16 values
  bits = np.where(kinds == 3, (bits & np.uint32(0x807FFFFF)) | np.uint32(0x7F000000), bits)
  bits = np.where(rng.random(n) < 0.01, bits & np.uint32(0x80000000), bits)  # ±0
  return bits.view(np.float32)


# --- stochastic rounding ----------------------------------------------------------------


def test_sr_gives_only_the_two_neighbours_and_matches_the_reference_bit_for_bit():
  rng = np.random.default_rng(27)
  x = _random_f32(rng, 200_000)
  sr = jax.jit(policies.stochastic_round_bf16)
  toward, away, _ = np_neighbours(x)
  exact = lattice.np_bits(x) & 0xFFFF == 0
  for k in range(4):  # four independent draws of the random bits
    rand = rng.integers(0, 1 << 32, x.shape, dtype=np.uint64).astype(np.uint32)
    got = np.asarray(sr(jnp.asarray(x), jnp.asarray(rand)))
    want = np_stochastic_round(x, rand)
    np.testing.assert_array_equal(lattice.np_bits(got), lattice.np_bits(want))
    g = got.astype(np.float64)
    with np.errstate(over="ignore"):
      away_bf16 = away.astype(BF16).astype(np.float64)
    assert np.all((g == toward) | (g == away_bf16)), k
    np.testing.assert_array_equal(lattice.np_bits(got[exact]),
                                  lattice.np_bits(x[exact].astype(BF16)))  # stays put


def test_sr_keeps_nan_and_inf_and_rounds_past_the_largest_bf16_to_inf():
  big = np.float32(ml_dtypes.finfo(BF16).max) * np.float32(1.001)  # between max and 2^128
  x = np.array([np.nan, -np.nan, np.inf, -np.inf, big, -big], np.float32)
  always = np.full(x.shape, 0, np.uint32)  # r = 0 < any nonzero fraction: away from zero
  got = np.asarray(policies.stochastic_round_bf16(jnp.asarray(x), jnp.asarray(always)))
  assert np.isnan(got[:2]).all() and list(got[2:4]) == [np.inf, -np.inf]
  assert list(got[4:]) == [np.inf, -np.inf]


def test_sr_is_unbiased_over_many_keys():
  # Mean of N draws of SR(x) against x: SR(x) = t + s·B with B ~ Bernoulli(f), so the
  # mean's standard error is s·sqrt(f(1 − f)/N); bound: 5 standard errors per value
  # (all 64 values at once fail by chance with probability < 64 · 6e-7).
  rng = np.random.default_rng(7)
  x = (rng.uniform(-4, 4, 64) * 10.0 ** rng.integers(-30, 30, 64)).astype(np.float32)
  n = 4096
  key = step_lib.sr_key_data(config_lib.ExperimentConfig(precision="bf16_sr"))
  draw = jax.jit(jax.vmap(lambda t: policies.stochastic_round_bf16(
      jnp.asarray(x), policies.sr_bits(key, t, 0, x.shape)).astype(jnp.float32)))
  samples = np.asarray(draw(jnp.arange(1, n + 1)), np.float64)
  toward, _, spacing = np_neighbours(x)
  f = (np.abs(x.astype(np.float64)) - np.abs(toward)) / spacing
  se = spacing * np.sqrt(f * (1 - f) / n)
  err = np.abs(samples.mean(0) - x.astype(np.float64))
  assert np.all(err <= 5 * se), (err / np.maximum(se, 1e-300)).max()
  assert np.all((samples == toward) | (samples == toward + np.copysign(spacing, x)))


def _quarter_ulp_table(rows: int = 2048, dim: int = 4):
  """Params in [1.25, 1.75) (ULP 2^-7) with unit-size gradients of random sign, and
  lr = 2^-9: the first Adam step is lr·sign(g), a quarter of a ULP."""
  rng = np.random.default_rng(3)
  p = jnp.asarray(rng.uniform(1.25, 1.75, (rows, dim)).astype(BF16))
  g = jnp.asarray((rng.choice([-1.0, 1.0], (rows, dim)) * rng.uniform(0.5, 2, (rows, dim)))
                  .astype(BF16))
  return p, g, config_lib.OptimConfig(learning_rate=2.0**-9)


def test_a_quarter_ulp_update_moves_an_element_a_quarter_of_the_time_under_sr_only():
  # Each element moves by one cell with probability 1/4 (its update is a quarter of its
  # ULP); over n elements the moved fraction's standard error is sqrt(3/16 / n), and the
  # bound is 5 of them. Round to nearest (bf16) never moves one. ΔW′ keeps its meaning:
  # cells of the stored bf16 lattice, so a moved element has ΔW′ = −sign(g) exactly.
  p, g, hp = _quarter_ulp_table()
  opt = adamw.torch_adamw(hp).init(p)
  key = step_lib.sr_key_data(config_lib.ExperimentConfig(precision="bf16_sr"))
  new_sr, _ = jax.jit(lambda p, g: policies.sr_step(adamw.form(hp), p, g, opt, key))(p, g)
  new_rn, _ = jax.jit(lambda p, g: adamw.step(hp, p, g, opt))(p, g)
  d_sr = np.asarray(probes.displacement(p, new_sr))
  d_rn = np.asarray(probes.displacement(p, new_rn))
  assert not d_rn.any()
  moved = d_sr != 0
  n = moved.size
  assert abs(moved.mean() - 0.25) <= 5 * np.sqrt(3 / 16 / n), moved.mean()
  np.testing.assert_array_equal(d_sr[moved], -np.sign(np.asarray(g, np.float32))[moved])
  rows_moved = moved.any(axis=1).mean()  # a row of 4 moves unless all 4 stay: 1 − (3/4)^4
  assert abs(rows_moved - (1 - 0.75**4)) <= 5 * np.sqrt(0.68 * 0.32 / moved.shape[0])


def test_kahan_gathers_four_quarter_ulp_updates_into_one_cell():
  # The same quarter-ULP Adam steps, four times with the same gradient (torch's bf16
  # moments make each step a quarter ULP to within about 1%): the compensation holds them
  # until the pending sum passes half a ULP (step 2 or 3), then the element moves by one
  # cell and keeps the remainder; after 4 steps every element has moved exactly once, by
  # one cell. bf16 (round to nearest) has moved none.
  p, g, hp = _quarter_ulp_table(512)
  run = jax.jit(lambda p, g, st, c: policies.kahan_step(adamw.form(hp), p, g, st, c))
  st, comp, q = adamw.torch_adamw(hp).init(p), jax.tree.map(jnp.zeros_like, p), p
  moves = []
  for _ in range(4):
    new, st, comp = run(q, g, st, comp)
    moves.append(np.abs(np.asarray(probes.displacement(q, new))))
    q = new
  assert not moves[0].any() and not moves[3].any()
  np.testing.assert_array_equal(sum(moves), np.ones_like(moves[0]))
  total = np.asarray(lattice.lattice_displacement(p, q))
  np.testing.assert_array_equal(total, -np.sign(np.asarray(g, np.float32)))
  rn = jax.jit(lambda p, g, st: adamw.step(hp, p, g, st))
  q_rn, st_rn = p, adamw.init(p)
  for _ in range(4):
    q_rn, st_rn = rn(q_rn, g, st_rn)
  assert np.array_equal(lattice.np_bits(np.asarray(q_rn)), lattice.np_bits(np.asarray(p)))


# --- Kahan summation ----------------------------------------------------------------------


def test_kahan_pair_matches_the_reference_and_tracks_the_f32_sum_where_bf16_stalls():
  # 10,000 updates of mean 0.4 · 2^-9 (each below half a ULP for |p| >= 1) on 64 values
  # starting in [1, 2). Bit for bit against the numpy reference. The pair p + c stays
  # within 1/4 of a bf16 ULP of p of the f32 running sum at every step (measured: 0.108 at
  # worst): its error is a random walk of the bf16 buffer's own roundings, each at most
  # 2^-9 of a ULP (|c + u| < 1 ULP), about 0.001·sqrt(steps) ULP. Plain bf16 (round to
  # nearest) never moves and ends over 50 ULPs (about 125) from the sum.
  rng = np.random.default_rng(11)
  p0 = rng.uniform(1, 2, 64).astype(BF16)
  u = (rng.uniform(-0.2, 1.0, (10_000, 64)) * 2.0**-9).astype(np.float32)

  def body(carry, ui):
    p, c = carry
    p, c = policies.kahan_add(p, c, ui)
    return (p, c), (p, c)

  start = (jnp.asarray(p0, jnp.float32), jnp.zeros(64, jnp.float32))
  _, (ps, cs) = jax.jit(lambda s, u: jax.lax.scan(body, s, u))(start, jnp.asarray(u))
  ref_p, ref_c = np_kahan(p0, u)
  np.testing.assert_array_equal(lattice.np_bits(np.asarray(ps).astype(BF16)),
                                lattice.np_bits(ref_p))
  np.testing.assert_array_equal(lattice.np_bits(np.asarray(cs).astype(BF16)),
                                lattice.np_bits(ref_c))
  s32 = np.cumsum(np.concatenate([p0.astype(np.float32)[None], u]), 0, np.float32)[1:]
  pair = ref_p.astype(np.float64) + ref_c.astype(np.float64)
  ulp = np.asarray(lattice.ulp(jnp.asarray(ref_p)))
  assert np.max(np.abs(pair - s32) / ulp) <= 1 / 4
  plain = p0
  for ui in u[:200]:  # bf16 round to nearest: stalled from the first update on
    plain = (plain.astype(np.float32) + ui).astype(BF16)
  assert np.array_equal(lattice.np_bits(plain), lattice.np_bits(p0))
  assert np.min(np.abs(s32[-1] - p0.astype(np.float32)) / ulp[-1]) > 50


# --- Runs: bytes for any chunk size, after a resume, as a sweep member --------------------


def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _cfg(tiny_data, precision_name: str, chunk: int, checkpoint_steps=(6,)):
  """12 tiny steps (one layer, the freeze probes: a smaller program to compile), in
  chunks of `chunk` cut at the checkpoints. Chunks of 3 with a checkpoint at 6 and
  chunks of 4 without are one compiled length each."""
  cfg = tiny_config(tiny_data, precision=precision_name)
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, num_layers=1),
      probes=dataclasses.replace(cfg.probes, names=PROBE_NAMES),
      store=dataclasses.replace(cfg.store, chunk_steps=chunk, checkpoint_steps=checkpoint_steps))


PROBE_NAMES = ("W", "delta_W_prime", "last_motion_step", "loss")


@pytest.fixture(scope="module")
def sr_runs(tiny_data, tmp_path_factory):
  """bf16_sr, 12 steps: chunks of 3 (checkpoint at 6) and of 4; {name: (cfg, dir)}."""
  root = tmp_path_factory.mktemp("sr")
  out = {}
  for name, chunk, marks in (("c3", 3, (6,)), ("c4", 4, ())):
    cfg = _cfg(tiny_data, "bf16_sr", chunk, marks)
    loop.train(cfg, str(root / name), **QUIET)
    out[name] = (cfg, str(root / name))
  return out


def _traj(run) -> str:
  cfg, d = run
  return _sha(os.path.join(d, cfg.store.trajectory_name))


def test_sr_run_bytes_do_not_depend_on_the_chunk_size(sr_runs):
  assert _traj(sr_runs["c3"]) == _traj(sr_runs["c4"])


def _stopped(cfg, out: str, stop_after: int) -> dict:
  """Runs `cfg` into `out` until `stop_after` (unfinished, as if killed); the arrays of
  its checkpoint at 6 (a resume restarts there)."""
  assert loop.train(cfg, out, stop_after=stop_after, **QUIET) is None
  ckpt = dict(checkpoints.intact_checkpoints(os.path.join(out, "checkpoints")))[6]
  return load_file(os.path.join(ckpt, checkpoints.CHECKPOINT_ARRAYS))


def test_sr_run_resumed_after_a_stop_has_the_same_bytes(sr_runs, tmp_path):
  cfg, _ = sr_runs["c3"]
  out = str(tmp_path / "resumed")
  arrays = _stopped(cfg, out, 9)  # resumes from step 6: steps 7-9 run again
  np.testing.assert_array_equal(arrays[".policy_state['sr_key']"], step_lib.sr_key_data(cfg))
  loop.train(cfg, out, resume=True, **QUIET)
  assert _sha(os.path.join(out, cfg.store.trajectory_name)) == _traj(sr_runs["c3"])


def test_a_resume_with_another_sr_seed_or_policy_is_refused_field_by_field(sr_runs, tmp_path):
  cfg, _ = sr_runs["c3"]
  out = str(tmp_path / "stopped")
  _stopped(cfg, out, 6)
  for other, field in ((dataclasses.replace(cfg, sr_seed=7), "sr_seed: the run has null"),
                       (dataclasses.replace(cfg, precision="bf16_kahan"),
                        'precision: the run has "bf16_sr", the flags say "bf16_kahan"')):
    with pytest.raises(disk.StoreError, match="cannot resume") as e:
      loop.train(other, out, resume=True, **QUIET)
    assert field in str(e.value)


def test_sr_sweep_member_has_its_solo_run_bytes(sr_runs, tmp_path):
  # One more compilation (the two-member program); the members' SR keys are traced state.
  cfg, _ = sr_runs["c3"]
  root = str(tmp_path / "sweep")
  sweep.train_sweep(cfg, "seed=42,1", root, runs.Options(progress=False), log=lambda s: None)
  names = [m.name for m in sweep.members(cfg, "seed=42,1")]
  shas = [_sha(os.path.join(root, n, cfg.store.trajectory_name)) for n in names]
  assert cfg.seed == 42 and shas[0] == _traj(sr_runs["c3"]) and shas[1] != shas[0]


def test_kahan_run_bytes_do_not_depend_on_the_chunk_size_and_survive_a_resume(tiny_data,
                                                                               tmp_path):
  shas = []
  for chunk, marks in ((3, (6,)), (4, ())):
    cfg = _cfg(tiny_data, "bf16_kahan", chunk, marks)
    loop.train(cfg, str(tmp_path / f"c{chunk}"), **QUIET)
    shas.append(_sha(str(tmp_path / f"c{chunk}" / cfg.store.trajectory_name)))
  cfg = _cfg(tiny_data, "bf16_kahan", 3)
  out = str(tmp_path / "resumed")
  comp = _stopped(cfg, out, 9)[".policy_state['kahan']['embedding']"]
  assert comp.dtype == BF16 and np.any(comp.astype(np.float32) != 0)
  loop.train(cfg, out, resume=True, **QUIET)
  shas.append(_sha(os.path.join(out, cfg.store.trajectory_name)))
  assert shas[0] == shas[1] == shas[2]


# --- Bad input ----------------------------------------------------------------------------


def test_an_unknown_precision_is_one_line_listing_the_policies_and_exit_2():
  listed = ", ".join(precision.POLICIES)
  assert tuple(precision.POLICIES) == config_lib.PRECISIONS
  with pytest.raises(ValueError, match=f"is not one of {listed}"):
    config_lib.ExperimentConfig(precision="bf16_fast")
  with pytest.raises(ValueError, match="only read by --precision=bf16_sr"):
    config_lib.ExperimentConfig(precision="bf16", sr_seed=3)
  for flag in ("--precision=bf16_fast", "--set=precision=bf16_fast"):
    r = subprocess.run([sys.executable, "run.py", "--experiment=crucible1", flag],
                       cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(p in lines[0] for p in precision.POLICIES), lines
