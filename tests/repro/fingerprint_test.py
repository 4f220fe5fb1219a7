"""Arithmetic fingerprints, the known CPU classes, and resume that never mixes arithmetic."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import tiny_config

from jaxdt.analysis import metrics
from jaxdt.io import disk
from jaxdt.io import hosts
from jaxdt.io import metadata as metadata_lib
from jaxdt.numerics import backend
from jaxdt.training import fingerprint as fingerprint_lib
from jaxdt.training import loop

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TABLE = os.path.join(HERE, "fingerprints.json")
QUIET = dict(progress=False, log=lambda s: None)


def this_class() -> dict:
  return {"cpu_model": backend.cpu_model(),
          "cpu_features": sorted(backend.cpu_description()["cpu_features"]),
          "cpu_threads": backend.cpu_threads(), "backend": jax.default_backend(),
          "jaxlib": jax.lib.__version__}


@pytest.mark.parametrize("gemm", ["float32", "bfloat16"])
def test_this_host_matches_its_class_in_the_table(gemm):
  table = json.load(open(TABLE))["entries"]
  mine = fingerprint_lib.tensors(gemm)
  known = [e for e in table if e["class"] == this_class() and e["gemm"] == gemm]
  if not known:  # a class the project has not met: print its entry for the table
    entry = {"class": this_class(), "gemm": gemm, "fingerprint": fingerprint_lib.fingerprint(gemm),
             "tensors": mine}
    print("NEW CPU CLASS, add to tests/repro/fingerprints.json:\n" + json.dumps(entry, indent=1))
    return
  differing = sorted(k for k in mine if mine[k] != known[0]["tensors"].get(k))
  assert not differing, f"{len(differing)} tensors differ from the table's entry: {differing[:5]}"
  assert fingerprint_lib.fingerprint(gemm) == known[0]["fingerprint"]


def test_the_fingerprint_sees_the_gemm_path_and_is_stable():
  assert fingerprint_lib.fingerprint("float32") != fingerprint_lib.fingerprint("bfloat16")
  assert fingerprint_lib.tensors("float32") == fingerprint_lib.tensors("float32")


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_cli_prints_the_fingerprint_and_refuses_other_flags():
  r = _cli("--fingerprint")
  assert r.returncode == 0, r.stderr
  first, cpu = r.stdout.splitlines()[:2]
  assert first == f"fingerprint={fingerprint_lib.fingerprint('auto')}"
  assert cpu.startswith(f"cpu: {backend.cpu_model()}; features: ")
  bad = _cli("--fingerprint", "--steps=3")
  assert bad.returncode == 2 and bad.stderr.startswith("error: --fingerprint takes no other")
  assert bad.stderr.count("\n") == 1


@pytest.fixture
def stopped(tiny_data, tmp_path):
  """A tiny run stopped after its step-5 checkpoint."""
  cfg = tiny_config(tiny_data)
  out = str(tmp_path / "run")
  assert loop.train(cfg, out, stop_after=5, **QUIET) is None
  return cfg, out


def _other_host(monkeypatch, model="Another CPU", fp="0" * 64):
  monkeypatch.setattr(fingerprint_lib, "fingerprint", lambda setting="auto": fp)
  monkeypatch.setattr(backend, "cpu_model", lambda path="/proc/cpuinfo": model)


def test_metadata_records_the_fingerprint_and_host(stopped):
  meta = metadata_lib.read_metadata(stopped[1])
  fp = fingerprint_lib.fingerprint(stopped[0].model.gemm_operands)
  (host,) = meta["hosts"]  # the fingerprint is stored once: in the hosts the steps ran on
  assert host["arithmetic_fingerprint"] == fp and host["from_step"] == 0
  assert "arithmetic_fingerprint" not in meta and "host" not in meta
  assert host["cpu_model"] == backend.cpu_model()


def test_resume_on_another_host_is_refused_naming_both_cpus(stopped, monkeypatch):
  cfg, out = stopped
  before = open(os.path.join(out, "metadata.json")).read()
  _other_host(monkeypatch)
  with pytest.raises(disk.StoreError) as e:
    loop.train(cfg, out, resume=True, **QUIET)
  msg = str(e.value)
  assert "\n" not in msg
  assert "this host is Another CPU" in msg and "--allow_host_change" in msg
  monkeypatch.undo()
  assert backend.cpu_model() in msg
  assert open(os.path.join(out, "metadata.json")).read() == before  # nothing changed


def test_allowed_host_change_is_recorded_and_reported(stopped, monkeypatch):
  cfg, out = stopped
  _other_host(monkeypatch)
  said = []
  result = loop.train(cfg, out, resume=True, allow_host_change=True, progress=False,
                      log=said.append)
  assert any("continuing on another host" in s for s in said)
  h = result.metadata["hosts"]
  assert [x["from_step"] for x in h] == [0, 5]
  assert h[1]["cpu_model"] == "Another CPU" and h[1]["arithmetic_fingerprint"] == "0" * 64
  summary, _ = metrics.measure(out)
  note = next(n for n in summary.notes if n.startswith("the run changed host"))
  assert "steps 0–5 on " in note and "steps 5–12 on Another CPU" in note


def _drop_fingerprint(out, **host):
  meta = metadata_lib.read_metadata(out)
  for k in ("arithmetic_fingerprint", "host", "hosts"):
    meta.pop(k, None)
  meta.update(host)
  metadata_lib.write_metadata(out, meta)


def test_an_older_run_without_fingerprint_resumes_on_its_cpu_class(stopped):
  cfg, out = stopped
  _drop_fingerprint(out)  # cpu_model and cpu_features stay, as older runs of today have them
  said = []
  assert loop.train(cfg, out, resume=True, progress=False, log=said.append) is not None
  assert any("no arithmetic fingerprint recorded" in s for s in said)


def test_an_older_run_without_fingerprint_is_refused_on_another_class(stopped):
  cfg, out = stopped
  _drop_fingerprint(out, cpu_model="Some Other CPU")
  with pytest.raises(disk.StoreError, match="records no fingerprint and another CPU class"):
    loop.train(cfg, out, resume=True, **QUIET)


def test_hosts_after_resume_drops_stretches_a_rewind_redoes():
  a = {"cpu_model": "A", "cpu_features": ["x"], "arithmetic_fingerprint": "a"}
  b = {"cpu_model": "B", "cpu_features": ["y"], "arithmetic_fingerprint": "b"}
  meta = {"hosts": [{"from_step": 0, **a}, {"from_step": 1000, **b}]}
  assert hosts.hosts_after_resume(meta, b, 1500) == meta["hosts"]
  assert hosts.hosts_after_resume(meta, b, 750) == [{"from_step": 0, **a}, {"from_step": 750, **b}]
  assert hosts.hosts_after_resume(meta, a, 750) == [{"from_step": 0, **a}]
  assert hosts.hosts_after_resume(meta, b, 0) == [{"from_step": 0, **b}]
  assert hosts.stretches(meta, 2000) == ("steps 0–1000 on A [x] (fingerprint a), "
                                         "steps 1000–2000 on B [y] (fingerprint b)")


def test_a_sweep_member_is_checked_the_same_way(tiny_data, tmp_path, monkeypatch):
  from jaxdt.training import runs
  from jaxdt.training import sweep
  cfg = dataclasses.replace(tiny_config(tiny_data), steps=12)
  root = str(tmp_path / "sweep")
  spec = "learning_rate=1e-3,3e-3"
  sweep.train_sweep(cfg, spec, root, runs.Options(progress=False, stop_after=5),
                    log=lambda s: None)
  _other_host(monkeypatch)
  with pytest.raises(disk.StoreError, match="this host is Another CPU"):
    sweep.train_sweep(cfg, spec, root, runs.Options(progress=False, resume=True),
                      log=lambda s: None)
  done = sweep.train_sweep(cfg, spec, root, runs.Options(progress=False, resume=True,
                                                         allow_host_change=True),
                           log=lambda s: None)
  assert all(r.metadata["hosts"][-1]["cpu_model"] == "Another CPU" for _, r in done)
