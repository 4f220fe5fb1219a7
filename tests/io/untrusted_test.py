"""Never trust a file (issue 26): bounded readers, hostile JSON, atomic analysis outputs.

The unit tests pin each promise on one hostile file; the property-based tests
(hypothesis) drive every reader with mutated headers, JSON and sizes under a
memory cap (RLIMIT_AS a little above what the process holds, and a 32 MiB
`JAXDT_MEMORY_BUDGET`) and assert the only thing that may come out: a value,
or one line from a jaxdt error type (a ValueError subclass).

`JAXDT_FUZZ_EXAMPLES=N` sets the examples per property (default 100: the four
properties take about 11 s) and `JAXDT_FUZZ_RANDOM=1` draws new examples each
run; BUILD_NOTES.md (section 4) records a longer run.
"""

import contextlib
import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxdt.analysis import trajectory
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import metadata
from jaxdt.io import results
from jaxdt.io import tensorfile
from jaxdt.io import tensorwriter
from jaxdt.io import untrusted
from jaxdt.report import outputs
from jaxdt.report import summary as summary_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = int(os.environ.get("JAXDT_FUZZ_EXAMPLES", "100"))
BUDGET = 32 << 20
CAP_HEADROOM = 2 << 30  # RLIMIT_AS: what the process maps now, plus this
# What a reader may raise: jaxdt's one-line error types (all ValueError subclasses).
ALLOWED = (disk.StoreError, trajectory.AnalysisError, summary_lib.SummaryError)
# CI replays the same examples; JAXDT_FUZZ_RANDOM=1 draws new ones on every run.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="JAXDT_FUZZ_RANDOM" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture
def budget(monkeypatch):
  monkeypatch.setenv(disk.BUDGET_ENV, str(BUDGET))
  return BUDGET


def _mapped_bytes() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    return int(re.search(r"VmSize:\s+(\d+)", f.read()).group(1)) * 1024


@contextlib.contextmanager
def memory_cap(headroom: int = CAP_HEADROOM):
  """RLIMIT_AS (soft) at what the process maps now plus `headroom`; restored after. An
  allocation sized from a lying header fails with MemoryError instead of taking the machine."""
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  cap = _mapped_bytes() + headroom
  resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else
                                          min(cap, hard), hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _one_line(e: BaseException) -> None:
  assert isinstance(e, ALLOWED), f"{type(e).__name__} escaped: {e!r}"[:500]
  assert isinstance(e, ValueError)
  message = str(e)
  assert message and "\n" not in message and "\r" not in message, message[:500]
  assert len(message) < 2000, message[:500]


def _expect_refusal_or_value(fn, *args, **kw):
  try:
    return fn(*args, **kw)
  except ALLOWED as e:
    _one_line(e)
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"{type(e).__name__} escaped {getattr(fn, '__name__', fn)}: {e!r}"[:600])
  return None


# --- Files to mutate -------------------------------------------------------------------

T, N, D = 6, 3, 4


def _safetensors(path: str, header: dict, data: bytes = b"", *, length=None, size=None) -> None:
  """A safetensors file from a header dict (or raw header bytes), data, and lies: another
  length word, or another (sparse) file size."""
  text = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text) if length is None else length % (1 << 64)))
    f.write(text)
    f.write(data)
    if size is not None:
      f.truncate(max(0, size))


def _tensors(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.02, (T + 1, N, D)).astype(np.float32)
  bits = (w.view(np.uint32) >> 16).astype(np.uint16)
  return {"W": bits, "loss": np.linspace(5, 4, T + 1, dtype=np.float32),
          "last_motion_step": np.array([2, 4, -1], np.int64)}


