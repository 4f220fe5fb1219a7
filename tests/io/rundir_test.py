"""The run folder's protocol, one test per promise (jaxdt/io/rundir.py's invariants).

Small runs through the Python API; the command-line promises (one-line errors,
exit codes, signals) run `run.py`'s main in a subprocess (tests/io/cli_runner.py).
"""

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import notes_of, tiny_config

from jaxdt.analysis import metrics
from jaxdt import config as config_lib, verify
from jaxdt.data import recipe
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import metadata
from jaxdt.io import rundir
from jaxdt.io import signals
from jaxdt.io import configdiff
from jaxdt.io import tensorfile
from jaxdt.numerics import backend
from jaxdt.report import outputs
from jaxdt.training import layout
from jaxdt.training import loop
from jaxdt import probes
from jaxdt.training import initial
from jaxdt.training import step as step_lib

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 12  # tiny_config: checkpoints at 5 and 9, chunks of 4
QUIET = dict(progress=False, log=lambda s: None)


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _snapshot(folder):
  """{relative path: bytes} of everything in a folder (to prove nothing changed)."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, folder)] = _bytes(p)
  return out


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ 0xFF]))


def _row_offset(path, key, row):
  """Byte offset of row `row` of tensor `key` in a safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(n))[key]
  row_bytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) // entry["shape"][0]
  return 8 + n + entry["data_offsets"][0] + row * row_bytes


@pytest.fixture(scope="module")
def cfg(tiny_data):
  return tiny_config(tiny_data, steps=STEPS)


@pytest.fixture(scope="module")
def ref(cfg, tmp_path_factory):
  return loop.train(cfg, str(tmp_path_factory.mktemp("ref")), **QUIET)


def _unfinished(cfg, out, stop_after=7):
  assert loop.train(cfg, out, stop_after=stop_after, **QUIET) is None
  return os.path.join(out, cfg.store.trajectory_name + tensorfile.PARTIAL_SUFFIX)


# --- 2. Ordering: rows durable before the checkpoint that covers them ------------


def test_a_checkpoint_marker_appears_only_after_its_rows_are_on_disk(cfg, ref, tmp_path):
  out = str(tmp_path)
  partial = os.path.join(out, cfg.store.trajectory_name + tensorfile.PARTIAL_SUFFIX)
  seen = []

  def hook(point):
    latest = checkpoints.intact_checkpoints(os.path.join(out, "checkpoints"))
    if point == "checkpoint_arrays_written":  # arrays written, marker not yet
      assert [s for s, _ in latest] == seen[::-1]
    if point == "checkpoint_written":
      step = latest[0][0]
      seen.append(step)
      with tensorfile.TrajectoryReader(partial) as now, tensorfile.TrajectoryReader(ref.trajectory) as done:
        for key in ("W", "loss", "delta_W_prime"):
          rows = step + 1 if key != "delta_W_prime" else step
          assert now.rows(key, 0, rows).tobytes() == done.rows(key, 0, rows).tobytes(), key

  disk.FAULT_HOOK = hook
  try:
    loop.train(cfg, out, **QUIET)
  finally:
    disk.FAULT_HOOK = None
  assert seen == [5, 9]


# --- 3. Resume checks the whole config and the data files ------------------------


def test_resume_refuses_a_changed_config_one_line_per_field(cfg, ref, tmp_path):
  out = str(tmp_path)
  _unfinished(cfg, out)
  before = _snapshot(out)
  changed = dataclasses.replace(
      cfg, seed=7, optim=dataclasses.replace(cfg.optim, learning_rate=1e-2),
      data=dataclasses.replace(cfg.data, batch_size=8))
  with pytest.raises(disk.StoreError) as e:
    loop.train(changed, out, resume=True, **QUIET)
  lines = str(e.value).splitlines()
  assert lines[0].startswith(f"cannot resume {out}: 3 setting(s) differ from the run's")
  assert sorted(s.strip() for s in lines[1:]) == [
      "data.batch_size: the run has 4, the flags say 8",
      "optim.learning_rate: the run has 0.001, the flags say 0.01",
      "seed: the run has 42, the flags say 7"]
  assert _snapshot(out) == before
  # The chunk size is free to change: the result is the same bytes.
  other_chunk = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, chunk_steps=3))
  assert _bytes(loop.train(other_chunk, out, resume=True, **QUIET).trajectory) == \
      _bytes(ref.trajectory)


