"""The bf16 copy's motion: exact, policy-blind, and blind to sub-rounding creep of an f32 master."""

import ml_dtypes
import numpy as np
import pytest

from jaxdt.analysis import copy_motion

BF16 = ml_dtypes.bfloat16


def _next_bf16_up(x: np.ndarray) -> np.ndarray:
  """The bf16 neighbour above each positive bf16 value (one cell up)."""
  bits = np.asarray(x, BF16).view(np.uint16) + np.uint16(1)
  return bits.view(BF16)


def test_identical_tables_do_not_move():
  w = np.random.default_rng(0).normal(0, 0.02, (5, 8)).astype(BF16)
  got = copy_motion.copy_motion(w, w.copy())
  assert (got.rows_moved, got.elements_moved, got.rows) == (0.0, 0.0, 5)


def test_one_cell_in_one_element_moves_its_row():
  w = np.abs(np.random.default_rng(1).normal(0, 0.02, (4, 8))).astype(BF16) + BF16(1e-3)
  after = w.copy()
  after[2, 5] = _next_bf16_up(w[2, 5])
  got = copy_motion.copy_motion(w, after)
  assert got.rows_moved == 0.25 and got.elements_moved == 1 / 32


def test_an_f32_master_moves_its_copy_only_once_the_creep_crosses_a_rounding_boundary():
  """Under mixed the forward's bf16 copy is the master rounded to nearest even: a creep of
  a quarter cell leaves the copy alone, a creep past the midpoint moves it one cell."""
  start = np.float32(0.5)  # bf16 cell at 0.5: 2^-8
  cell = np.float32(2.0 ** -8)
  before = np.full((1, 4), start, np.float32)
  assert copy_motion.copy_motion(before, before + cell / 4).rows_moved == 0.0
  crept = before.copy()
  crept[0, 1] += np.float32(0.75) * cell
  got = copy_motion.copy_motion(before, crept)
  assert got.rows_moved == 1.0 and got.elements_moved == 0.25
  assert copy_motion.bf16_copy_bits(crept)[0, 1] == copy_motion.bf16_copy_bits(before)[0, 1] + 1


def test_the_copy_rounds_to_nearest_even_at_the_midpoint():
  x = np.float32(1.0) + np.float32(2.0 ** -8)  # halfway between 1 and 1 + 2^-7: ties to even (1)
  assert copy_motion.bf16_copy_bits(np.array([x])) == np.array([0x3F80], np.uint16)
  y = np.float32(1.0) + np.float32(3 * 2.0 ** -8)  # halfway between 1+2^-7 and 1+2^-6: even above
  assert copy_motion.bf16_copy_bits(np.array([y])) == np.array([0x3F82], np.uint16)


def test_signed_zeros_are_one_value():
  before = np.array([[0.0, 1.0]], np.float32)
  after = np.array([[-0.0, 1.0]], np.float32)
  assert copy_motion.copy_motion(before, after).rows_moved == 0.0
  after[0, 0] = np.float32(-2.0 ** -133)  # the smallest bf16 subnormal: a move
  assert copy_motion.copy_motion(before, after).elements_moved == 0.5


def test_bf16_and_f32_inputs_of_the_same_values_agree():
  w = np.random.default_rng(2).normal(0, 0.02, (6, 4)).astype(BF16)
  after = w.copy()
  after[0, 0] = -w[0, 0]
  a = copy_motion.copy_motion(w, after)
  b = copy_motion.copy_motion(w.astype(np.float32), after.astype(np.float32))
  assert a == b and a.rows_moved == pytest.approx(1 / 6)


@pytest.mark.parametrize("shapes", [((2, 3), (3, 2)), ((4,), (4,)), ((0, 4), (0, 4))])
def test_tables_that_do_not_pair_are_refused(shapes):
  with pytest.raises(ValueError, match="two \\[rows, D\\] tables"):
    copy_motion.copy_motion(np.zeros(shapes[0], np.float32), np.zeros(shapes[1], np.float32))