def finished_run(folder: str) -> str:
  """A finished jaxdt-layout run folder (no training): trajectory, digests, metadata.json."""
  os.makedirs(folder, exist_ok=True)
  name = "t_trajectory.safetensors"
  arrays = _tensors()
  path = os.path.join(folder, name)
  writer = tensorwriter.TrajectoryWriter(path, {k: (a.dtype, a.shape) for k, a in arrays.items()})
  for k, a in arrays.items():
    writer.write(k, a)
  digests = writer.seal()
  writer.commit()
  metadata.write_metadata(folder, {
      "experiment": "fuzz", "config": {"name": "fuzz", "seed": 1, "precision": "bf16",
                                       "optim": {"learning_rate": 0.001, "weight_decay": 0.0},
                                       "store": {"trajectory_name": name}},
      "completed": True, "trajectory_bytes": os.path.getsize(path),
      "trajectory_sha256": digests["file"], "tensor_sha256": digests["tensors"],
      "motion_threshold": 0.1, "hosts": [{"from_step": 0, "cpu_model": "x"}],
      "sweep": {"member": 0}, "diverged_at_step": None})
  return folder


def _valid_header(arrays: dict) -> tuple[dict, bytes]:
  layout = tensorfile.file_layout({k: (a.dtype, a.shape) for k, a in arrays.items()})
  header = {k: {"dtype": s.code, "shape": list(s.shape), "data_offsets": [s.begin, s.end]}
            for k, s in layout.items()}
  data = bytearray(max(s.end for s in layout.values()))
  for k, s in layout.items():
    data[s.begin:s.end] = np.ascontiguousarray(arrays[k]).tobytes()
  return header, bytes(data)


# --- The JSON reader -------------------------------------------------------------------


@pytest.mark.parametrize("text, said", [
    ("[1, NaN]", "non-finite number NaN"), ('{"a": Infinity}', "non-finite number Infinity"),
    ("[-Infinity]", "non-finite number -Infinity"), ("[1e400]", "overflows a float"),
    ("[123456789012345678901234]", "integer of 24 digits"),
    ("[18446744073709551616]", "beyond 64 bits"),
    ("[" * 100_000 + "]" * 100_000, "nests JSON 100000 deep"),
    ('{"a": ' * 70 + "1" + "}" * 70, "nests JSON 70 deep"),
    ('["unterminated', "not valid JSON"), ("\xff", "not valid JSON"),
])
def test_hostile_json_is_one_line(text, said):
  with pytest.raises(disk.StoreError, match=re.escape(said)) as e:
    untrusted.loads(text, "F", "the fix")
  _one_line(e.value)
  assert str(e.value).startswith("F ") and str(e.value).endswith("; the fix")


def test_not_utf8_and_brackets_inside_strings():
  with pytest.raises(disk.StoreError, match="not UTF-8"):
    untrusted.loads(b'["\xff"]', "F", "fix")
  deep_in_a_string = json.dumps(["[" * 10_000, {"k": "{" * 500}])
  assert untrusted.loads(deep_in_a_string, "F", "fix")[0] == "[" * 10_000
  escaped = '["\\\\", "\\"[[[[", ' + "[" * 60 + "]" * 60 + "]"
  assert untrusted.loads(escaped, "F", "fix", max_depth=61)[0] == "\\"


def test_depth_scan_agrees_with_a_reference_across_blocks(monkeypatch):
  def reference(t):  # None where json.loads stops at a backslash outside a string
    depth = deepest = 0
    inside = escaped = False
    for c in t:
      if inside:
        escaped, inside = (False, inside) if escaped else (c == "\\", c != '"')
      elif c == "\\":
        return None
      elif c == '"':
        inside = True
      elif c in "[{":
        depth += 1
        deepest = max(deepest, depth)
      elif c in "]}":
        depth -= 1
    return deepest
  rng = np.random.default_rng(0)
  for block in (1, 3, 1 << 20):
    monkeypatch.setattr(untrusted, "_SCAN_BLOCK", block)
    for _ in range(2000):
      t = "".join(rng.choice(list('[]{}""\\a'), rng.integers(0, 30)))
      if reference(t) is not None:
        assert untrusted.nesting_depth(t.encode()) == reference(t), (block, t)