def test_resume_refuses_other_data_files(cfg, tiny_data, tmp_path):
  out = str(tmp_path / "run")
  _unfinished(cfg, out)
  before = _snapshot(out)
  corpus = str(tmp_path / "corpus.txt")
  with open(tiny_data["corpus"], encoding="utf-8") as f:
    text = f.read()
  with open(corpus, "w", encoding="utf-8") as f:
    f.write(text[:-200])
  other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus_path=corpus,
                                                          dead_mask_path=None))
  with pytest.raises(disk.StoreError, match="data_files: the run used other input files"):
    loop.train(other, out, resume=True, **QUIET)
  assert _snapshot(out) == before



def test_resume_refuses_a_host_that_resolves_another_gemm_path(cfg, tmp_path, monkeypatch):
  out = str(tmp_path / "run")
  _unfinished(cfg, out)
  before = _snapshot(out)
  other = "bfloat16" if backend.gemm_operands() == "float32" else "float32"
  monkeypatch.setattr(backend, "gemm_operands", lambda flags=None: other)  # another machine
  with pytest.raises(disk.StoreError, match=r"gemm_path: the run has \S+ operands .*, this host "
                     rf"{other} operands .*; force the run's with --gemm_operands"):
    loop.train(cfg, out, resume=True, **QUIET)
  assert _snapshot(out) == before

def test_config_differences_names_nested_fields():
  a = config_lib.to_dict(config_lib.ExperimentConfig())
  b = config_lib.to_dict(dataclasses.replace(
      config_lib.ExperimentConfig(), store=dataclasses.replace(
          config_lib.StoreConfig(), chunk_steps=3, checkpoint_steps=(1, 2))))
  assert configdiff.config_differences(a, b) == []  # neither changes a result: resumable
  assert configdiff.config_differences(a, b, ignore=frozenset()) == [
      "store.checkpoint_steps: the run has [], the flags say [1, 2]",
      f"store.chunk_steps: the run has {config_lib.StoreConfig().chunk_steps}, the flags say 3"]


# --- 4. Inputs are validated before anything is created ---------------------------


@pytest.mark.parametrize("change, message", [
    (dict(learning_rate=float("nan")), "learning_rate=nan is invalid: torch's AdamW needs it "
                                       "finite and >= 0; pass --learning_rate"),
    (dict(learning_rate=-1e-3), "learning_rate=-0.001 is invalid"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1 is invalid"),
    (dict(b2=1.0), r"b2=1.0 is invalid: torch's AdamW needs it in \[0, 1\)"),
    (dict(eps=float("inf")), "eps=inf is invalid"),
])
def test_bad_hyperparameters_are_refused_as_configs(change, message):
  with pytest.raises(ValueError, match=message):
    config_lib.OptimConfig(**change)


def test_no_probes_is_refused():
  with pytest.raises(ValueError, match="no probes: a run must record something"):
    config_lib.ProbeConfig(names=())


def test_a_bad_init_checkpoint_is_refused_before_the_folder_exists(cfg, tmp_path):
  out = str(tmp_path / "never")
  junk = str(tmp_path / "junk.pt")
  with open(junk, "wb") as f:
    f.write(b"not a checkpoint")
  for path in (str(tmp_path / "missing.pt"), junk):
    with pytest.raises((ValueError, OSError)):
      loop.train(dataclasses.replace(cfg, init_checkpoint=path), out, **QUIET)
    assert not os.path.exists(out)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(cfg, ref, tmp_path):
  no_ckpt = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, checkpoint_steps=()))
  out = str(tmp_path)
  _unfinished(no_ckpt, out, stop_after=6)
  with pytest.raises(disk.StoreError, match="unfinished crucible1 run; pass --resume"):
    loop.train(no_ckpt, out, **QUIET)
  said = []
  result = loop.train(no_ckpt, out, resume=True, progress=False, log=said.append)
  said = notes_of(said)
  assert said == [f"no checkpoint yet in {out}/checkpoints; restarting from step 0"]
  assert _bytes(result.trajectory) == _bytes(ref.trajectory)


