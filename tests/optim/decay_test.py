"""Weight decay in pure bf16 is the identity when lr·wd < 2^-9 (the lab's lr × wd question).

torch's decoupled decay is `p.mul_(1 − lr·wd)`: one f32 product rounded to bf16.
A bf16 value's relative spacing is at least 2^-8, so a relative change under
2^-9 rounds back to p, for every finite bf16 value (subnormals included). At
lr 1e-3 and 3e-4, wd 0.1 is such a change: a bf16 run with wd 0.1 is the wd 0
run, bit for bit, for as many steps as it lasts. docs/findings.md uses this.
"""

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from conftest import single_trace, tiny_config

from jaxdt import probes
from jaxdt.io import tensorfile
from jaxdt.training import loop

BF16 = ml_dtypes.bfloat16


def _finite_bf16():
  x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(BF16)
  return x[np.isfinite(x.astype(np.float32))]


@pytest.mark.parametrize("lr, wd", [(1e-3, 0.1), (3e-4, 0.1), (1e-3, 1.0), (2**-10, 1.0)])
def test_decay_below_two_to_minus_nine_leaves_every_bf16_value_unchanged(lr, wd):
  p = _finite_bf16()
  decayed = (p.astype(np.float32) * np.float32(1 - lr * wd)).astype(BF16)
  np.testing.assert_array_equal(decayed.view(np.uint16), p.view(np.uint16))


def test_decay_above_two_to_minus_nine_moves_values():
  p = _finite_bf16()
  decayed = (p.astype(np.float32) * np.float32(1 - 0.01)).astype(BF16)
  assert (decayed.view(np.uint16) != p.view(np.uint16)).mean() > 0.5


def test_torch_decay_is_the_same_identity():
  torch = pytest.importorskip("torch")
  p = torch.from_numpy(_finite_bf16().view(np.int16)).view(torch.bfloat16)
  for lr, wd in ((1e-3, 0.1), (3e-4, 0.1)):
    q = p.clone()
    q.mul_(1 - lr * wd)  # torch.optim.AdamW's decoupled decay, on the bf16 tensor
    assert torch.equal(q.view(torch.int16), p.view(torch.int16))


def _trajectory(cfg, out):
  r = tensorfile.TrajectoryReader(loop.train(cfg, out, progress=False, log=lambda s: None)
                                  .trajectory)
  return {k: r.read(k) for k in r.keys()}


def test_a_bf16_run_with_wd_point_one_is_the_wd_zero_run_bit_for_bit(tiny_data, tmp_path):
  base = single_trace(tiny_config(tiny_data, steps=8))
  with_wd = lambda wd: dataclasses.replace(base, optim=dataclasses.replace(base.optim,
                                                                           weight_decay=wd))
  zero = _trajectory(with_wd(0.0), str(tmp_path / "wd0"))
  tenth = _trajectory(with_wd(0.1), str(tmp_path / "wd0.1"))
  assert zero.keys() == tenth.keys()
  # The accounting's textbook update names lr·wd·p, so its cosines see a decay
  # that the bf16 lattice never applies; every recorded state is the same.
  textbook = set(probes.keys_with_role("accounting")) - {"adam_replay_match"}
  same = [k for k in zero if k not in textbook]
  assert {"W", "delta_W_prime", "loss", "adam_replay_match"} <= set(same)
  for k in same:  # loss included: every live parameter took the same path too
    np.testing.assert_array_equal(tenth[k], zero[k], err_msg=k)
  # The check can fail: lr·wd = 0.01 > 2^-9 decays the rows, and the file says so.
  strong = _trajectory(with_wd(10.0), str(tmp_path / "wd10"))
  assert not np.array_equal(strong["W"][1:], zero["W"][1:])