def test_files_are_bounded_and_fifos_never_block(tmp_path):
  big = tmp_path / "big.json"
  big.write_text("[" + "1," * 100 + "1]")
  with pytest.raises(disk.StoreError, match="more than the 50 such a file may have"):
    untrusted.read_object(str(big), "fix", max_bytes=50)
  fifo = tmp_path / "fifo.json"
  os.mkfifo(fifo)
  with pytest.raises(disk.StoreError, match="not a regular file"):
    untrusted.read_object(str(fifo), "fix")
  with pytest.raises(disk.StoreError, match="not a regular file"):
    untrusted.read_object(str(tmp_path), "fix")
  assert untrusted.read_object(str(tmp_path / "none.json"), "fix", missing_ok=True) is None


def test_schema_puts_objects_and_strings_where_they_belong():
  schema = {"config": dict, "config.store": dict, "config.store.name": str, "hosts": list,
            "hosts[]": dict, "hosts[].from_step": int, "digests.*": str, "rate": float}
  ok = {"config": {"store": {"name": "x"}}, "hosts": [{"from_step": 3}], "digests": {"a": "b"},
        "rate": 1, "other": [1, {}]}
  untrusted.check(ok, schema, "F", "fix")
  for bad, said in (({"config": []}, "config is a list where an object belongs"),
                    ({"config": {"store": {"name": 5}}}, "config.store.name is an integer"),
                    ({"hosts": [{"from_step": True}]}, "hosts[0].from_step is true or false"),
                    ({"digests": {"a\nb": 1}}, "digests['a\\nb'] is an integer"),
                    ({"rate": "1"}, "rate is a string where a number belongs")):
    with pytest.raises(disk.StoreError, match=re.escape(said)) as e:
      untrusted.check(bad, schema, "F", "fix")
    _one_line(e.value)
  with pytest.raises(disk.StoreError, match="has no 'leaves'"):
    untrusted.check({"leaves": None}, {}, "F", "fix", required=("leaves",))


def test_memory_budget_setting(monkeypatch):
  monkeypatch.setenv(disk.BUDGET_ENV, "3M")
  assert disk.memory_budget() == 3 << 20
  monkeypatch.setenv(disk.BUDGET_ENV, "12345")
  assert disk.memory_budget() == 12345
  for bad in ("lots", "-1G", "0"):
    monkeypatch.setenv(disk.BUDGET_ENV, bad)
    with pytest.raises(disk.StoreError, match="is not a size"):
      disk.memory_budget()
  monkeypatch.delenv(disk.BUDGET_ENV)
  assert 0 < disk.memory_budget()


# --- Bounded tensor readers ------------------------------------------------------------


def test_a_zero_byte_tensor_with_huge_dimensions_is_refused(tmp_path, budget):
  path = str(tmp_path / "zero.safetensors")
  _safetensors(path, {"W": {"dtype": "U16", "shape": [1 << 40, 0, 64], "data_offsets": [0, 0]}})
  with pytest.raises(disk.StoreError, match=r"zero.safetensors: tensor 'W' holds no bytes but "
                     r"declares shape \[1099511627776, 0, 64\]") as e:
    tensorfile.TrajectoryReader(path)
  _one_line(e.value)
  assert "memory budget of 33.6 MB (JAXDT_MEMORY_BUDGET)" in str(e.value)


