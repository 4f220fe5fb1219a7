"""Tests of jaxdt.io: in-place safetensors writing, readers, markers, checkpoints.

Files are tiny except in the RSS test, which streams 300 MB in 1 MB chunks in a
child process (so this process's earlier allocations cannot hide growth).
"""

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import tensorfile
from jaxdt.io import tensorwriter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, TOKENS, DIM, VOCAB = 22, 9, 4, 20
NAME = "crucible_1_trajectory.safetensors"
# The Crucible 1 layout (docs/definitions.md §Steps and files), at toy sizes.
SPECS = {
    "W": (np.uint16, (STEPS + 1, TOKENS, DIM)),
    "delta_W_prime": (np.float32, (STEPS, TOKENS, DIM)),
    "centroid": (np.float32, (STEPS + 1, DIM)),
    "loss": (np.float32, (STEPS + 1,)),
    "last_motion_step": (np.int32, (TOKENS,)),
    "dead_mask": (np.bool_, (VOCAB,)),
    "dead_indices": (np.int64, (TOKENS,)),
}
ROW_KEYS = ("W", "delta_W_prime", "centroid", "loss")
META = {"experiment": "Crucible 1", "motion_threshold": "0.1"}
RSS_FILE_MB, RSS_CHUNK_MB, RSS_LIMIT_MB = 300, 1, 30


def _records(seed=0):
  """Deterministic contents for SPECS, with NaN/inf bit patterns that must survive."""
  rng = np.random.default_rng(seed)
  out = {
      "W": rng.integers(0, 1 << 16, SPECS["W"][1], dtype=np.uint16),
      "delta_W_prime": rng.standard_normal(SPECS["delta_W_prime"][1]).astype(np.float32),
      "centroid": rng.standard_normal(SPECS["centroid"][1]).astype(np.float32),
      "loss": rng.standard_normal(SPECS["loss"][1]).astype(np.float32),
      "last_motion_step": rng.integers(-1, STEPS, TOKENS, dtype=np.int32),
      "dead_mask": rng.random(VOCAB) < 0.4,
      "dead_indices": np.sort(rng.choice(VOCAB, TOKENS, replace=False)).astype(np.int64),
  }
  out["loss"][0] = np.nan  # the lab's loss[0]
  out["delta_W_prime"][0, 0, 0] = np.inf  # ΔW′ at W[t-1] = 0
  return out


def _write_rows(writer, records, chunk, start=0):
  """Writes the per-step tensors in chunks of `chunk` rows from `start`, as the trainer does."""
  for key in ROW_KEYS:
    n = len(records[key])
    for first in range(start, n, chunk):
      writer.write_rows(key, first, records[key][first:first + chunk])


def _write_whole(writer, records):
  for key in SPECS:
    if key not in ROW_KEYS:
      writer.write(key, records[key])


def _write_file(path, records, chunk):
  writer = tensorwriter.TrajectoryWriter(path, SPECS, META)
  _write_rows(writer, records, chunk)
  _write_whole(writer, records)
  return writer.finalize()


def _bits(a):
  """A bit view for exact comparison (NaN == NaN)."""
  a = np.asarray(a)
  if a.dtype.itemsize in (2, 4, 8) and a.dtype.kind in "fV" or a.dtype == ml_dtypes.bfloat16:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
  return a


def _read(path):
  with open(path, "rb") as f:
    return f.read()


# The writer.


@pytest.fixture
def path(tmp_path):
  """The trajectory file's path in a fresh folder."""
  return os.path.join(tmp_path, NAME)


@pytest.fixture
def records():
  return _records()


