"""verify.verify_key: the lab's verification statistics over the one bitwise comparator."""

import numpy as np

from jaxdt import verify
from jaxdt.io import tensorfile
from jaxdt.io import tensorwriter


def _file(path, w, loss):
  writer = tensorwriter.TrajectoryWriter(path, {"W": (np.uint16, w.shape),
                                              "loss": (np.uint16, loss.shape)})
  writer.write_rows("W", 0, w)
  writer.write_rows("loss", 0, loss)
  return writer.finalize()


def test_verify_key_finds_the_first_differing_step_and_counts_bits(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.integers(0x3c00, 0x3c40, size=(9, 3, 4), dtype=np.uint16)  # one binade of bf16
  loss = rng.integers(0x4000, 0x4100, size=(8,), dtype=np.uint16)
  w2, loss2 = w.copy(), loss.copy()
  w2[5, 1, 2] ^= 1  # one ULP at row 5 (step 5: row 0 is step 0)
  w2[7, 0, 0] ^= 0x40  # 64 ULP of the same binade, later
  a = _file(str(tmp_path / "a.safetensors"), w, loss)
  b = _file(str(tmp_path / "b.safetensors"), w2, loss2)
  with tensorfile.TrajectoryReader(a) as ra, tensorfile.TrajectoryReader(b) as rb:
    r = verify.verify_key(ra, rb, "W", first_step=0)
    same = verify.verify_key(ra, rb, "loss", first_step=1)
  assert (r.n_diff, r.total, r.first_diff_step, r.first_row_match) == (2, w.size, 5, True)
  assert not r.identical and r.max_abs_diff_step == 7 and r.max_abs_diff > 0
  assert same.identical and same.first_diff_step is None and same.max_abs_diff == 0.0
