"""Experiment configs against their seeds (docs/experiments.md), and tiny runs of each layout.

Config tests check the full-size values: hyperparameters, probes, file keys,
dtypes, shapes and checkpoint steps. Tiny runs (vocab 256, D 32, batch 4 x 16,
chunk_steps 1 so each experiment compiles one scan) check what lands on disk,
the Thimble 9 verification against a Thimble 8 file, and Thimble 1's
accounting report.
"""

import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import experiments
from conftest import TINY_VOCAB

from jaxdt import config as config_lib
from jaxdt.io import metadata
from jaxdt.io import rundir
from jaxdt.io import tensorfile
from jaxdt.training import loop
from jaxdt import probes
from jaxdt import verify
from jaxdt.analysis import lab_accounting

N_DEAD, VOCAB, D = 3699, 10000, 64  # the lab's sizes
BF16, U16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16), np.dtype(np.float32)
TINY_STEPS = 6


def _specs(cfg, rows):
  dims = probes.Dims(rows=rows, hidden=D, param_dtype=jnp.bfloat16)
  return {k: (np.dtype(dt), shape) for k, (dt, shape) in
          probes.of_config(cfg).file_specs(dims, cfg.steps).items()}


def tiny(name, paths, steps=TINY_STEPS, checkpoint_steps=None):
  """Experiment `name` shrunk to the tiny data; its own checkpoints inside `steps` by default."""
  cfg = config_lib.with_steps(experiments.load(name), steps, checkpoint_steps)
  return dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, vocab_size=TINY_VOCAB, hidden_dim=32, max_seq_len=16),
      data=dataclasses.replace(cfg.data, batch_size=4, seq_len=16, corpus_path=paths["corpus"],
                               tokenizer_path=paths["tokenizer"], dead_mask_path=paths["mask"]),
      store=dataclasses.replace(cfg.store, chunk_steps=1))


# --- Configs ----------------------------------------------------------------


@pytest.mark.parametrize("name", experiments.NAMES)
def test_config_round_trips_through_json_and_is_frozen(name):
  cfg = experiments.load(name)
  assert cfg.name == name
  assert config_lib.from_json(config_lib.ExperimentConfig, config_lib.to_json(cfg)) == cfg
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.steps = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.store.checkpoint_steps = ()
  probes.of_config(cfg)  # every probe exists, no two write one key


# name: (variant, scheme, double shift, steps, lr, wd, rows, trajectory, checkpoints)
SEEDS = {
    "thimble1": ("gpt2", "windows", True, 1000, 1e-3, 0.0, "all", "thimble_1.safetensors",
                 (500,)),
    "thimble6": ("gpt2", "windows", True, 6000, 1e-3, 0.0, "all", "thimble_6.safetensors",
                 (1000, 2000, 3000, 4000, 5000)),
    "thimble8": ("encoder", "chunks", False, 4000, 3e-4, 0.1, "dead",
                 "thimble_8_trajectory.safetensors",
                 (0, 1, 10, 100, 500, 1000, 2000, 3000, 3500, 4000)),
    "thimble9": ("encoder", "chunks", False, 10000, 3e-4, 0.1, "dead",
                 "thimble_9_trajectory.safetensors", tuple(range(0, 10001, 1000))),
    "crucible1": ("encoder", "chunks", False, 5000, 1e-3, 0.0, "dead",
                  "crucible_1_trajectory.safetensors", (1000, 2000, 3000, 4000)),
    "crucible3": ("encoder", "chunks", False, 500, 1e-3, 0.0, "all",
                  "crucible_3_trajectory.safetensors", ()),
    "crucible4": ("encoder", "chunks", False, 5000, 1e-3, 0.0, "all",
                  "crucible_4_trajectory.safetensors", (1000, 2000, 3000, 4000)),
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_hyperparameters_are_the_seeds(name):
  variant, scheme, shift, steps, lr, wd, rows, traj, ckpts = SEEDS[name]
  cfg = experiments.load(name)
  assert (cfg.model.variant, cfg.data.scheme, cfg.data.double_shift_labels) == (
      variant, scheme, shift)
  assert (cfg.steps, cfg.optim.learning_rate, cfg.optim.weight_decay) == (steps, lr, wd)
  assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.999, 1e-8)
  assert (cfg.seed, cfg.precision, cfg.data.batch_size, cfg.data.seq_len) == (42, "bf16", 128, 128)
  m = cfg.model
  assert (m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads, m.max_seq_len, m.init_std) == (
      VOCAB, D, 2, 2, 128, 0.02)
  assert (cfg.probes.rows, cfg.store.trajectory_name, cfg.store.checkpoint_steps) == (
      rows, traj, ckpts)