def test_overflowing_shapes_and_non_integer_words_are_refused(tmp_path, budget):
  path = str(tmp_path / "x.safetensors")
  for entry, said in (
      ({"dtype": "U16", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]},
       "byte size does not match"),  # the int64 product wraps to 0; Python's does not
      ({"dtype": "U16", "shape": [2.5], "data_offsets": [0, 5]}, "shape[0] is a number"),
      ({"dtype": "U16", "shape": [True], "data_offsets": [0, 2]}, "shape[0] is true or false"),
      ({"dtype": "U16", "shape": [-1], "data_offsets": [0, 0]}, "outside [0,"),
      ({"dtype": ["U16"], "shape": [1], "data_offsets": [0, 2]}, "its dtype is a list"),
      ({"dtype": "U16", "shape": [1] * 40, "data_offsets": [0, 2]}, "40 dimensions"),
      ({"dtype": "U16", "shape": {}, "data_offsets": [0, 0]}, "its shape is an object"),
      ({"dtype": "U16", "shape": [1], "data_offsets": [0, 2, 4]}, "3 data_offsets"),
      ([], "its entry is a list")):
    _safetensors(path, {"W": entry}, b"\0" * 8)
    with pytest.raises(disk.StoreError, match=re.escape(said)) as e:
      tensorfile.TrajectoryReader(path)
    _one_line(e.value)
  _safetensors(path, {"__metadata__": 5})
  with pytest.raises(disk.StoreError, match="__metadata__ is an integer"):
    tensorfile.TrajectoryReader(path)
  _safetensors(path, {"__metadata__": {"a": [1]}})
  with pytest.raises(disk.StoreError, match=re.escape("__metadata__['a'] is a list")):
    tensorfile.TrajectoryReader(path)


def test_reads_beyond_the_budget_are_refused_before_allocating(tmp_path, budget):
  path = str(tmp_path / "big.safetensors")
  rows = (BUDGET // 64) + 8  # W rows of 64 bytes: one more block than the budget holds
  n = rows * 64
  _safetensors(path, {"W": {"dtype": "U16", "shape": [rows, 1, 32], "data_offsets": [0, n]}},
               size=None)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) + n)  # sparse: no disk used
  with tensorfile.TrajectoryReader(path) as r:
    assert r.rows("W", 0, 2).shape == (2, 1, 32)
    with pytest.raises(disk.StoreError, match=r"reading all of tensor 'W' needs") as e:
      r.read("W")
    _one_line(e.value)


def test_a_sparse_file_promising_a_huge_pass_is_refused_by_analyze(tmp_path, budget):
  """The issue's case: a sparse file whose size matches a 2^30 x 64 header."""
  path = str(tmp_path / "sparse.safetensors")
  n = (1 << 30) * 64 * 2
  _safetensors(path, {"W": {"dtype": "U16", "shape": [1 << 30, 1, 64], "data_offsets": [0, n]}})
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) + n)
  with memory_cap(), pytest.raises(trajectory.AnalysisError) as e:
    outputs.analyze(path, str(tmp_path / "out"), plots=False, echo=lambda s: None)
  _one_line(e.value)
  assert "sparse.safetensors: a streaming pass over tensor 'W' (1,073,741,824 rows" in str(e.value)
  assert not os.path.exists(tmp_path / "out")


# --- Hostile metadata, markers, manifests -----------------------------------------------


def test_hostile_metadata_is_refused_by_every_reader(tmp_path):
  folder = finished_run(str(tmp_path / "run"))
  meta_path = os.path.join(folder, metadata.METADATA_FILE)
  good = json.load(open(meta_path))
  for text in ("[" * 5000 + "]" * 5000, json.dumps({**good, "config": []}),
               json.dumps({**good, "trajectory_bytes": "1e999"}).replace('"1e999"', "1e999"),
               json.dumps({**good, "config": {**good["config"], "store": 7}}),
               json.dumps({**good, "hosts": [3]})):
    with open(meta_path, "w") as f:
      f.write(text)
    for fn in (metadata.read_metadata, lambda p: results.open_result(
        os.path.join(p, "t_trajectory.safetensors")), lambda p: outputs.analyze(
            p, str(tmp_path / "o"), plots=False, echo=lambda s: None),
               lambda p: summary_lib.summarize([p], str(tmp_path / "s"), echo=lambda s: None)):
      with pytest.raises(ALLOWED) as e:
        fn(folder)
      _one_line(e.value)
    assert not metadata.is_complete(folder, "t_trajectory.safetensors")