def test_header_is_written_first_and_data_preallocated(path):
  writer = tensorwriter.TrajectoryWriter(path, SPECS, META)
  partial = path + ".partial"
  assert not os.path.exists(path)
  assert os.path.getsize(partial) == tensorfile.estimate_bytes(SPECS, META)
  raw = _read(partial)
  n = int.from_bytes(raw[:8], "little")
  assert (8 + n) % 8 == 0
  text = raw[8:8 + n].decode("utf-8")
  header = json.loads(text)
  assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))
  assert header["__metadata__"] == META
  codes = {k: header[k]["dtype"] for k in SPECS}
  assert codes == {"W": "U16", "delta_W_prime": "F32", "centroid": "F32", "loss": "F32",
                   "last_motion_step": "I32", "dead_mask": "BOOL", "dead_indices": "I64"}
  spans = sorted(tuple(header[k]["data_offsets"]) for k in SPECS)
  assert spans[0][0] == 0
  for (_, end), (begin, _) in zip(spans, spans[1:]):
    assert end == begin  # contiguous
  for k, (dtype, shape) in SPECS.items():  # each tensor aligned to its item size
    assert header[k]["shape"] == list(shape)
    assert (8 + n + header[k]["data_offsets"][0]) % np.dtype(dtype).itemsize == 0
  assert 8 + n + spans[-1][1] == len(raw)
  with safe_open(partial, "np") as f:  # already a valid (all-zero) safetensors file
    assert f.get_tensor("W").shape == SPECS["W"][1]
    assert not f.get_tensor("W").any()
  writer.close()


@pytest.mark.parametrize("chunk", [1, 7, STEPS + 1])
def test_chunk_size_does_not_change_the_bytes(tmp_path, path, records, chunk):
  reference = _read(_write_file(os.path.join(tmp_path, "ref.safetensors"), records, 5))
  assert _read(_write_file(path, records, chunk)) == reference


def test_partial_until_finalize_and_finalize_is_idempotent(path, records):
  writer = tensorwriter.TrajectoryWriter(path, SPECS, META)
  _write_rows(writer, records, 4)
  _write_whole(writer, records)
  writer.sync()
  assert os.path.exists(path + ".partial")
  assert not os.path.exists(path)
  assert writer.finalize() == path
  assert writer.finalize() == path
  assert not os.path.exists(path + ".partial")
  assert os.path.getsize(path) == writer.nbytes
  with pytest.raises(disk.StoreError, match="finalized"):
    writer.write("last_motion_step", records["last_motion_step"])


def test_unfinished_writer_leaves_the_partial(path, records):
  writer = tensorwriter.TrajectoryWriter(path, SPECS)
  writer.write_rows("W", 0, records["W"][:3])
  del writer
  gc.collect()
  assert os.path.exists(path + ".partial")
  assert not os.path.exists(path)
  with pytest.raises(RuntimeError):
    with tensorwriter.TrajectoryWriter(path, SPECS) as writer:
      writer.write_rows("W", 0, records["W"][:3])
      raise RuntimeError("the trainer crashed")
  assert os.path.exists(path + ".partial")
  assert not os.path.exists(path)
  with pytest.raises(disk.StoreError, match="closed unfinished"):
    writer.finalize()


def test_resume_continues_in_place_with_identical_bytes(tmp_path, path, records):
  reference = _read(_write_file(os.path.join(tmp_path, "ref.safetensors"), records, 5))
  crashed_at, checkpoint_row = 15, 10  # rows past the checkpoint are rewritten
  writer = tensorwriter.TrajectoryWriter(path, SPECS, META)
  for key in ROW_KEYS:
    writer.write_rows(key, 0, records[key][:crashed_at])
  writer.write("dead_mask", records["dead_mask"])
  writer.close()  # the process dies here
  resumed = tensorwriter.TrajectoryWriter(path, SPECS, META, resume=True)
  _write_rows(resumed, records, 3, start=checkpoint_row)
  _write_whole(resumed, records)
  assert _read(resumed.finalize()) == reference


def test_resume_refuses_another_header(path):
  tensorwriter.TrajectoryWriter(path, SPECS, META).close()
  other = dict(SPECS, W=(np.uint16, (STEPS + 2, TOKENS, DIM)))
  cases = [(other, META, "tensor 'W'"), (SPECS, {"experiment": "x"}, "metadata"),
           (dict(SPECS, W=(np.float32, SPECS["W"][1])), META, "tensor 'W'")]
  for specs, meta, what in cases:
    with pytest.raises(disk.StoreError) as e:
      tensorwriter.TrajectoryWriter(path, specs, meta, resume=True)
    message = str(e.value)
    assert path + ".partial" in message
    assert what in message
    assert "start without resume" in message
    assert "\n" not in message