def test_label_shift_default_is_true_next_token():
  assert config_lib.DataConfig().double_shift_labels is False


def test_thimble1_records_the_seeds_keys_dtypes_and_shapes():
  cfg = experiments.load("thimble1")
  t = (1001, VOCAB, D)
  assert _specs(cfg, VOCAB) == {"W": (BF16, t), "grad_W": (BF16, t), "momentum_W": (F32, t),
                                "variance_W": (F32, t), "losses": (F32, (1001,))}
  assert cfg.probes.loss_initial is None  # losses[0] = NaN


def test_thimble6_records_every_bf16_tensor_as_exact_bits():
  cfg = experiments.load("thimble6")
  t = (6001, VOCAB, D)
  assert _specs(cfg, VOCAB) == {"W": (U16, t), "grad_W": (U16, t), "momentum_W": (U16, t),
                                "variance_W": (U16, t), "losses": (F32, (6001,))}


def test_thimble8_records_the_seeds_keys_dtypes_and_shapes():
  cfg = experiments.load("thimble8")
  t = (4001, N_DEAD, D)
  assert _specs(cfg, N_DEAD) == {"W": (U16, t), "m": (F32, t), "v": (F32, t), "g": (F32, t),
                                 "loss": (F32, (4001,))}
  assert cfg.probes.loss_initial == 0.0
  assert cfg.store.notes == "Dead tokens only. W stored as uint16 (bfloat16 bit pattern)."


def test_thimble9_is_thimble8s_training_recording_w_and_loss():
  t8, t9 = experiments.load("thimble8"), experiments.load("thimble9")
  for part in ("model", "optim", "data", "seed", "precision"):
    assert getattr(t9, part) == getattr(t8, part), part
  assert _specs(t9, N_DEAD) == {"W": (U16, (10001, N_DEAD, D)), "loss": (F32, (10001,))}
  assert t9.probes.loss_initial == 0.0


def test_thimble9_verification_is_the_seeds_mode():
  spec = experiments.verification("thimble9")
  cfg = verify.verification_config(experiments.load("thimble9"), spec)
  assert (cfg.steps, cfg.store.checkpoint_steps) == (1000, (0, 100, 500, 1000))
  assert spec.keys == ("W", "loss") and spec.reference_title == "Thimble 8"
  t8 = experiments.load("thimble8")
  for part in ("model", "optim", "data", "seed", "precision"):
    assert getattr(cfg, part) == getattr(t8, part), part
  with pytest.raises(ValueError, match="no verification mode"):
    experiments.verification("thimble1")


def test_crucible3_and_4_record_all_rows_and_h_mean():
  for name, steps in (("crucible3", 500), ("crucible4", 5000)):
    cfg = experiments.load(name)
    assert _specs(cfg, VOCAB) == {"W": (U16, (steps + 1, VOCAB, D)), "h_mean": (F32, (steps, D)),
                                  "loss": (F32, (steps + 1,))}
  c1, c3 = experiments.load("crucible1"), experiments.load("crucible3")
  assert (c3.model, c3.optim, c3.data, c3.seed) == (c1.model, c1.optim, c1.data, c1.seed)