def test_a_hostile_checkpoint_meta_is_one_line(tmp_path):
  path = checkpoints.save_checkpoint(str(tmp_path), 3, {"a": np.arange(4, dtype=np.float32)})
  meta = os.path.join(path, checkpoints.CHECKPOINT_META)
  good = json.load(open(meta))
  for text in ("{" * 3000, json.dumps({**good, "leaves": {}}), json.dumps([good]),
               json.dumps({**good, "extra": 5}), json.dumps({**good, "step": float("inf")})):
    with open(meta, "w") as f:
      f.write(text)
    for fn in (checkpoints.checkpoint_meta, lambda p: checkpoints.load_checkpoint(
        p, {"a": np.zeros(4, np.float32)})):
      with pytest.raises(disk.StoreError, match="restore from an older checkpoint") as e:
        fn(path)
      _one_line(e.value)


def test_resume_falls_back_past_a_hostile_checkpoint_meta(tiny_data, tmp_path):
  """As for a bad checksum: the newest marker is skipped in one line, the older one used."""
  from conftest import notes_of, tiny_config  # pylint: disable=g-import-not-at-top
  from jaxdt.training import loop  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(tiny_data, steps=12)
  quiet = dict(progress=False, log=lambda s: None)
  ref = loop.train(cfg, str(tmp_path / "ref"), **quiet)
  base = str(tmp_path / "base")
  assert loop.train(cfg, base, stop_after=10, **quiet) is None
  for i, text in enumerate(("[" * 100_000, '{"format": "jaxdt-checkpoint-1", "leaves": {}, '
                            '"extra": {"step": Infinity}}')):
    out = str(tmp_path / f"case{i}")
    shutil.copytree(base, out)
    with open(os.path.join(out, "checkpoints", "step_000009", "meta.json"), "w") as f:
      f.write(text)
    said = []
    result = loop.train(cfg, out, resume=True, progress=False, log=said.append)
    said = notes_of(said)
    assert said[0].startswith("skipping checkpoint step 9: checkpoint ") and "\n" not in said[0]
    assert said[0].endswith("; trying an older one")
    assert said[1] == f"resuming {out} from the checkpoint at step 5"
    with open(result.trajectory, "rb") as a, open(ref.trajectory, "rb") as b:
      assert a.read() == b.read()


# --- Atomic analysis outputs ------------------------------------------------------------


def test_an_interrupted_analysis_leaves_the_old_outputs(tmp_path, monkeypatch):
  folder = finished_run(str(tmp_path / "run"))
  outputs.analyze(folder, echo=lambda s: None)
  names = ["summary.json"] + [f for f in os.listdir(folder) if f.endswith(".png")]
  assert len(names) > 2
  before = {n: open(os.path.join(folder, n), "rb").read() for n in names}
  real = os.replace

  def killed(src, dst):  # the process dies at the rename of its first output
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    outputs.analyze(folder, echo=lambda s: None)
  monkeypatch.setattr(os, "replace", real)
  after = {n: open(os.path.join(folder, n), "rb").read() for n in names}
  assert after == before
  assert sorted(os.listdir(folder)) == sorted(["t_trajectory.safetensors", "metadata.json"]
                                              + names)


def test_summaries_and_pngs_are_written_through_a_synced_rename(tmp_path, monkeypatch):
  folder = finished_run(str(tmp_path / "run"))
  written = []
  real = disk.atomic_write_bytes
  monkeypatch.setattr(disk, "atomic_write_bytes",
                      lambda p, data: (written.append(os.path.basename(p)), real(p, data)))
  outputs.analyze(folder, echo=lambda s: None)
  summary_lib.summarize([folder], str(tmp_path / "sum"), echo=lambda s: None)
  assert written.count("summary.json") == 2 and "frozen_fraction.png" in written
  assert len([w for w in written if w.endswith(".png")]) >= 3


# --- A user's files are never overwritten ------------------------------------------------