def test_a_refused_new_folder_is_not_left_behind(cfg, tmp_path, monkeypatch):
  out = str(tmp_path / "new")
  real = shutil.disk_usage
  monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
  with pytest.raises(disk.StoreError, match="not enough disk"):
    loop.train(cfg, out, **QUIET)
  assert not os.path.exists(out)


# --- 5. One writer; another experiment's folder is refused ------------------------


def test_a_second_writer_is_refused_naming_the_holders_pid(cfg, tmp_path):
  out = str(tmp_path)
  _unfinished(cfg, out)
  before = _snapshot(out)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
       " fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", out],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(disk.StoreError) as e:
      loop.train(cfg, out, resume=True, **QUIET)
    assert str(e.value) == (f"{out} is in use by pid {holder.pid} (another jaxdt run writes "
                            "there); wait for it to end or choose another --output_dir")
    with pytest.raises(metrics.AnalysisError, match=f"it is still running \\(pid {holder.pid}\\); "
                       "wait for it to finish"):
      outputs.analyze(out, echo=lambda s: None)
    assert _snapshot(out) == before
  finally:
    holder.kill()
    holder.wait()
  # The kernel drops the lock with its holder: the run continues.
  assert loop.train(cfg, out, resume=True, **QUIET) is not None


def test_the_lock_is_held_for_the_whole_run(cfg, tmp_path):
  out = str(tmp_path)
  tried = []

  def hook(point):
    if point == "rows_written" and not tried:
      fd = os.open(out, os.O_RDONLY)
      try:
        with pytest.raises(BlockingIOError):
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      finally:
        os.close(fd)
      tried.append(point)

  disk.FAULT_HOOK = hook
  try:
    loop.train(cfg, out, **QUIET)
  finally:
    disk.FAULT_HOOK = None
  assert tried