# --- Tiny runs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def thimble8_run(tiny_data, tmp_path_factory):
  cfg = tiny("thimble8", tiny_data)
  return cfg, loop.train(cfg, str(tmp_path_factory.mktemp("t8")), progress=False)


@pytest.fixture(scope="module")
def thimble1_run(tiny_data, tmp_path_factory):
  cfg = tiny("thimble1", tiny_data, checkpoint_steps=())
  return cfg, loop.train(cfg, str(tmp_path_factory.mktemp("t1")), progress=False)


def test_tiny_thimble8_file(thimble8_run):
  cfg, result = thimble8_run
  r = tensorfile.TrajectoryReader(result.trajectory)
  n = r.shape("dead_indices")[0]
  t = (TINY_STEPS + 1, n, 32)
  for key, code, shape in (("W", "U16", t), ("m", "F32", t), ("v", "F32", t), ("g", "F32", t),
                           ("loss", "F32", (TINY_STEPS + 1,)), ("dead_mask", "BOOL", (TINY_VOCAB,)),
                           ("dead_indices", "I64", (n,))):
    assert (r.raw_dtype(key), r.shape(key)) == (code, shape), key
  loss = r.read("loss")
  assert loss[0] == 0.0 and np.all(loss[1:] > 0)
  for key in ("m", "v", "g"):  # nothing before step 1
    assert not r.rows(key, 0, 1).any() and r.rows(key, 1, 2).any(), key
  # m and v are f32 copies of bf16 state: exact bf16 values.
  m = r.read("m")
  np.testing.assert_array_equal(m, m.astype(ml_dtypes.bfloat16).astype(np.float32))
  done = sorted(os.listdir(os.path.join(result.run_dir, rundir.CHECKPOINT_DIR)))
  assert done == ["step_000000", "step_000001"]  # the lab's steps <= 6
  assert result.metadata["experiment"] == "Thimble 8"


def test_thimble9_verification_passes_bitwise_against_thimble8(thimble8_run, tiny_data, tmp_path):
  _, t8 = thimble8_run
  spec = dataclasses.replace(experiments.verification("thimble9"), steps=5,
                             checkpoint_steps=(0, 1, 5))
  cfg = verify.verification_config(tiny("thimble9", tiny_data), spec)
  text, ok = verify.run(cfg, spec, t8.trajectory, str(tmp_path / "verification"), progress=False)
  assert ok, text
  n = tensorfile.TrajectoryReader(t8.trajectory).shape("W")[1]
  assert text.splitlines()[:7] == [
      "=" * 60, "VERIFICATION: Comparing to Thimble 8", "=" * 60,
      f"Thimble 9 W shape: torch.Size([6, {n}, 32])",
      f"Thimble 8 W subset shape: torch.Size([6, {n}, 32])", "",
      "✓ BITWISE IDENTICAL: Thimble 9 matches Thimble 8 exactly!"]
  assert "Loss values bitwise identical: True (6 values)" in text
  # The short run is kept as a complete run folder.
  assert metadata.is_complete(str(tmp_path / "verification"), cfg.store.trajectory_name)
  # A tampered reference: one W bit at step 3, one loss at step 4.
  bad = str(tmp_path / "tampered.safetensors")
  shutil.copy(t8.trajectory, bad)
  os.chmod(bad, 0o644)
  _flip(bad, "W", row=3, index=5, xor=1)
  _flip(bad, "loss", row=4, index=0, xor=1 << 20)
  ours = os.path.join(str(tmp_path / "verification"), cfg.store.trajectory_name)
  results = verify.compare(ours, bad, spec, cfg.steps)
  assert not verify.passed(results)
  text = verify.format_report(results, spec)
  assert "✗ MISMATCH: 1 / " in text
  assert "First difference at step: 3" in text
  assert "Step 0 (initialization) matches: True" in text
  assert "Loss values match (within tolerance): False" in text
  assert re.search(r"Loss values bitwise identical: False \(1 / 6 differ, first at step 4", text)
  assert text.endswith("Verification FAILED: W (1 differing, first at step 3), "
                       "loss (1 differing, first at step 4) differ.")