def test_an_output_folder_holding_the_users_files_is_refused_and_unchanged(tmp_path):
  from jaxdt.io import rundir  # pylint: disable=g-import-not-at-top
  folder = finished_run(str(tmp_path / "run"))
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "summary.json").write_text('{"my": "own"}')
  (mine / "loss.png").write_bytes(b"my picture")
  before = {p.name: p.read_bytes() for p in mine.iterdir()}
  for fn in (lambda: outputs.analyze(folder, str(mine), echo=lambda s: None),
             lambda: summary_lib.summarize([folder], str(mine), echo=lambda s: None)):
    with pytest.raises(disk.StoreError, match="summary.json exists and jaxdt did not write it") as e:
      fn()
    _one_line(e.value)
  (mine / "summary.json").unlink()
  with pytest.raises(disk.StoreError, match="loss.png exists and jaxdt did not write it"):
    outputs.analyze(folder, str(mine), echo=lambda s: None)
  with rundir.RunDir(str(mine), "x.safetensors") as run:
    with pytest.raises(disk.StoreError, match=r"holds files jaxdt did not write \('loss.png'\)"):
      run.inspect("crucible1")
  assert {p.name: p.read_bytes() for p in mine.iterdir()} == {"loss.png": before["loss.png"]}
  outputs.analyze(folder, str(tmp_path / "ours"), echo=lambda s: None)
  outputs.analyze(folder, str(tmp_path / "ours"), echo=lambda s: None)  # its own: replaced


def test_a_name_the_file_system_cannot_hold_is_refused_before_metadata(tiny_data, tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from jaxdt.training import loop  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(tiny_data, steps=12)
  long_name = "t" * 250 + ".safetensors"  # its .partial is 270 bytes
  cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, trajectory_name=long_name))
  out = tmp_path / "run"
  with pytest.raises(disk.StoreError, match="cannot be created: its name is 270 bytes") as e:
    loop.train(cfg, str(out), progress=False, log=lambda s: None)
  _one_line(e.value)
  assert not out.exists()


# --- Fuzzing ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def mutated_text(draw, doc: str) -> str:
  """A JSON document, then one of: nested deep, cut, spliced, a byte replaced, left as is."""
  how = draw(st.sampled_from(["deep", "cut", "splice", "byte", "same"]))
  if how == "deep":
    k = draw(st.integers(50, 20_000))
    return draw(st.sampled_from(["[", '{"a":'])) * k + doc + draw(st.sampled_from(["]", "}"])) * k
  if how == "same":
    return doc
  i = draw(st.integers(0, len(doc)))
  if how == "cut":
    return doc[:i]
  if how == "splice":
    return doc[:i] + draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "[", "{",
                                           '"', "\\", "]", "99999999999999999999999"])) + doc[i:]
  return doc[:i] + draw(st.characters()) + doc[i + 1:]


@st.composite
def mutated_object(draw, doc: dict, paths) -> str:
  """`doc` with the value at one of `paths` (dotted) replaced by any JSON, then its text
  mutated."""
  doc = json.loads(json.dumps(doc))
  path = draw(st.sampled_from(paths)).split(".")
  node = doc
  for key in path[:-1]:
    node = node.setdefault(key, {}) if isinstance(node, dict) else {}
  if isinstance(node, dict):
    node[path[-1]] = draw(json_values)
  return draw(mutated_text(json.dumps(doc)))


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_the_json_reader(raw):
  got = _expect_refusal_or_value(untrusted.loads, raw, "F", "fix")
  if got is not None:
    assert json.loads(json.dumps(got, allow_nan=False)) == got


HEADER_PATHS = ("W.shape", "W.dtype", "W.data_offsets", "W", "loss.shape",
                "loss.data_offsets", "__metadata__", "__metadata__.k", "last_motion_step.shape",
                "new")