def test_another_experiments_folder_is_refused_and_unchanged(cfg, ref, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(ref.run_dir, out)
  before = _snapshot(out)
  other = dataclasses.replace(cfg, name="crucible3")
  for resume in (False, True):
    with pytest.raises(disk.StoreError, match=f"{out} holds a finished 'crucible1' run, not "
                       "'crucible3'; choose another --output_dir"):
      loop.train(other, out, resume=resume, **QUIET)
  assert _snapshot(out) == before
  with pytest.raises(disk.StoreError, match="holds a finished crucible1 run, nothing to resume"):
    loop.train(cfg, out, resume=True, **QUIET)
  assert _snapshot(out) == before


def test_run_files_without_metadata_are_refused(cfg, ref, tmp_path):
  out = str(tmp_path)
  shutil.copy(ref.trajectory, out)
  with pytest.raises(disk.StoreError, match="holds run files .* but no metadata.json"):
    loop.train(cfg, out, **QUIET)


# --- 6. Integrity: checkpoints and trajectories carry SHA-256 ---------------------


def test_a_corrupt_latest_checkpoint_is_reported_and_an_older_one_used(cfg, ref, tmp_path):
  out = str(tmp_path)
  _unfinished(cfg, out, stop_after=10)
  arrays = os.path.join(out, "checkpoints", "step_000009", checkpoints.CHECKPOINT_ARRAYS)
  size = os.path.getsize(arrays)
  _flip_byte(arrays, size - 100)
  _flip_byte(arrays, size - 7)
  said = []
  result = loop.train(cfg, out, resume=True, progress=False, log=said.append)
  said = notes_of(said)
  assert said[0].startswith("skipping checkpoint step 9: checkpoint ") and "is corrupt" in said[0]
  assert said[0].endswith("; trying an older one")
  assert said[1] == f"resuming {out} from the checkpoint at step 5"
  assert _bytes(result.trajectory) == _bytes(ref.trajectory)


def test_a_corrupt_checkpoint_marker_is_skipped(cfg, ref, tmp_path):
  out = str(tmp_path)
  _unfinished(cfg, out, stop_after=10)
  marker = os.path.join(out, "checkpoints", "step_000009", checkpoints.CHECKPOINT_META)
  text = open(marker).read().replace('"step": 9', '"step": 8', 1)
  with open(marker, "w") as f:
    f.write(text)
  said = []
  result = loop.train(cfg, out, resume=True, progress=False, log=said.append)
  said = notes_of(said)
  assert "meta.json does not match its own SHA-256" in said[0]
  assert _bytes(result.trajectory) == _bytes(ref.trajectory)


def test_corrupt_rows_in_the_unfinished_trajectory_are_caught_on_resume(cfg, ref, tmp_path):
  out = str(tmp_path)
  partial = _unfinished(cfg, out, stop_after=10)
  _flip_byte(partial, _row_offset(partial, "W", 7))  # covered by step 9's checkpoint, not 5's
  said = []
  result = loop.train(cfg, out, resume=True, progress=False, log=said.append)
  said = notes_of(said)
  assert "rows of 'W' up to step 9 do not match" in said[0]
  assert said[1] == f"resuming {out} from the checkpoint at step 5"
  assert _bytes(result.trajectory) == _bytes(ref.trajectory)


def test_a_corrupt_finished_trajectory_is_refused_by_every_reader(cfg, ref, tmp_path, tiny_data):
  out = str(tmp_path / "copy")
  shutil.copytree(ref.run_dir, out)
  for name in ("summary.json",):
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  path = os.path.join(out, cfg.store.trajectory_name)
  offset = _row_offset(path, "W", 6)
  with open(path, "r+b") as f:  # 4 KB of garbage in the middle
    f.seek(offset)
    f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(metrics.AnalysisError, match="is corrupt: tensor 'W' does not match the "
                     "SHA-256 recorded when the run finished"):
    outputs.analyze(out, echo=lambda s: None)
  assert not os.path.exists(os.path.join(out, "summary.json"))
  with pytest.raises(metrics.AnalysisError, match="is corrupt"):
    outputs.compare(ref.run_dir, out, echo=lambda s: None)
  spec = verify.Verification(keys=("W", "loss"))
  with pytest.raises(verify.VerifyError, match="is corrupt"):
    verify.compare(ref.trajectory, path, spec, STEPS)
  # The intact run verifies, and says so.
  summary, _ = metrics.measure(ref.run_dir)
  assert summary.verified is True


def test_readers_refuse_partial_files_and_unfinished_runs(cfg, ref, tmp_path):
  out = str(tmp_path)
  partial = _unfinished(cfg, out)
  for path in (partial, out):
    with pytest.raises(metrics.AnalysisError, match="unfinished"):
      outputs.analyze(path, echo=lambda s: None)
    with pytest.raises(metrics.AnalysisError, match="unfinished"):
      outputs.compare(ref.run_dir, path, echo=lambda s: None)
  assert not os.path.exists(os.path.join(out, "summary.json"))
  spec = verify.Verification(keys=("W",))
  with pytest.raises(verify.VerifyError, match="unfinished trajectory"):
    verify.check_reference(partial, spec, {})
  # A final-named file whose metadata says unfinished (an older jaxdt's kill
  # between rename and metadata): refused, and --resume repairs it.
  shutil.copy(partial, os.path.join(out, cfg.store.trajectory_name))
  os.remove(partial)
  with pytest.raises(metrics.AnalysisError, match="completed: false"):
    outputs.analyze(os.path.join(out, cfg.store.trajectory_name), echo=lambda s: None)
  assert _bytes(loop.train(cfg, out, resume=True, **QUIET).trajectory) == _bytes(ref.trajectory)


def test_finished_metadata_records_the_checksums(ref):
  meta = ref.metadata
  assert meta["completed"] is True and meta["trajectory_sha256"] == disk.sha256_file(
      ref.trajectory)
  with tensorfile.TrajectoryReader(ref.trajectory) as r:
    assert set(meta["tensor_sha256"]) == set(r.keys()) | {tensorfile.HEADER_DIGEST}
  assert metadata.read_metadata(ref.run_dir) == meta


# --- 8, 11. Preflight, divergence, small things -------------------------------------


def test_preflight_counts_the_checkpoints(cfg, tmp_path, monkeypatch):
  out = str(tmp_path / "new")
  state_bytes = layout.state_bytes(step_lib.without_coefficients(initial.init_state(
      cfg, probes.Dims(rows=1, hidden=cfg.model.hidden_dim, param_dtype=np.float32))))
  real = shutil.disk_usage
  # Room for the trajectory and metadata, not for its two checkpoints.
  free = 200_000 + rundir.METADATA_BUDGET_BYTES + state_bytes
  monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: real(p)._replace(free=free))
  with pytest.raises(disk.StoreError, match=r"not enough disk for crucible_1_trajectory"
                     r"\.safetensors and 2 checkpoints: need [\d.]+ MB, [\d.]+ MB free"):
    loop.train(cfg, out, **QUIET)


