"""Settings that change bits are config fields, resolved on the host, recorded and memo-keyed."""

import dataclasses

import numpy as np

from conftest import single_trace, tiny_config

from jaxdt.config import ModelConfig
from jaxdt.io import tensorfile
from jaxdt.training import loop
from jaxdt.training import step as step_lib

QUIET = dict(progress=False, log=lambda s: None)


def _with_block(cfg, rows):
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, nll_block_rows=rows))


def test_auto_resolves_by_backend():
  assert step_lib.arithmetic(ModelConfig(), "cpu")[1] == 512
  assert step_lib.arithmetic(ModelConfig(), "gpu")[1] == 0  # one block
  assert step_lib.arithmetic(ModelConfig(nll_block_rows=15), "gpu")[1] == 15


def _w_bits(result):
  with tensorfile.TrajectoryReader(result.trajectory) as r:
    return r.read("W")


def test_block_rows_is_in_the_key_the_metadata_and_the_bits(tiny_data, tmp_path):
  base = single_trace(tiny_config(tiny_data, steps=30))
  auto = loop.train(base, str(tmp_path / "auto"), **QUIET)
  # The CPU default is 512 rows: spelled out, the same program and the same bits.
  same = loop.train(_with_block(base, 512), str(tmp_path / "512"), **QUIET)
  # 15 target rows (one sequence) per block: another f32 summation order of dE.
  other = loop.train(_with_block(base, 15), str(tmp_path / "15"), **QUIET)
  assert auto.metadata["nll_block_rows"] == same.metadata["nll_block_rows"] == 512
  assert other.metadata["nll_block_rows"] == 15
  np.testing.assert_array_equal(_w_bits(auto), _w_bits(same))
  assert not np.array_equal(_w_bits(auto), _w_bits(other))
  keys = [k for k in step_lib._PROGRAMS if '"nll_block_rows": 15' in k[0]]
  assert keys and keys[0][1] == (step_lib.arithmetic(base.model)[0], 15)
