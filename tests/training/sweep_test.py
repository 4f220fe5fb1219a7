"""Sweeps: members of one compiled program, each byte-identical to its solo run.

Bits are compared as whole trajectory files (sha256 of the bytes): on one CPU
device, on two (`--xla_force_host_platform_device_count=2`, in a subprocess),
over two processes joined by `jax.distributed` on the loopback, and after a
sweep stopped midway is resumed (members at different checkpoints included).
"""

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from conftest import single_trace, tiny_config

from jaxdt import config as config_lib
from jaxdt.io import checkpoints
from jaxdt.io import metadata
from jaxdt.training import loop
from jaxdt.training import runs
from jaxdt.training import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(os.path.dirname(HERE), "io", "cli_runner.py")
SPEC = "learning_rate=1e-3,3e-3;weight_decay=0,0.1"  # 4 members, 2 groups (wd = 0 or not)
SMALL = "weight_decay=0.1;learning_rate=1e-3,3e-3"  # 2 of them, one group (the subprocesses')
QUIET = dict(log=lambda s: None)
OPTS = runs.Options(progress=False)


def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _trajectories(root: str, cfg, spec: str = SPEC) -> dict:
  """{solo-run name of the member: sha256 of its trajectory} for spec's members."""
  return {_solo_name(m): _sha(os.path.join(root, m.name, cfg.store.trajectory_name))
          for m in sweep.members(cfg, spec)}


def _solo_name(m) -> str:
  return f"lr={m.cfg.optim.learning_rate:g}_wd={m.cfg.optim.weight_decay:g}"


@pytest.fixture(scope="module")
def cfg(tiny_data):
  return tiny_config(tiny_data)


@pytest.fixture(scope="module")
def solo(cfg, tmp_path_factory):
  """Every member of SPEC run alone with loop.train: {member name: trajectory sha256}."""
  root = tmp_path_factory.mktemp("solo")
  return {_solo_name(m): _sha(loop.train(m.cfg, str(root / m.name), **QUIET).trajectory)
          for m in sweep.members(cfg, SPEC)}


@pytest.fixture(scope="module")
def short(cfg, tmp_path_factory):
  """4 steps in one chunk (one trace per process) and SMALL's members run alone on it."""
  c = single_trace(dataclasses.replace(cfg, steps=4))
  root = tmp_path_factory.mktemp("short_solo")
  return c, {_solo_name(m): _sha(loop.train(m.cfg, str(root / m.name), **QUIET).trajectory)
             for m in sweep.members(c, SMALL)}