# key -> its shape in a run of T steps, n rows, D hidden units
_RIGHT = {"W": lambda t, n, d: (t + 1, n, d), "embeddings": lambda t, n, d: (t + 1, n, d),
          "delta_W_prime": lambda t, n, d: (t, n, d), "loss": lambda t, n, d: (t + 1,),
          "losses": lambda t, n, d: (t + 1,), "n_frozen": lambda t, n, d: (t,),
          "n_moving": lambda t, n, d: (t,), "dwp_l2_mean": lambda t, n, d: (t,),
          "centroid_norm": lambda t, n, d: (t + 1,), "centroid": lambda t, n, d: (t + 1, d),
          "last_motion_step": lambda t, n, d: (n,), "dead_mask": lambda t, n, d: (n,),
          "dead_indices": lambda t, n, d: (n,), "m": lambda t, n, d: (t + 1, n, d),
          "v": lambda t, n, d: (t + 1, n, d), "adam_cosine": lambda t, n, d: (t,)}


@st.composite
def odd_layout(draw) -> dict:
  """Tensors under the names analyses look for, mostly of the right shapes for some T, n,
  D (any of them 0), sometimes of others, of any dtype, holding any bytes."""
  t, n, d = (draw(st.integers(0, 4)) for _ in range(3))
  keys = draw(st.lists(st.sampled_from(sorted(_RIGHT)), min_size=1, max_size=6, unique=True))
  out = {}
  for k in keys:
    shape = _RIGHT[k](t, n, d)
    if draw(st.integers(0, 4)) == 0:
      shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dtype = np.dtype(draw(st.sampled_from([np.uint16, np.float32, np.int32, np.int64,
                                           np.bool_, np.uint8, np.float64])))
    if k in ("W", "embeddings") and draw(st.booleans()):
      dtype = np.dtype(np.uint16)
    size = math.prod(shape) * dtype.itemsize
    out[k] = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), dtype).reshape(shape)
  return out


@st.composite
def hostile_trajectory(draw, folder: str) -> str:
  """A trajectory whose header, length word or size lies (or a valid odd layout)."""
  arrays = _tensors()
  kind = draw(st.sampled_from(["header", "length", "size", "huge", "layout"]))
  header, data = _valid_header(arrays)
  path = os.path.join(folder, "t.safetensors")
  if kind == "header":
    text = draw(mutated_object(header, HEADER_PATHS)).encode("utf-8", "surrogatepass")
    _safetensors(path, text, data)
  elif kind == "length":
    _safetensors(path, header, data, length=draw(st.integers(0, 1 << 64)))
  elif kind == "size":
    _safetensors(path, header, data, size=draw(st.integers(0, 1 << 34)))
  elif kind == "huge":  # a consistent header over a sparse file, dimensions of any size
    shape = draw(st.lists(st.integers(0, 1 << 31), min_size=1, max_size=4))
    key = draw(st.sampled_from(["W", "loss", "delta_W_prime", "n_frozen", "dead_mask"]))
    nbytes = math.prod(shape) * 2
    if nbytes > 1 << 40:
      shape[0] = 0
      nbytes = 0
    head = {key: {"dtype": "U16" if key == "W" else "F32" if key != "dead_mask" else "BOOL",
                  "shape": shape, "data_offsets": [0, 0]}}
    head[key]["data_offsets"][1] = math.prod(shape) * (2 if key == "W" else 4 if key != "dead_mask"
                                                       else 1)
    _safetensors(path, head, b"")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) + head[key]["data_offsets"][1])
  else:  # a valid file of odd shapes: the analyses meet what a lab file may hold
    _safetensors(path, *_valid_header(draw(odd_layout())))
  return path


@FUZZ
@given(data=st.data())
def test_fuzz_trajectory_readers_and_analyze(tmp_path, budget, data):
  folder = tempfile.mkdtemp(dir=tmp_path)
  path = data.draw(hostile_trajectory(folder))
  with memory_cap():
    reader = _expect_refusal_or_value(tensorfile.TrajectoryReader, path)
    if reader is not None:
      for k in reader.keys():
        _expect_refusal_or_value(reader.read, k)
      reader.close()
    _expect_refusal_or_value(outputs.analyze, path, os.path.join(folder, "out"),
                             plots=data.draw(st.integers(0, 7)) == 0, echo=lambda s: None)
  shutil.rmtree(folder)