def test_the_ram_check_uses_the_steps_when_the_chunk_is_longer(cfg, ref, tmp_path):
  huge = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, chunk_steps=10**9))
  assert _bytes(loop.train(huge, str(tmp_path), **QUIET).trajectory) == _bytes(ref.trajectory)


def test_a_diverged_run_keeps_its_records_and_every_analysis_reports_it(cfg, tmp_path):
  wild = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=1e30))
  said = []
  result = loop.train(wild, str(tmp_path), progress=False, log=said.append)
  said = notes_of(said)
  step = result.metadata["diverged_at_step"]
  assert isinstance(step, int) and 1 <= step <= STEPS
  assert said and f"at step {step}" in said[0]
  with tensorfile.TrajectoryReader(result.trajectory) as r:
    loss = r.read("loss")
  assert np.isfinite(loss[1:step]).all() and not np.isfinite(loss[step])
  lines = []
  summary = outputs.analyze(result.run_dir, echo=lines.append)
  assert summary.diverged_at_step == step and summary.steps == step - 1
  assert f"The loss is non-finite from step {step} on" in lines[0]


def test_fmt_bytes_picks_a_unit():
  assert [disk.fmt_bytes(n) for n in (512, 4_520_000, 83.6e9, 1e18)] == [
      "512 bytes", "4.52 MB", "83.6 GB", "1,000,000 TB"]


def test_dead_data_builds_are_cleaned_up(tmp_path):
  prefix = f".{recipe.CACHE_SUBDIR}.tmp-"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  for name in (f"{dead.pid}-abc", f"{os.getpid()}-mine", "old"):
    os.makedirs(tmp_path / (prefix + name))
  recipe._remove_dead_builds(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [prefix + f"{os.getpid()}-mine"]


# --- 7, 10. The command line: one line, the right exit status -------------------------


def _cli(cfg, tmp_path, *flags, fault=None, wait=True):
  spec = str(tmp_path / f"cli_{time.monotonic_ns()}.json")
  with open(spec, "w", encoding="utf-8") as f:
    json.dump({"config": config_lib.to_json(cfg), "fault": fault}, f)
  cmd = [sys.executable, os.path.join(HERE, "cli_runner.py"), spec,
         f"--experiment={cfg.name}", "--noprogress", *flags]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _one_line(err):
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def test_cli_output_dir_that_is_a_file(cfg, tmp_path):
  f = tmp_path / "a_file"
  f.write_text("x")
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={f}")
  assert code == 2
  assert _one_line(err) == (f"error: --output_dir {f} is a file, not a folder; choose another "
                            "--output_dir")


def test_cli_disk_full_mid_run_is_one_line_and_resumable(cfg, ref, tmp_path):
  out = str(tmp_path / "run")
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={out}", fault=["rows_written#3", "ENOSPC"])
  assert code == 2
  assert _one_line(err) == ("error: No space left on device: injected; free space (or move "
                            "--output_dir to a larger disk), then continue with --resume")
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={out}", "--resume")
  assert code == 0, err
  assert _bytes(os.path.join(out, cfg.store.trajectory_name)) == _bytes(ref.trajectory)


def test_cli_changed_flags_on_resume(cfg, tmp_path):
  out = str(tmp_path / "run")
  _unfinished(cfg, out)
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={out}", "--resume", "--learning_rate=0.01")
  assert code == 2 and "Traceback" not in err
  assert err.splitlines()[1].strip() == "optim.learning_rate: the run has 0.001, the flags say 0.01"


def test_cli_missing_experiment():
  proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(HERE)), "run.py")],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert _one_line(proc.stderr).startswith("error: --experiment is required; pass "
                                            "--experiment=one of ['flannel_data', 'crucible1'")
  proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(HERE)), "run.py"),
                         "--precision=fp64"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert _one_line(proc.stderr) == ("error: flag --precision=fp64: value should be one of "
                                    "<bf16|fp32|mixed|bf16_sr|bf16_kahan>; see --helpfull")


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_cli_signals_stop_cleanly_and_the_run_resumes(cfg, ref, tmp_path, signal_name, status):
  out = str(tmp_path / "run")
  # The signal arrives right after the checkpoint of step 5 (its chunk's rows written).
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={out}",
                      fault=["checkpoint_written#1", signal_name])
  assert code == status, err
  assert _one_line(err) == ("interrupted after step 5; continue with --resume (from the "
                            "checkpoint at step 5)")
  assert not metadata.is_complete(out, cfg.store.trajectory_name)
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={out}", "--resume")
  assert code == 0, err
  assert _bytes(os.path.join(out, cfg.store.trajectory_name)) == _bytes(ref.trajectory)