def test_resume_needs_the_partial(path, records):
  with pytest.raises(disk.StoreError, match=r"\.partial does not exist; start the run "):
    tensorwriter.TrajectoryWriter(path, SPECS, resume=True)
  _write_file(path, records, 8)
  with pytest.raises(disk.StoreError, match="already finished"):
    tensorwriter.TrajectoryWriter(path, SPECS, META, resume=True)


def test_a_finished_file_is_not_clobbered_by_default(path, records):
  _write_file(path, records, 8)
  with pytest.raises(disk.StoreError, match="already exists"):
    tensorwriter.TrajectoryWriter(path, SPECS, META)
  writer = tensorwriter.TrajectoryWriter(path, SPECS, META, overwrite=True)
  assert not os.path.exists(path)  # gone at once: never mistaken for this run's
  writer.close()


def test_bf16_arrays_are_written_as_their_bits(path, records):
  bits = records["W"][:4]
  writer = tensorwriter.TrajectoryWriter(path, SPECS)
  writer.write_rows("W", 0, jnp.asarray(bits.view(ml_dtypes.bfloat16)))
  writer.write_rows("W", 4, bits.view(ml_dtypes.bfloat16))
  writer.finalize()
  with tensorfile.TrajectoryReader(path) as reader:
    np.testing.assert_array_equal(reader.rows("W", 0, 4), bits)
    np.testing.assert_array_equal(reader.rows("W", 4, 8), bits)


def test_empty_and_scalar_tensors(path):
  specs = {"none": (np.float32, (0, 3)), "W": (np.uint16, (2, 2)), "step": (np.int64, ()),
           "flag": (np.bool_, ())}
  writer = tensorwriter.TrajectoryWriter(path, specs)
  writer.write_rows("none", 0, np.zeros((0, 3), np.float32))
  writer.write_rows("W", 0, np.array([[1, 2], [3, 4]], np.uint16))
  writer.write("step", np.int64(-5))
  writer.write("flag", np.bool_(True))
  writer.finalize()
  lab = torch_load_file(path)
  with tensorfile.TrajectoryReader(path) as reader, safe_open(path, "np") as st:
    for key in specs:
      np.testing.assert_array_equal(reader.read(key), st.get_tensor(key))
      np.testing.assert_array_equal(reader.read(key), lab[key].numpy())
    assert reader.read("none").shape == (0, 3)
    assert reader.read("step") == -5


def test_bad_specs_are_one_line_errors(path):
  bad = [
      ({}, "non-empty"),
      ({"W": (np.float16, (2,))}, "never as float16"),
      ({"W": (np.complex64, (2,))}, "unsupported dtype"),
      ({"W": ("nonsense", (2,))}, "not a numpy dtype"),
      ({"W": (np.uint16, (2, -1))}, "negative"),
      ({"W": (np.uint16, (2.5,))}, "tuple of ints"),
      ({"W": np.uint16}, r"\(dtype, shape\)"),
      ({"__metadata__": (np.uint16, (2,))}, "not usable"),
  ]
  for specs, pattern in bad:
    with pytest.raises(disk.StoreError, match=pattern) as e:
      tensorwriter.TrajectoryWriter(path, specs)
    assert "\n" not in str(e.value)
  with pytest.raises(disk.StoreError, match="str to str"):
    tensorwriter.TrajectoryWriter(path, SPECS, {"steps": 5})
  assert isinstance(disk.StoreError("x"), ValueError)