METADATA_PATHS = ("config", "config.store", "config.store.trajectory_name", "config.name",
                  "config.optim", "config.optim.learning_rate", "config.seed", "completed",
                  "trajectory_bytes", "tensor_sha256", "tensor_sha256.W", "hosts", "sweep",
                  "sweep.member", "motion_threshold", "diverged_at_step", "learning_rate",
                  "cpu_features", "framework")


@pytest.fixture(scope="module")
def run_template(tmp_path_factory):
  return finished_run(str(tmp_path_factory.mktemp("template") / "run"))


@FUZZ
@given(data=st.data())
def test_fuzz_metadata_readers_analyze_and_summarize(tmp_path, budget, run_template, data):
  folder = os.path.join(tempfile.mkdtemp(dir=tmp_path), "run")
  shutil.copytree(run_template, folder)
  meta_path = os.path.join(folder, metadata.METADATA_FILE)
  good = json.load(open(meta_path))
  with open(meta_path, "w", encoding="utf-8", errors="surrogatepass") as f:
    f.write(data.draw(mutated_object(good, METADATA_PATHS)))
  with memory_cap():
    _expect_refusal_or_value(metadata.read_metadata, folder)
    _expect_refusal_or_value(metadata.is_complete, folder, "t_trajectory.safetensors")
    _expect_refusal_or_value(outputs.analyze, folder, os.path.join(folder, "..", "a"),
                             plots=False, echo=lambda s: None)
    _expect_refusal_or_value(summary_lib.summarize, [folder], os.path.join(folder, "..", "s"),
                             echo=lambda s: None)
  shutil.rmtree(os.path.dirname(folder))


CHECKPOINT_PATHS = ("format", "step", "extra", "extra.step", "covers", "covers.trajectory",
                    "leaves", "sha256", "sha256.arrays.safetensors", "marker_sha256")


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_markers(tmp_path, data):
  folder = tempfile.mkdtemp(dir=tmp_path)
  like = {"a": np.arange(4, dtype=np.float32), "b": np.zeros((2, 2), np.int32)}
  path = checkpoints.save_checkpoint(folder, 3, like, extra={"pos": 1},
                                     covers={"trajectory": {"W": {"rows": 2, "sha256": "0"}}})
  meta_path = os.path.join(path, checkpoints.CHECKPOINT_META)
  good = json.load(open(meta_path))
  good.pop("marker_sha256")  # mutations that keep the marker's own digest reach further
  with open(meta_path, "w", encoding="utf-8", errors="surrogatepass") as f:
    f.write(data.draw(mutated_object(good, CHECKPOINT_PATHS)))
  with memory_cap():
    _expect_refusal_or_value(checkpoints.checkpoint_meta, path)
    _expect_refusal_or_value(checkpoints.load_checkpoint, path, like)
  shutil.rmtree(folder)


# --- The command line -------------------------------------------------------------------


def _cli(*flags, env=None):
  cap = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))"
  return subprocess.run([sys.executable, "-c", f"{cap}; import runpy, sys; sys.argv = "
                         f"['run.py', *{list(flags)!r}]; runpy.run_path('run.py', "
                         "run_name='__main__')"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_cli_hostile_files_exit_2_with_one_line(tmp_path):
  zero = str(tmp_path / "zero.safetensors")
  _safetensors(zero, {"W": {"dtype": "U16", "shape": [1 << 40, 0, 64], "data_offsets": [0, 0]}})
  folder = finished_run(str(tmp_path / "run"))
  with open(os.path.join(folder, metadata.METADATA_FILE), "w") as f:
    f.write("[" * 100_000)
  for flags, culprit in (((f"--analyze={zero}",), "tensor 'W'"),
                         ((f"--summarize={folder}", f"--output_dir={tmp_path / 's'}"),
                          "metadata.json")):
    p = _cli(*flags, env={disk.BUDGET_ENV: "1G"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], lines
    assert "Traceback" not in p.stderr
  assert not os.path.exists(tmp_path / "s")