@pytest.mark.parametrize("point, said", [
    ("checkpoint_marker_written#2", "interrupted after step 9; continue with --resume (from the "
                                    "checkpoint at step 9)"),
    ("commit_renamed#1", "interrupted after the run finished; see it with --analyze={out}")])
def test_a_signal_between_a_write_and_its_note_reports_what_the_disk_holds(cfg, tmp_path,
                                                                           point, said):
  """A signal right after checkpoint 9's marker (before the folder noted it) names checkpoint
  9, not 5; one right after the commit rename says finished, not --resume."""
  out = str(tmp_path / "run")
  code, _, err = _cli(cfg, tmp_path, f"--output_dir={out}", fault=[point, "SIGINT"])
  assert code == 130, err
  assert _one_line(err) == said.format(out=out)


def test_cli_ctrl_c_from_outside_leaves_a_resumable_folder(cfg, ref, tmp_path):
  out = str(tmp_path / "run")
  slow = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, chunk_steps=1))
  proc = _cli(slow, tmp_path, f"--output_dir={out}", wait=False)
  deadline = time.monotonic() + 120
  while (not os.path.exists(os.path.join(out, "metadata.json")) and proc.poll() is None
         and time.monotonic() < deadline):
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  if proc.returncode == 0:
    pytest.skip("the run finished before the signal arrived")
  assert proc.returncode == 130
  assert _one_line(err).startswith("interrupted")
  code, _, err = _cli(slow, tmp_path, f"--output_dir={out}", "--resume")
  assert code == 0, err
  assert _bytes(os.path.join(out, cfg.store.trajectory_name)) == _bytes(ref.trajectory)


def test_a_signal_whose_exception_python_lost_is_raised_at_the_loops_next_check(monkeypatch,
                                                                                capsys):
  """SIGINT arriving inside a finalizer: Python would report the exception "ignored" and go
  on; the handler remembered it, so check_signals() (after every chunk) raises it."""
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored afterwards
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    signals.raise_on_signals()
    signals.check_signals()  # nothing seen yet: no-op

    class SignalsInItsFinalizer:
      def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs here, inside __del__
          pass

    x = SignalsInItsFinalizer()
    del x  # the Signalled raised in __del__ is "ignored" by Python
    with pytest.raises(signals.Signalled) as caught:
      signals.check_signals()
    assert caught.value.signum == signal.SIGINT
    assert "Exception ignored" not in capsys.readouterr().err  # no traceback on stderr
    e = signals.Interrupted.from_signal(caught.value, 5, 5)
    assert e.signum == signal.SIGINT and str(e) == ("interrupted after step 5; continue with "
                                                    "--resume (from the checkpoint at step 5)")
    signals.check_signals()  # forgotten once the loop turned it into Interrupted
  finally:
    signals.clear_signals()
    for s, h in saved.items():
      signal.signal(s, h)