def test_bad_writes_are_one_line_errors(tmp_path, path, records):
  writer = tensorwriter.TrajectoryWriter(path, SPECS)
  w = records["W"]
  bad = [
      (lambda: writer.write_rows("V", 0, w), r"no tensor 'V'.*\['W', "),
      (lambda: writer.write_rows("W", 0, w.astype(np.int32)), "is uint16, got int32; cast"),
      (lambda: writer.write_rows("W", 0, w[:, :, :2]), r"shape \(n, 9, 4\), got \(23, 9, 2\)"),
      (lambda: writer.write_rows("W", 0, w[0]), r"shape \(n, 9, 4\)"),
      (lambda: writer.write_rows("W", 20, w[:4]), r"rows \[20, 24\) of 'W'.*has 23 rows"),
      (lambda: writer.write_rows("W", -1, w[:1]), "out of range"),
      (lambda: writer.write_rows("loss", 0, np.zeros((3, 1), np.float32)), r"shape \(n,\)"),
      (lambda: writer.write("dead_mask", np.zeros(VOCAB + 1, bool)), r"shape \(20,\)"),
      (lambda: writer.write("dead_indices", np.zeros(TOKENS, np.int32)), "int64, got int32"),
  ]
  for call, pattern in bad:
    with pytest.raises(disk.StoreError, match=pattern) as e:
      call()
    assert "\n" not in str(e.value)
  scalar = tensorwriter.TrajectoryWriter(os.path.join(tmp_path, "s.safetensors"),
                                       {"step": (np.int64, ())})
  with pytest.raises(disk.StoreError, match="0-d; write it with write"):
    scalar.write_rows("step", 0, np.zeros(1, np.int64))
  scalar.write("step", np.int64(7))
  with tensorfile.TrajectoryReader(scalar.finalize()) as reader:
    assert reader.read("step") == 7
  writer.close()
  with pytest.raises(disk.StoreError, match="closed; reopen it with resume=True"):
    writer.write_rows("W", 0, w)


# Memory.


_RSS_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from jaxdt.io import tensorwriter
    path, total_mb, chunk_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rows = total_mb // chunk_mb
    chunk = np.zeros((1, chunk_mb << 19), np.uint16)  # one row = chunk_mb MB
    writer = tensorwriter.TrajectoryWriter(path, {"W": (np.uint16, (rows, chunk.shape[1]))})
    writer.write_rows("W", 0, chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for t in range(1, rows):
      chunk[0, :8] = t  # fresh contents each chunk, as a trainer's records have
      writer.write_rows("W", t, chunk)
    path = writer.finalize()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "bytes": os.path.getsize(path)}))