@pytest.fixture(scope="module")
def swept(cfg, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sweep"))
  return root, sweep.train_sweep(cfg, SPEC, root, OPTS, **QUIET)


def _cli(cfg, tmp_path, *flags, env=None):
  spec = str(tmp_path / "cfg.json")
  with open(spec, "w", encoding="utf-8") as f:
    json.dump({"config": config_lib.to_json(cfg)}, f)
  return subprocess.Popen(
      [sys.executable, RUNNER, spec, f"--experiment={cfg.name}", "--noprogress", *flags],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


# --- The axes --------------------------------------------------------------------


def test_axes_members_and_groups(cfg):
  ms = sweep.members(cfg, SPEC)
  assert [m.name for m in ms] == [
      "m00_learning_rate=0.001_weight_decay=0", "m01_learning_rate=0.001_weight_decay=0.1",
      "m02_learning_rate=0.003_weight_decay=0", "m03_learning_rate=0.003_weight_decay=0.1"]
  assert ms[3].cfg.optim.learning_rate == 0.003 and ms[3].cfg.optim.weight_decay == 0.1
  assert ms[3].cfg.optim.b1 == cfg.optim.b1 and ms[3].cfg.seed == cfg.seed
  # wd = 0 omits torch's decay op: another program. seed and data_seed are data.
  assert [[m.index for m in g] for g in sweep.groups(ms)] == [[0, 2], [1, 3]]
  assert len(sweep.groups(sweep.members(cfg, "seed=1,2,3;data_seed=4,5"))) == 1
  assert len(sweep.groups(sweep.members(cfg, "precision=bf16,mixed;b2=0.99,0.999"))) == 2


@pytest.mark.parametrize("spec, message", [
    ("lr=1e-3", "'lr' is not one of learning_rate, b1, b2, eps, weight_decay"),
    ("learning_rate=", "has no values"),
    ("seed=1;seed=2", "names 'seed' twice"),
    ("learning_rate=1e-3,0.001", "gives two members the same values"),
    ("precision=bf17", "precision='bf17' is not one of"),
    ("", "names no axis"),
])
def test_bad_sweeps_are_one_line_errors(cfg, spec, message):
  with pytest.raises(ValueError, match=message) as e:
    sweep.members(cfg, spec)
  assert "\n" not in str(e.value)


# --- Exactness ---------------------------------------------------------------------


def test_members_are_byte_identical_to_their_solo_runs(cfg, solo, swept):
  root, results = swept
  assert len(results) == 4 and all(r is not None for _, r in results)
  assert _trajectories(root, cfg) == solo
  meta = metadata.read_metadata(os.path.join(root, "m03_learning_rate=0.003_weight_decay=0.1"))
  assert meta["completed"] and meta["config"]["optim"]["learning_rate"] == 0.003
  assert meta["sweep"]["spec"] == SPEC and meta["sweep"]["member"] == 3
  assert meta["sweep"]["assignment"] == {"learning_rate": 0.003, "weight_decay": 0.1}


def test_two_devices_give_the_same_bytes(short, tmp_path):
  # Asked for explicitly: exact mode takes one CPU device by default (sweep_devices).
  cfg, solo = short
  out = str(tmp_path / "two")
  p = _cli(cfg, tmp_path, f"--sweep={SMALL}", f"--output_dir={out}", "--sweep_devices=2",
           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  stdout, stderr = p.communicate(timeout=900)
  assert p.returncode == 0, stderr[-3000:]
  assert "on 2 device(s)" in stdout
  got = _trajectories(out, cfg, SMALL)
  assert got == solo
  summary = json.load(open(os.path.join(out, "sweep_summary.json")))
  assert [r["name"] for r in summary["members"]] == [m.name for m in sweep.members(cfg, SMALL)]
  assert all(r["final_loss"] > 0 and r["global_last_motion"] >= 0 for r in summary["members"])
  assert "SWEEP: " + SMALL in stdout and os.path.exists(os.path.join(out, "sweep_summary.png"))


def test_two_processes_over_jax_distributed_give_the_same_bytes(short, tmp_path):
  cfg, solo = short
  with socket.socket() as s:  # a free port on the loopback
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = str(tmp_path / "mp")
  procs = [_cli(cfg, tmp_path, f"--sweep={SMALL}", f"--output_dir={out}",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}") for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 0 of 2 runs 1" in outs[0][0] and "process 1 of 2 runs 1" in outs[1][0]
  got = _trajectories(out, cfg, SMALL)
  assert got == solo
  assert os.path.exists(os.path.join(out, "sweep_summary.json"))  # written by process 0


def test_a_stopped_sweep_resumes_to_the_same_bytes(cfg, solo, tmp_path):
  root = str(tmp_path / "stopped")
  assert all(r is None for _, r in sweep.train_sweep(cfg, SPEC, root, runs.Options(progress=False, stop_after=10), **QUIET))
  # One member lost its newest checkpoint (as if killed while writing it): the
  # group continues from the step every member has (5), the others step back.
  victim = os.path.join(root, "m02_learning_rate=0.003_weight_decay=0", "checkpoints")
  newest = checkpoints.intact_checkpoints(victim)[0]
  assert newest[0] == 9
  os.remove(os.path.join(newest[1], "meta.json"))
  said = []
  done = sweep.train_sweep(cfg, SPEC, root, runs.Options(resume=True, progress=False),
                           log=said.append)
  assert all(r is not None for _, r in done)
  assert any("stepping back to the checkpoint at step 5" in s for s in said), said
  assert _trajectories(root, cfg) == solo
  # Resuming a finished sweep redoes nothing.
  said = []
  assert sweep.train_sweep(cfg, SPEC, root, runs.Options(resume=True, progress=False),
                           log=said.append) == []
  assert sum("finished already" in s for s in said) == 4


def test_data_seed_is_the_data_order_apart_from_the_init(cfg, solo, tmp_path):
  base = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=1e-3,
                                                            weight_decay=0.0))
  root = str(tmp_path / "order")
  spec = f"data_seed={cfg.seed},7"
  sweep.train_sweep(base, spec, root, OPTS, **QUIET)
  names = [m.name for m in sweep.members(base, spec)]
  same = _sha(os.path.join(root, names[0], cfg.store.trajectory_name))
  assert same == solo["lr=0.001_wd=0"]  # data_seed = seed: as before
  other = os.path.join(root, names[1], cfg.store.trajectory_name)
  assert _sha(other) != same
  from jaxdt.io import tensorfile
  with tensorfile.TrajectoryReader(other) as a, tensorfile.TrajectoryReader(
      os.path.join(root, names[0], cfg.store.trajectory_name)) as b:
    assert a.rows("W", 0, 1).tobytes() == b.rows("W", 0, 1).tobytes()  # one init
    assert a.rows("W", 1, 2).tobytes() != b.rows("W", 1, 2).tobytes()  # other batches


def test_exact_mode_takes_one_cpu_device_unless_told():
  n = len(jax.local_devices())
  assert len(runs.program_devices(n, exact=True)) == 1
  assert len(runs.program_devices(n, exact=False)) == n
  with pytest.raises(ValueError, match="--sweep_devices=9: this process has"):
    runs.program_devices(n, True, 9)


def test_fast_mode_vmaps_the_members(short, tmp_path):
  root = str(tmp_path / "fast")
  said = []
  done = sweep.train_sweep(short[0], SMALL, root, runs.Options(exact=False, progress=False),
                         log=said.append)
  assert any("fast (vmap)" in s for s in said)
  assert len(done) == 2 and all(r.metadata["completed"] for _, r in done)  # bits may differ