def _flip(path, key, row, index, xor):
  """XORs the bits of one element of row `row` of `key`, in place (a tampered reference)."""
  with tensorfile.TrajectoryReader(path) as r:
    a = r.rows(key, row, row + 1)
  bits = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32).reshape(-1)
  bits[index] ^= xor
  with open(path, "r+b") as f:
    header_len = int.from_bytes(f.read(8), "little")
    begin = json.loads(f.read(header_len))[key]["data_offsets"][0]
    f.seek(8 + header_len + begin + row * a.nbytes)
    f.write(bits.tobytes())


def test_verification_refuses_missing_or_incompatible_references(thimble1_run, thimble8_run,
                                                                  tiny_data, tmp_path):
  spec = experiments.verification("thimble9")
  cfg = verify.verification_config(tiny("thimble9", tiny_data), spec, steps=TINY_STEPS)
  expected = {"W": (U16, (TINY_STEPS + 1, 58, 32)), "loss": (F32, (TINY_STEPS + 1,))}
  with pytest.raises(verify.VerifyError, match="does not exist"):
    verify.check_reference(str(tmp_path / "none.safetensors"), spec, expected)
  with pytest.raises(verify.VerifyError, match="needs --verify_against"):
    verify.run(cfg, spec, None, str(tmp_path / "v"))
  with pytest.raises(verify.VerifyError, match="same model and data"):  # a Thimble 1 file
    verify.check_reference(thimble1_run[1].trajectory, spec, expected)
  t8 = thimble8_run[1].trajectory
  with pytest.raises(verify.VerifyError, match="has no 'h_mean'"):
    verify.check_reference(t8, dataclasses.replace(spec, keys=("W", "h_mean")), expected)
  longer = dict(expected, W=(U16, (TINY_STEPS + 5, 58, 32)))
  with pytest.raises(verify.VerifyError, match="this run needs its first 11"):
    verify.check_reference(t8, spec, longer)
  wider = dict(expected, W=(U16, (TINY_STEPS + 1, 58, 64)))
  with pytest.raises(verify.VerifyError, match="same model and data"):
    verify.check_reference(t8, spec, wider)
  with pytest.raises(verify.VerifyError, match="other dead rows"):
    verify.check_reference(t8, spec, expected, np.arange(3))
  assert not os.path.exists(tmp_path / "v")  # refused before any training


def test_tiny_thimble1_file(thimble1_run):
  import torch  # the lab's loader opens the file, BF16 included
  from safetensors.torch import load_file
  cfg, result = thimble1_run
  r = tensorfile.TrajectoryReader(result.trajectory)
  t = (TINY_STEPS + 1, TINY_VOCAB, 32)
  for key, code in (("W", "BF16"), ("grad_W", "BF16"), ("momentum_W", "F32"),
                    ("variance_W", "F32")):
    assert (r.raw_dtype(key), r.shape(key)) == (code, t), key
  losses = r.read("losses")
  assert r.raw_dtype("losses") == "F32" and losses.shape == (TINY_STEPS + 1,)
  assert np.isnan(losses[0]) and np.all(np.isfinite(losses[1:]))
  # HF GPT2's loss is f32 (it upcasts the logits): not rounded to bf16 like TinyLM's.
  assert np.any(losses[1:] != losses[1:].astype(ml_dtypes.bfloat16).astype(np.float32))
  assert not r.rows("grad_W", 0, 1).any() and r.rows("grad_W", 1, 2).any()
  lab = load_file(result.trajectory)
  assert lab["W"].dtype == torch.bfloat16 and lab["grad_W"].dtype == torch.bfloat16
  assert lab["momentum_W"].dtype == torch.float32
  ints = {"vocab_size": TINY_VOCAB, "hidden_dim": 32, "n_layers": 2, "n_heads": 2,
          "num_steps": TINY_STEPS, "batch_size": 4, "seed": 42}
  for key, value in ints.items():
    assert lab[key].dtype == torch.int64 and lab[key].shape == () and lab[key].item() == value
  floats = {"learning_rate": 1e-3, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
            "adam_epsilon": 1e-8, "init_scale": 0.02}
  for key, value in floats.items():
    assert lab[key].dtype == torch.float32 and lab[key].item() == np.float32(value), key
  assert lab["n_live"].item() + lab["n_dead"].item() == TINY_VOCAB
  assert lab["n_dead"].item() == r.shape("dead_indices")[0]