""")


def test_peak_rss_stays_flat_while_streaming(tmp_path):
  path = os.path.join(tmp_path, "big.safetensors")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-c", _RSS_CHILD, path, str(RSS_FILE_MB), str(RSS_CHUNK_MB)],
      env=env, cwd=REPO, capture_output=True, text=True, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"RSS child: {got}")  # for the log: the figures behind the limit below
  assert got["bytes"] > RSS_FILE_MB << 20
  growth_mb = (got["after_kb"] - got["before_kb"]) / 1024  # ru_maxrss is in KiB on Linux
  assert growth_mb < RSS_LIMIT_MB, (f"peak RSS grew {growth_mb:.1f} MB "
                                    f"while writing {RSS_FILE_MB} MB")
  with tensorfile.TrajectoryReader(path) as reader:  # and the chunks landed where they belong
    for t in (0, 1, RSS_FILE_MB // 2, RSS_FILE_MB - 1):
      np.testing.assert_array_equal(reader.rows("W", t, t + 1)[0, :9], [t] * 8 + [0])


# The reader.


class _Written(NamedTuple):
  path: str
  records: dict


@pytest.fixture
def written(tmp_path):
  """A finished trajectory file of _records(1), written in chunks of 6 rows."""
  records = _records(1)
  return _Written(_write_file(os.path.join(tmp_path, NAME), records, 6), records)


def test_ours_safe_open_and_torch_load_file_agree_bit_for_bit(written):
  lab = torch_load_file(written.path)  # the lab's own loader
  with tensorfile.TrajectoryReader(written.path) as reader, safe_open(written.path, "np") as st:
    assert reader.keys() == list(SPECS)
    assert reader.metadata == META
    assert st.metadata() == META
    assert sorted(lab) == sorted(SPECS)
    for key, want in written.records.items():
      ours = reader.read(key)
      assert ours.dtype == want.dtype
      assert reader.dtype(key) == want.dtype
      assert reader.shape(key) == want.shape
      np.testing.assert_array_equal(_bits(ours), _bits(want))
      np.testing.assert_array_equal(_bits(st.get_tensor(key)), _bits(want))
      np.testing.assert_array_equal(_bits(lab[key].numpy()), _bits(want))
  assert lab["W"].dtype == torch.uint16


def test_rows_reads_only_the_asked_rows(written):
  with tensorfile.TrajectoryReader(written.path) as reader:
    np.testing.assert_array_equal(reader.rows("W", 5, 12), written.records["W"][5:12])
    np.testing.assert_array_equal(_bits(reader.rows("delta_W_prime", 17)),
                                  _bits(written.records["delta_W_prime"][17:]))
    assert reader.rows("centroid", 4, 4).shape == (0, DIM)
    with pytest.raises(disk.StoreError, match=r"rows \[3, 99\) of 'W'.*has 23 rows"):
      reader.rows("W", 3, 99)
    with pytest.raises(disk.StoreError, match="no tensor 'm'"):
      reader.rows("m", 0, 1)


def test_reads_the_lab_layout_with_bf16(tmp_path, written):
  gen = torch.Generator().manual_seed(0)
  w = torch.randn(6, 5, 3, generator=gen).to(torch.bfloat16)
  lab = {"W_bf16": w, "W": w.view(torch.uint16).clone(), "loss": torch.randn(6, generator=gen),
         "dead_indices": torch.arange(5), "dead_mask": torch.arange(10) % 3 == 0,
         "last_motion_step": torch.arange(5, dtype=torch.int32) - 1}
  path = os.path.join(tmp_path, "thimble_8_trajectory.safetensors")
  torch_save_file(lab, path, metadata={"source": "lab"})
  with tensorfile.TrajectoryReader(path) as reader:
    assert sorted(reader.keys()) == sorted(lab)
    assert reader.metadata == {"source": "lab"}
    assert reader.raw_dtype("W_bf16") == "BF16"
    assert reader.dtype("W_bf16") == np.uint16
    bits = w.view(torch.uint16).numpy()
    np.testing.assert_array_equal(reader.rows("W_bf16", 2, 5), bits[2:5])
    np.testing.assert_array_equal(reader.read("W"), bits)
    for key in ("loss", "dead_indices", "dead_mask", "last_motion_step"):
      np.testing.assert_array_equal(_bits(reader.read(key)), _bits(lab[key].numpy()))


def test_truncated_and_missing_files_are_one_line_errors(tmp_path, written):
  short = os.path.join(tmp_path, "short.safetensors")
  with open(short, "wb") as f:
    f.write(_read(written.path)[:-1])
  with pytest.raises(disk.StoreError, match="truncated or padded, re-create it"):
    tensorfile.TrajectoryReader(short)
  with open(short, "wb") as f:
    f.write(b"\xff" * 16)
  with pytest.raises(disk.StoreError, match="corrupt safetensors header"):
    tensorfile.TrajectoryReader(short)
  unfinished = os.path.join(tmp_path, "run.safetensors")
  tensorwriter.TrajectoryWriter(unfinished, SPECS).close()
  with pytest.raises(disk.StoreError, match=r"not found \(the run is unfinished\)"):
    tensorfile.TrajectoryReader(unfinished)


# Metadata.


def test_write_metadata_is_indented_json_written_atomically(tmp_path):
  meta = {"experiment": "Crucible 1", "final_loss": np.float32(5.25),
          "data_shapes": {"W": [5001, 3699, 64]}, "global_last_motion": np.int64(2509)}
  path = metadata_lib.write_metadata(os.path.join(tmp_path, "run"), meta)
  with open(path) as f:
    text = f.read()
  plain = {**meta, "final_loss": 5.25, "global_last_motion": 2509}
  assert text == json.dumps(plain, indent=2) + "\n"
  assert metadata_lib.read_metadata(os.path.dirname(path)) == plain
  assert os.listdir(os.path.dirname(path)) == ["metadata.json"]  # no tmp left


def test_is_complete_follows_the_run_lifecycle(tmp_path):
  folder = str(tmp_path)
  records = _records(2)
  assert not metadata_lib.is_complete(folder, NAME)
  metadata_lib.write_metadata(folder, {"completed": False})
  writer = tensorwriter.TrajectoryWriter(os.path.join(folder, NAME), SPECS, META)
  _write_rows(writer, records, 9)
  _write_whole(writer, records)
  assert not metadata_lib.is_complete(folder, NAME)  # only a .partial
  path = writer.finalize()
  assert not metadata_lib.is_complete(folder, NAME)  # marker not written yet
  size = os.path.getsize(path)
  metadata_lib.write_metadata(folder, {"completed": True, "trajectory_bytes": size + 8})
  assert not metadata_lib.is_complete(folder, NAME)  # sizes disagree
  metadata_lib.write_metadata(folder, {"completed": "yes", "trajectory_bytes": size})
  assert not metadata_lib.is_complete(folder, NAME)
  metadata_lib.write_metadata(folder, {"completed": True, "trajectory_bytes": size})
  assert metadata_lib.is_complete(folder, NAME)
  os.remove(path)
  assert not metadata_lib.is_complete(folder, NAME)


# Checkpoints.


class State(NamedTuple):
  params: dict
  mu: dict
  nu: dict
  count: jax.Array
  key: jax.Array
  position: np.ndarray
  last_motion_step: np.ndarray
  epoch: int


def _state(seed):
  """A toy TrainState: bf16 params, f32 and bf16 moments, scalars, a typed key."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"embedding": jax.random.normal(k1, (VOCAB, DIM), jnp.bfloat16),
            "ln_f": {"scale": jax.random.normal(k2, (DIM,), jnp.bfloat16)}}
  return State(
      params=params,
      mu=jax.tree_util.tree_map(lambda p: p.astype(jnp.float32) * 1e-3, params),
      nu=jax.tree_util.tree_map(lambda p: jnp.square(p) * 1e-6, params),  # stays bf16
      count=jnp.int32(seed), key=k3,
      position=np.array([seed, seed + 1], np.int64),
      last_motion_step=np.full(TOKENS, seed - 1, np.int32), epoch=seed)


