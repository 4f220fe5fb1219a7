"""Same config, same bytes: repeat runs, any chunk size, and kill + resume."""

import dataclasses
import os

import pytest

from conftest import notes_of, tiny_config

from jaxdt.io import disk
from jaxdt.io import metadata
from jaxdt.training import loop

STEPS = 12  # checkpoints at 5 and 9 (tiny_config)


def _bytes(result):
  with open(result.trajectory, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
  cfg = tiny_config(tiny_data, steps=STEPS)
  return cfg, loop.train(cfg, str(tmp_path_factory.mktemp("ref")), progress=False)


def test_same_config_twice_gives_identical_bytes(reference, tmp_path):
  cfg, ref = reference
  again = loop.train(cfg, str(tmp_path), progress=False)
  assert _bytes(again) == _bytes(ref)
  skip = {"date", "wall_time_s"}
  a = {k: v for k, v in ref.metadata.items() if k not in skip}
  b = {k: v for k, v in again.metadata.items() if k not in skip}
  assert a == b


@pytest.mark.parametrize("chunk", [1, 7, STEPS])
def test_chunk_size_changes_nothing(reference, tmp_path, chunk):
  cfg, ref = reference
  cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, chunk_steps=chunk))
  assert _bytes(loop.train(cfg, str(tmp_path), progress=False)) == _bytes(ref)


def test_killed_after_checkpoint_and_resumed_gives_the_same_bytes(reference, tmp_path):
  cfg, ref = reference
  out = str(tmp_path)
  # "Kill" after step 7: the last complete checkpoint is step 5; rows 6-7 are on
  # disk but will be rewritten by the resumed run.
  assert loop.train(cfg, out, progress=False, stop_after=7) is None
  assert not os.path.exists(os.path.join(out, cfg.store.trajectory_name))
  assert os.path.exists(os.path.join(out, cfg.store.trajectory_name + ".partial"))
  assert not metadata.is_complete(out, cfg.store.trajectory_name)
  assert metadata.read_metadata(out)["completed"] is False
  resumed = loop.train(cfg, out, resume=True, progress=False)
  assert _bytes(resumed) == _bytes(ref)
  assert metadata.is_complete(out, cfg.store.trajectory_name)


def test_resume_without_checkpoint_restarts_from_step_0_and_says_so(reference, tmp_path):
  cfg, ref = reference
  said = []
  result = loop.train(cfg, str(tmp_path), resume=True, progress=False, log=said.append)
  said = notes_of(said)
  assert said == [f"{tmp_path} has no run to resume; starting from step 0"]
  assert _bytes(result) == _bytes(ref)


def test_a_fresh_run_never_overwrites_an_unfinished_or_finished_one(reference, tmp_path):
  cfg, ref = reference
  out = str(tmp_path)
  assert loop.train(cfg, out, progress=False, stop_after=6) is None
  partial = os.path.join(out, cfg.store.trajectory_name + ".partial")
  before = open(partial, "rb").read()
  with pytest.raises(disk.StoreError, match="unfinished crucible1 run; pass --resume"):
    loop.train(cfg, out, progress=False)
  assert open(partial, "rb").read() == before
  with pytest.raises(disk.StoreError, match="holds a finished crucible1 run; choose another"):
    loop.train(cfg, ref.run_dir, progress=False)