def test_thimble1_accounting_report_prints_the_seeds_lines(thimble1_run):
  cfg, result = thimble1_run
  with tensorfile.TrajectoryReader(result.trajectory) as r:
    assert lab_accounting.has_accounting_inputs(r)
    rows = lab_accounting.accounting_rows(r, cfg.optim)
    text = lab_accounting.format_accounting(rows)
  assert [row.t for row in rows] == [1]  # the lab's steps <= 6
  assert all(row.replay_equal == row.total == TINY_VOCAB * 32 for row in rows)
  lines = text.splitlines()
  assert lines[:2] == ["Validating Adam accounting...", ""]
  assert re.fullmatch(r"t=  1: ratio=\d\.\d{3}, cosine=\+\d\.\d{3}   exact replay: "
                      r"8,192 / 8,192 bitwise \(100\.000%\)", lines[2]), lines[2]
  assert rows[0].cosine > 0.99 and abs(rows[0].ratio - 1) < 0.05  # the lab's t=1: 1.012, +1.000
  assert "(Ratio should be ~1.0, cosine should be ~1.0 for perfect match)" in lines
  assert lines[-1] == "✓ Validation complete"
  more = lab_accounting.accounting_rows(tensorfile.TrajectoryReader(result.trajectory), cfg.optim,
                                steps=(1, 2, 5, 50))
  assert [row.t for row in more] == [1, 2, 5]


def test_tiny_thimble6_stores_thimble1s_bf16_tensors_as_bits(thimble1_run, tiny_data, tmp_path):
  steps = 3
  cfg6 = tiny("thimble6", tiny_data, steps=steps)
  r6 = tensorfile.TrajectoryReader(loop.train(cfg6, str(tmp_path), progress=False).trajectory)
  r1 = tensorfile.TrajectoryReader(thimble1_run[1].trajectory)
  for key in ("W", "grad_W", "momentum_W", "variance_W"):
    assert r6.raw_dtype(key) == "U16" and r6.shape(key) == (steps + 1, TINY_VOCAB, 32), key
    one = r1.rows(key, 0, steps + 1)
    if r1.raw_dtype(key) == "F32":  # Thimble 1's .float() of the bf16 state
      one = one.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(r6.rows(key, 0, steps + 1), one, err_msg=key)
  np.testing.assert_array_equal(r6.read("losses").view(np.uint32),
                                r1.rows("losses", 0, steps + 1).view(np.uint32))
  assert {"live_mask", "live_ids", "dead_ids", "dead_mask", "n_live"} <= set(r6.keys())
  np.testing.assert_array_equal(r6.read("dead_ids"), r6.read("dead_indices"))
  assert r6.read("live_mask").sum() + r6.read("dead_mask").sum() == TINY_VOCAB


# --- run.py flags -------------------------------------------------------------


@pytest.fixture
def flags_of():
  import run  # pylint: disable=g-import-not-at-top
  def parse(*argv):
    run.FLAGS.unparse_flags()
    run.FLAGS(["run.py", *argv])
    return run
  yield parse
  run.FLAGS.unparse_flags()