@pytest.fixture
def state():
  return _state(1)


def _assert_bit_identical(got, want):
  got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(got_leaves, want_leaves):
    assert type(a) is type(b)
    if checkpoints._is_key(b):  # pylint: disable=protected-access
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_round_trip_into_a_differently_seeded_state_is_bit_exact(tmp_path, state):
  folder = str(tmp_path)
  extra = {"step": 10, "data_position": 10, "config": {"lr": 1e-3}}
  path = checkpoints.save_checkpoint(folder, 10, state, extra)
  assert path == os.path.join(folder, "step_000010")
  assert sorted(os.listdir(path)) == ["arrays.safetensors", "meta.json"]
  other = _state(2)
  assert not np.array_equal(_bits(other.params["embedding"]), _bits(state.params["embedding"]))
  restored, got_extra = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(folder), other)
  assert got_extra == extra
  _assert_bit_identical(restored, state)
  assert restored.params["embedding"].dtype == jnp.bfloat16
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  assert meta["step"] == 10
  names = {leaf["name"]: leaf["dtype"] for leaf in meta["leaves"]}
  assert names[".params['embedding']"] == "BF16"
  assert names[".mu['embedding']"] == "F32"
  assert names[".count"] == "I32"
  with safe_open(os.path.join(path, "arrays.safetensors"), "np") as f:  # plain safetensors
    assert ".params['ln_f']['scale']" in f.keys()


def test_read_arrays_by_name_checks_the_marker(tmp_path, state):
  path = checkpoints.save_checkpoint(str(tmp_path), 7, state)
  got = checkpoints.read_arrays(path, [".params['embedding']", ".count"])
  assert got[".params['embedding']"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(_bits(got[".params['embedding']"]),
                                _bits(state.params["embedding"]))
  assert int(got[".count"]) == int(state.count)
  with pytest.raises(disk.StoreError, match=r"has no leaf '.nope'; pass a checkpoint"):
    checkpoints.read_arrays(path, [".nope"])
  arrays = os.path.join(path, "arrays.safetensors")
  with open(arrays, "r+b") as f:  # one flipped byte at the end (a value, not the header)
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 0xFF]))
  with pytest.raises(disk.StoreError, match="does not match the SHA-256 in its marker"):
    checkpoints.read_arrays(path, [".count"])


def test_restores_into_an_abstract_state(tmp_path, state):
  folder = str(tmp_path)
  tree = {"params": state.params, "count": state.count}
  checkpoints.save_checkpoint(folder, 3, tree)
  like = jax.eval_shape(lambda: tree)
  restored, extra = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(folder), like)
  assert extra == {}
  _assert_bit_identical(restored, tree)


def test_truncated_checkpoint_is_ignored(tmp_path, state):
  folder = str(tmp_path)
  checkpoints.save_checkpoint(folder, 10, state)
  checkpoints.save_checkpoint(folder, 20, _state(3))
  os.remove(os.path.join(folder, "step_000020", "meta.json"))  # died before the marker
  later = tensorwriter.TrajectoryWriter(os.path.join(folder, "step_000030", "arrays.safetensors"),
                                      {"x": (np.float32, (4,))})
  later.close()  # died while writing arrays
  assert checkpoints.latest_checkpoint(folder) == os.path.join(folder, "step_000010")
  with pytest.raises(disk.StoreError, match="no meta.json .unfinished write.; restore"):
    checkpoints.load_checkpoint(os.path.join(folder, "step_000020"), state)
  checkpoints.save_checkpoint(folder, 20, _state(4))  # re-saving a step replaces it whole
  restored, _ = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(folder), state)
  _assert_bit_identical(restored, _state(4))


def test_latest_checkpoint_without_checkpoints_is_none(tmp_path):
  folder = str(tmp_path)
  assert checkpoints.latest_checkpoint(os.path.join(folder, "missing")) is None
  os.makedirs(os.path.join(folder, "step_000005"))
  os.makedirs(os.path.join(folder, "notes"))
  assert checkpoints.latest_checkpoint(folder) is None


def test_a_state_that_does_not_fit_is_a_one_line_error(tmp_path, state):
  path = checkpoints.save_checkpoint(str(tmp_path), 1, state)
  wide = state._replace(count=jnp.float32(1))
  small = state._replace(last_motion_step=np.zeros(TOKENS - 1, np.int32))
  fewer = {"params": state.params}
  cases = [(wide, r"'.count' is I32\[\], the state wants F32\[\]"),
           (small, r"'.last_motion_step' is I32\[9\], the state wants I32\[8\]"),
           (fewer, "state leaf \"\\['params'\\]\\['embedding'\\]\" is not in it")]
  for like, pattern in cases:
    with pytest.raises(disk.StoreError, match=pattern) as e:
      checkpoints.load_checkpoint(path, like)
    assert "restore with the config the checkpoint was saved with" in str(e.value)
    assert "\n" not in str(e.value)


# Preflight.


def test_refuses_absurd_disk_with_one_line(tmp_path):
  with pytest.raises(disk.StoreError) as e:
    disk.preflight(os.path.join(tmp_path, "new", "run"), 10**18, file_name=NAME)
  message = str(e.value)
  assert re.search(r"^not enough disk for crucible_1_trajectory\.safetensors: need "
                   r"1,000,000 TB, [\d.,]+ [KMGT]?B free in .*new/run; pass --output_dir on a "
                   r"larger disk or fewer --steps$", message), message
  assert "\n" not in message


def test_refuses_absurd_ram(tmp_path):
  if not os.path.exists("/proc/meminfo"):
    pytest.skip("no /proc/meminfo: the RAM check is skipped on this system")
  with pytest.raises(disk.StoreError, match=r"^not enough RAM for crucible_1_traj.*: need "
                     r"1,000 TB, [\d.,]+ [KMGT]?B available; pass a smaller"):
    disk.preflight(str(tmp_path), 1, 10**15, file_name=NAME)


def test_passes_when_it_fits(tmp_path):
  disk.preflight(str(tmp_path), tensorfile.estimate_bytes(SPECS), 1 << 20, file_name=NAME)


def test_estimate_bytes_is_the_file_size(tmp_path):
  assert (os.path.getsize(_write_file(os.path.join(tmp_path, NAME), _records(), 7))
          == tensorfile.estimate_bytes(SPECS, META))
  crucible_1 = {  # the lab printed "File size: 7.10 GB" (its Crucible 1 notebook)
      "W": (np.uint16, (5001, 3699, 64)), "delta_W_prime": (np.float32, (5000, 3699, 64)),
      "centroid": (np.float32, (5001, 64)), "loss": (np.float32, (5001,)),
      "last_motion_step": (np.int32, (3699,)), "dead_mask": (np.bool_, (10000,)),
      "dead_indices": (np.int64, (3699,))}
  assert f"{tensorfile.estimate_bytes(crucible_1) / 1e9:.2f}" == "7.10"