def test_run_flags_label_shift_rows_probes_and_verification_guards(flags_of):
  run = flags_of("--experiment=thimble1")
  assert run.experiment_config("thimble1").data.double_shift_labels is True
  run = flags_of("--experiment=thimble1", "--nodouble_shift_labels")
  assert run.experiment_config("thimble1").data.double_shift_labels is False
  run = flags_of("--experiment=crucible1", "--rows=all", "--probes=W,h_mean,loss")
  p = run.experiment_config("crucible1").probes
  assert (p.rows, p.names) == ("all", ("W", "h_mean", "loss"))
  run = flags_of("--experiment=crucible1", "--probes=W,nope")
  with pytest.raises(ValueError, match="unknown probes"):
    run.experiment_config("crucible1")
  run = flags_of("--experiment=thimble8", "--verify_against=x.safetensors")
  with pytest.raises(ValueError, match="needs --verification"):
    run.run_experiment("thimble8")
  run = flags_of("--experiment=thimble1", "--verification")
  with pytest.raises(ValueError, match="no verification mode"):
    run.run_experiment("thimble1")


def test_verification_steps_flag_keeps_the_seeds_checkpoints_inside_the_run():
  spec = experiments.verification("thimble9")
  cfg = verify.verification_config(experiments.load("thimble9"), spec, steps=300)
  assert (cfg.steps, cfg.store.checkpoint_steps) == (300, (0, 100))


def test_set_reaches_every_config_field_by_its_dotted_path(flags_of):
  run = flags_of("--experiment=crucible1", "--set=model.hidden_dim=32",
                 "--set=store.checkpoint_steps=0,10", "--set=data.double_shift_labels=true",
                 "--set=init_checkpoint=none", "--learning_rate=0.01", "--steps=20")
  cfg = run.experiment_config("crucible1")
  assert (cfg.model.hidden_dim, cfg.store.checkpoint_steps) == (32, (0, 10))
  assert cfg.data.double_shift_labels is True and cfg.init_checkpoint is None
  assert (cfg.optim.learning_rate, cfg.steps) == (0.01, 20)
  for bad, message in (("model.hidden=3", "no such field"), ("nope.x=1", "no config section"),
                       ("model=1", "is a section"), ("model.hidden_dim=x", "expected int"),
                       ("optim.learning_rate=-1", "invalid: torch's AdamW"), ("steps", "path=value")):
    run = flags_of("--experiment=crucible1", f"--set={bad}")
    with pytest.raises(ValueError, match=message):
      run.experiment_config("crucible1")


def test_with_steps_keeps_the_checkpoints_inside_the_run():
  cfg = config_lib.with_steps(experiments.load("thimble8"), 100)
  assert (cfg.steps, cfg.store.checkpoint_steps) == (100, (0, 1, 10, 100))
  assert config_lib.with_steps(cfg, 5, (0, 3, 9)).store.checkpoint_steps == (0, 3)


@pytest.mark.parametrize("name, members, groups", [
    ("lr_wd", 4, 2), ("master_weights", 2, 2), ("data_order", 4, 1)])
def test_the_open_questions_declare_their_sweeps(name, members, groups):
  from jaxdt.training import sweep  # pylint: disable=g-import-not-at-top
  cfg = experiments.load(name)
  ms = sweep.members(cfg, cfg.sweep)
  assert len(ms) == members and len(sweep.groups(ms)) == groups
  base = experiments.load("crucible1")
  for m in ms:  # Crucible 1 apart from the swept axes (and the names)
    for axis in m.assignment:
      m = m._replace(cfg=config_lib.set_path(
          m.cfg, sweep._path(axis), config_lib.get_path(base, sweep._path(axis))))  # pylint: disable=protected-access
    assert dataclasses.replace(m.cfg, name=base.name, sweep="", store=base.store) == base
  if name == "data_order":  # its first member is the solo Crucible 1 run
    assert ms[0].cfg.data_seed == base.seed
