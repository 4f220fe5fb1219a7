"""Tests of jaxdt.io: in-place safetensors writing, readers, markers, checkpoints.

Files are tiny except in the RSS test, which streams 300 MB in 1 MB chunks in a
child process (so this process's earlier allocations cannot hide growth).
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from absl.testing import absltest
from absl.testing import parameterized
from safetensors import safe_open
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import tensorfile

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
  writer = tensorfile.TrajectoryWriter(path, SPECS, META)
  _write_rows(writer, records, chunk)
  _write_whole(writer, records)
  return writer.finalize()


def _bits(a):
  """A bit view for exact comparison (NaN == NaN)."""
  a = np.asarray(a)
  if a.dtype.itemsize in (2, 4, 8) and a.dtype.kind in "fV" or a.dtype == ml_dtypes.bfloat16:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
  return a


def _tempdir(test):
  """A fresh directory removed after `test` (absl's create_tempdir needs parsed flags)."""
  path = tempfile.mkdtemp(prefix="store_test_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _read(path):
  with open(path, "rb") as f:
    return f.read()


class WriterTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)
    self.path = os.path.join(self.dir, NAME)
    self.records = _records()

  def test_header_is_written_first_and_data_preallocated(self):
    writer = tensorfile.TrajectoryWriter(self.path, SPECS, META)
    partial = self.path + ".partial"
    self.assertFalse(os.path.exists(self.path))
    self.assertEqual(os.path.getsize(partial), tensorfile.estimate_bytes(SPECS, META))
    raw = _read(partial)
    n = int.from_bytes(raw[:8], "little")
    self.assertEqual((8 + n) % 8, 0)
    text = raw[8:8 + n].decode("utf-8")
    header = json.loads(text)
    self.assertEqual(text, text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" "))))
    self.assertEqual(header["__metadata__"], META)
    codes = {k: header[k]["dtype"] for k in SPECS}
    self.assertEqual(codes, {"W": "U16", "delta_W_prime": "F32", "centroid": "F32", "loss": "F32",
                             "last_motion_step": "I32", "dead_mask": "BOOL", "dead_indices": "I64"})
    spans = sorted(tuple(header[k]["data_offsets"]) for k in SPECS)
    self.assertEqual(spans[0][0], 0)
    for (_, end), (begin, _) in zip(spans, spans[1:]):
      self.assertEqual(end, begin)  # contiguous
    for k, (dtype, shape) in SPECS.items():  # each tensor aligned to its item size
      self.assertEqual(header[k]["shape"], list(shape))
      self.assertEqual((8 + n + header[k]["data_offsets"][0]) % np.dtype(dtype).itemsize, 0)
    self.assertEqual(8 + n + spans[-1][1], len(raw))
    with safe_open(partial, "np") as f:  # already a valid (all-zero) safetensors file
      self.assertEqual(f.get_tensor("W").shape, SPECS["W"][1])
      self.assertFalse(f.get_tensor("W").any())
    writer.close()

  @parameterized.parameters(1, 7, STEPS + 1)
  def test_chunk_size_does_not_change_the_bytes(self, chunk):
    reference = _read(_write_file(os.path.join(self.dir, "ref.safetensors"), self.records, 5))
    self.assertEqual(_read(_write_file(self.path, self.records, chunk)), reference)

  def test_partial_until_finalize_and_finalize_is_idempotent(self):
    writer = tensorfile.TrajectoryWriter(self.path, SPECS, META)
    _write_rows(writer, self.records, 4)
    _write_whole(writer, self.records)
    writer.sync()
    self.assertTrue(os.path.exists(self.path + ".partial"))
    self.assertFalse(os.path.exists(self.path))
    self.assertEqual(writer.finalize(), self.path)
    self.assertEqual(writer.finalize(), self.path)
    self.assertFalse(os.path.exists(self.path + ".partial"))
    self.assertEqual(os.path.getsize(self.path), writer.nbytes)
    with self.assertRaisesRegex(disk.StoreError, "finalized"):
      writer.write("last_motion_step", self.records["last_motion_step"])

  def test_unfinished_writer_leaves_the_partial(self):
    writer = tensorfile.TrajectoryWriter(self.path, SPECS)
    writer.write_rows("W", 0, self.records["W"][:3])
    del writer
    gc.collect()
    self.assertTrue(os.path.exists(self.path + ".partial"))
    self.assertFalse(os.path.exists(self.path))
    with self.assertRaises(RuntimeError):
      with tensorfile.TrajectoryWriter(self.path, SPECS) as writer:
        writer.write_rows("W", 0, self.records["W"][:3])
        raise RuntimeError("the trainer crashed")
    self.assertTrue(os.path.exists(self.path + ".partial"))
    self.assertFalse(os.path.exists(self.path))
    with self.assertRaisesRegex(disk.StoreError, "closed unfinished"):
      writer.finalize()

  def test_resume_continues_in_place_with_identical_bytes(self):
    reference = _read(_write_file(os.path.join(self.dir, "ref.safetensors"), self.records, 5))
    crashed_at, checkpoint_row = 15, 10  # rows past the checkpoint are rewritten
    writer = tensorfile.TrajectoryWriter(self.path, SPECS, META)
    for key in ROW_KEYS:
      writer.write_rows(key, 0, self.records[key][:crashed_at])
    writer.write("dead_mask", self.records["dead_mask"])
    writer.close()  # the process dies here
    resumed = tensorfile.TrajectoryWriter(self.path, SPECS, META, resume=True)
    _write_rows(resumed, self.records, 3, start=checkpoint_row)
    _write_whole(resumed, self.records)
    self.assertEqual(_read(resumed.finalize()), reference)

  def test_resume_refuses_another_header(self):
    tensorfile.TrajectoryWriter(self.path, SPECS, META).close()
    other = dict(SPECS, W=(np.uint16, (STEPS + 2, TOKENS, DIM)))
    cases = [(other, META, "tensor 'W'"), (SPECS, {"experiment": "x"}, "metadata"),
             (dict(SPECS, W=(np.float32, SPECS["W"][1])), META, "tensor 'W'")]
    for specs, meta, what in cases:
      with self.assertRaises(disk.StoreError) as e:
        tensorfile.TrajectoryWriter(self.path, specs, meta, resume=True)
      message = str(e.exception)
      self.assertIn(self.path + ".partial", message)
      self.assertIn(what, message)
      self.assertIn("start without resume", message)
      self.assertNotIn("\n", message)

  def test_resume_needs_the_partial(self):
    with self.assertRaisesRegex(disk.StoreError, r"\.partial does not exist; start the run "):
      tensorfile.TrajectoryWriter(self.path, SPECS, resume=True)
    _write_file(self.path, self.records, 8)
    with self.assertRaisesRegex(disk.StoreError, "already finished"):
      tensorfile.TrajectoryWriter(self.path, SPECS, META, resume=True)

  def test_a_finished_file_is_not_clobbered_by_default(self):
    _write_file(self.path, self.records, 8)
    with self.assertRaisesRegex(disk.StoreError, "already exists"):
      tensorfile.TrajectoryWriter(self.path, SPECS, META)
    writer = tensorfile.TrajectoryWriter(self.path, SPECS, META, overwrite=True)
    self.assertFalse(os.path.exists(self.path))  # gone at once: never mistaken for this run's
    writer.close()

  def test_bf16_arrays_are_written_as_their_bits(self):
    bits = self.records["W"][:4]
    writer = tensorfile.TrajectoryWriter(self.path, SPECS)
    writer.write_rows("W", 0, jnp.asarray(bits.view(ml_dtypes.bfloat16)))
    writer.write_rows("W", 4, bits.view(ml_dtypes.bfloat16))
    writer.finalize()
    with tensorfile.TrajectoryReader(self.path) as reader:
      np.testing.assert_array_equal(reader.rows("W", 0, 4), bits)
      np.testing.assert_array_equal(reader.rows("W", 4, 8), bits)

  def test_empty_and_scalar_tensors(self):
    specs = {"none": (np.float32, (0, 3)), "W": (np.uint16, (2, 2)), "step": (np.int64, ()),
             "flag": (np.bool_, ())}
    writer = tensorfile.TrajectoryWriter(self.path, specs)
    writer.write_rows("none", 0, np.zeros((0, 3), np.float32))
    writer.write_rows("W", 0, np.array([[1, 2], [3, 4]], np.uint16))
    writer.write("step", np.int64(-5))
    writer.write("flag", np.bool_(True))
    writer.finalize()
    lab = torch_load_file(self.path)
    with tensorfile.TrajectoryReader(self.path) as reader, safe_open(self.path, "np") as st:
      for key in specs:
        np.testing.assert_array_equal(reader.read(key), st.get_tensor(key))
        np.testing.assert_array_equal(reader.read(key), lab[key].numpy())
      self.assertEqual(reader.read("none").shape, (0, 3))
      self.assertEqual(reader.read("step"), -5)

  def test_bad_specs_are_one_line_errors(self):
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
      with self.assertRaisesRegex(disk.StoreError, pattern) as e:
        tensorfile.TrajectoryWriter(self.path, specs)
      self.assertNotIn("\n", str(e.exception))
    with self.assertRaisesRegex(disk.StoreError, "str to str"):
      tensorfile.TrajectoryWriter(self.path, SPECS, {"steps": 5})
    self.assertIsInstance(disk.StoreError("x"), ValueError)

  def test_bad_writes_are_one_line_errors(self):
    writer = tensorfile.TrajectoryWriter(self.path, SPECS)
    w = self.records["W"]
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
      with self.assertRaisesRegex(disk.StoreError, pattern) as e:
        call()
      self.assertNotIn("\n", str(e.exception))
    scalar = tensorfile.TrajectoryWriter(os.path.join(self.dir, "s.safetensors"),
                                    {"step": (np.int64, ())})
    with self.assertRaisesRegex(disk.StoreError, "0-d; write it with write"):
      scalar.write_rows("step", 0, np.zeros(1, np.int64))
    scalar.write("step", np.int64(7))
    with tensorfile.TrajectoryReader(scalar.finalize()) as reader:
      self.assertEqual(reader.read("step"), 7)
    writer.close()
    with self.assertRaisesRegex(disk.StoreError, "closed; reopen it with resume=True"):
      writer.write_rows("W", 0, w)


_RSS_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from jaxdt.io import tensorfile
    path, total_mb, chunk_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rows = total_mb // chunk_mb
    chunk = np.zeros((1, chunk_mb << 19), np.uint16)  # one row = chunk_mb MB
    writer = tensorfile.TrajectoryWriter(path, {"W": (np.uint16, (rows, chunk.shape[1]))})
    writer.write_rows("W", 0, chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for t in range(1, rows):
      chunk[0, :8] = t  # fresh contents each chunk, as a trainer's records have
      writer.write_rows("W", t, chunk)
    path = writer.finalize()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "bytes": os.path.getsize(path)}))
""")


class MemoryTest(absltest.TestCase):

  def test_peak_rss_stays_flat_while_streaming(self):
    path = os.path.join(_tempdir(self), "big.safetensors")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, path, str(RSS_FILE_MB), str(RSS_CHUNK_MB)],
        env=env, cwd=REPO, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"RSS child: {got}")  # the figure quoted in BUILD_NOTES_store.md
    self.assertGreater(got["bytes"], RSS_FILE_MB << 20)
    growth_mb = (got["after_kb"] - got["before_kb"]) / 1024  # ru_maxrss is in KiB on Linux
    self.assertLess(growth_mb, RSS_LIMIT_MB, f"peak RSS grew {growth_mb:.1f} MB "
                    f"while writing {RSS_FILE_MB} MB")
    with tensorfile.TrajectoryReader(path) as reader:  # and the chunks landed where they belong
      for t in (0, 1, RSS_FILE_MB // 2, RSS_FILE_MB - 1):
        np.testing.assert_array_equal(reader.rows("W", t, t + 1)[0, :9], [t] * 8 + [0])


class ReaderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)
    self.records = _records(1)
    self.path = _write_file(os.path.join(self.dir, NAME), self.records, 6)

  def test_ours_safe_open_and_torch_load_file_agree_bit_for_bit(self):
    lab = torch_load_file(self.path)  # the lab's own loader
    with tensorfile.TrajectoryReader(self.path) as reader, safe_open(self.path, "np") as st:
      self.assertEqual(reader.keys(), list(SPECS))
      self.assertEqual(reader.metadata, META)
      self.assertEqual(st.metadata(), META)
      self.assertEqual(sorted(lab), sorted(SPECS))
      for key, want in self.records.items():
        ours = reader.read(key)
        self.assertEqual(ours.dtype, want.dtype)
        self.assertEqual(reader.dtype(key), want.dtype)
        self.assertEqual(reader.shape(key), want.shape)
        np.testing.assert_array_equal(_bits(ours), _bits(want))
        np.testing.assert_array_equal(_bits(st.get_tensor(key)), _bits(want))
        np.testing.assert_array_equal(_bits(lab[key].numpy()), _bits(want))
    self.assertEqual(lab["W"].dtype, torch.uint16)

  def test_rows_reads_only_the_asked_rows(self):
    with tensorfile.TrajectoryReader(self.path) as reader:
      np.testing.assert_array_equal(reader.rows("W", 5, 12), self.records["W"][5:12])
      np.testing.assert_array_equal(_bits(reader.rows("delta_W_prime", 17)),
                                    _bits(self.records["delta_W_prime"][17:]))
      self.assertEqual(reader.rows("centroid", 4, 4).shape, (0, DIM))
      with self.assertRaisesRegex(disk.StoreError, r"rows \[3, 99\) of 'W'.*has 23 rows"):
        reader.rows("W", 3, 99)
      with self.assertRaisesRegex(disk.StoreError, "no tensor 'm'"):
        reader.rows("m", 0, 1)

  def test_reads_the_lab_layout_with_bf16(self):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, generator=gen).to(torch.bfloat16)
    lab = {"W_bf16": w, "W": w.view(torch.uint16).clone(), "loss": torch.randn(6, generator=gen),
           "dead_indices": torch.arange(5), "dead_mask": torch.arange(10) % 3 == 0,
           "last_motion_step": torch.arange(5, dtype=torch.int32) - 1}
    path = os.path.join(self.dir, "thimble_8_trajectory.safetensors")
    torch_save_file(lab, path, metadata={"source": "lab"})
    with tensorfile.TrajectoryReader(path) as reader:
      self.assertEqual(sorted(reader.keys()), sorted(lab))
      self.assertEqual(reader.metadata, {"source": "lab"})
      self.assertEqual(reader.raw_dtype("W_bf16"), "BF16")
      self.assertEqual(reader.dtype("W_bf16"), np.uint16)
      bits = w.view(torch.uint16).numpy()
      np.testing.assert_array_equal(reader.rows("W_bf16", 2, 5), bits[2:5])
      np.testing.assert_array_equal(reader.read("W"), bits)
      for key in ("loss", "dead_indices", "dead_mask", "last_motion_step"):
        np.testing.assert_array_equal(_bits(reader.read(key)), _bits(lab[key].numpy()))

  def test_truncated_and_missing_files_are_one_line_errors(self):
    short = os.path.join(self.dir, "short.safetensors")
    with open(short, "wb") as f:
      f.write(_read(self.path)[:-1])
    with self.assertRaisesRegex(disk.StoreError, "truncated or padded, re-create it"):
      tensorfile.TrajectoryReader(short)
    with open(short, "wb") as f:
      f.write(b"\xff" * 16)
    with self.assertRaisesRegex(disk.StoreError, "corrupt safetensors header"):
      tensorfile.TrajectoryReader(short)
    unfinished = os.path.join(self.dir, "run.safetensors")
    tensorfile.TrajectoryWriter(unfinished, SPECS).close()
    with self.assertRaisesRegex(disk.StoreError, r"not found \(the run is unfinished\)"):
      tensorfile.TrajectoryReader(unfinished)


class MetadataTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)

  def test_write_metadata_is_indented_json_written_atomically(self):
    meta = {"experiment": "Crucible 1", "final_loss": np.float32(5.25),
            "data_shapes": {"W": [5001, 3699, 64]}, "global_last_motion": np.int64(2509)}
    path = metadata_lib.write_metadata(os.path.join(self.dir, "run"), meta)
    with open(path) as f:
      text = f.read()
    plain = {**meta, "final_loss": 5.25, "global_last_motion": 2509}
    self.assertEqual(text, json.dumps(plain, indent=2) + "\n")
    self.assertEqual(metadata_lib.read_metadata(os.path.dirname(path)), plain)
    self.assertEqual(os.listdir(os.path.dirname(path)), ["metadata.json"])  # no tmp left

  def test_is_complete_follows_the_run_lifecycle(self):
    records = _records(2)
    self.assertFalse(metadata_lib.is_complete(self.dir, NAME))
    metadata_lib.write_metadata(self.dir, {"completed": False})
    writer = tensorfile.TrajectoryWriter(os.path.join(self.dir, NAME), SPECS, META)
    _write_rows(writer, records, 9)
    _write_whole(writer, records)
    self.assertFalse(metadata_lib.is_complete(self.dir, NAME))  # only a .partial
    path = writer.finalize()
    self.assertFalse(metadata_lib.is_complete(self.dir, NAME))  # marker not written yet
    size = os.path.getsize(path)
    metadata_lib.write_metadata(self.dir, {"completed": True, "trajectory_bytes": size + 8})
    self.assertFalse(metadata_lib.is_complete(self.dir, NAME))  # sizes disagree
    metadata_lib.write_metadata(self.dir, {"completed": "yes", "trajectory_bytes": size})
    self.assertFalse(metadata_lib.is_complete(self.dir, NAME))
    metadata_lib.write_metadata(self.dir, {"completed": True, "trajectory_bytes": size})
    self.assertTrue(metadata_lib.is_complete(self.dir, NAME))
    os.remove(path)
    self.assertFalse(metadata_lib.is_complete(self.dir, NAME))


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


class CheckpointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)
    self.state = _state(1)

  def _assert_bit_identical(self, got, want):
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    self.assertEqual(jax.tree_util.tree_structure(got), jax.tree_util.tree_structure(want))
    for a, b in zip(got_leaves, want_leaves):
      self.assertIs(type(a), type(b))
      if checkpoints._is_key(b):  # pylint: disable=protected-access
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      a, b = np.asarray(a), np.asarray(b)
      self.assertEqual(a.dtype, b.dtype)
      np.testing.assert_array_equal(_bits(a), _bits(b))

  def test_round_trip_into_a_differently_seeded_state_is_bit_exact(self):
    extra = {"step": 10, "data_position": 10, "config": {"lr": 1e-3}}
    path = checkpoints.save_checkpoint(self.dir, 10, self.state, extra)
    self.assertEqual(path, os.path.join(self.dir, "step_000010"))
    self.assertEqual(sorted(os.listdir(path)), ["arrays.safetensors", "meta.json"])
    other = _state(2)
    self.assertFalse(np.array_equal(_bits(other.params["embedding"]),
                                    _bits(self.state.params["embedding"])))
    restored, got_extra = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(self.dir), other)
    self.assertEqual(got_extra, extra)
    self._assert_bit_identical(restored, self.state)
    self.assertEqual(restored.params["embedding"].dtype, jnp.bfloat16)
    with open(os.path.join(path, "meta.json")) as f:
      meta = json.load(f)
    self.assertEqual(meta["step"], 10)
    names = {leaf["name"]: leaf["dtype"] for leaf in meta["leaves"]}
    self.assertEqual(names[".params['embedding']"], "BF16")
    self.assertEqual(names[".mu['embedding']"], "F32")
    self.assertEqual(names[".count"], "I32")
    with safe_open(os.path.join(path, "arrays.safetensors"), "np") as f:  # plain safetensors
      self.assertIn(".params['ln_f']['scale']", f.keys())

  def test_restores_into_an_abstract_state(self):
    tree = {"params": self.state.params, "count": self.state.count}
    checkpoints.save_checkpoint(self.dir, 3, tree)
    like = jax.eval_shape(lambda: tree)
    restored, extra = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(self.dir), like)
    self.assertEqual(extra, {})
    self._assert_bit_identical(restored, tree)

  def test_truncated_checkpoint_is_ignored(self):
    checkpoints.save_checkpoint(self.dir, 10, self.state)
    checkpoints.save_checkpoint(self.dir, 20, _state(3))
    os.remove(os.path.join(self.dir, "step_000020", "meta.json"))  # died before the marker
    later = tensorfile.TrajectoryWriter(os.path.join(self.dir, "step_000030", "arrays.safetensors"),
                                   {"x": (np.float32, (4,))})
    later.close()  # died while writing arrays
    self.assertEqual(checkpoints.latest_checkpoint(self.dir), os.path.join(self.dir, "step_000010"))
    with self.assertRaisesRegex(disk.StoreError, "no meta.json .unfinished write.; restore"):
      checkpoints.load_checkpoint(os.path.join(self.dir, "step_000020"), self.state)
    checkpoints.save_checkpoint(self.dir, 20, _state(4))  # re-saving a step replaces it whole
    restored, _ = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(self.dir), self.state)
    self._assert_bit_identical(restored, _state(4))

  def test_latest_checkpoint_without_checkpoints_is_none(self):
    self.assertIsNone(checkpoints.latest_checkpoint(os.path.join(self.dir, "missing")))
    os.makedirs(os.path.join(self.dir, "step_000005"))
    os.makedirs(os.path.join(self.dir, "notes"))
    self.assertIsNone(checkpoints.latest_checkpoint(self.dir))

  def test_a_state_that_does_not_fit_is_a_one_line_error(self):
    path = checkpoints.save_checkpoint(self.dir, 1, self.state)
    wide = self.state._replace(count=jnp.float32(1))
    small = self.state._replace(last_motion_step=np.zeros(TOKENS - 1, np.int32))
    fewer = {"params": self.state.params}
    cases = [(wide, r"'.count' is I32\[\], the state wants F32\[\]"),
             (small, r"'.last_motion_step' is I32\[9\], the state wants I32\[8\]"),
             (fewer, "state leaf \"\\['params'\\]\\['embedding'\\]\" is not in it")]
    for like, pattern in cases:
      with self.assertRaisesRegex(disk.StoreError, pattern) as e:
        checkpoints.load_checkpoint(path, like)
      self.assertIn("restore with the config the checkpoint was saved with", str(e.exception))
      self.assertNotIn("\n", str(e.exception))


class PreflightTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)

  def test_refuses_absurd_disk_with_one_line(self):
    with self.assertRaises(disk.StoreError) as e:
      disk.preflight(os.path.join(self.dir, "new", "run"), 10**18, file_name=NAME)
    message = str(e.exception)
    self.assertRegex(message, r"^not enough disk for crucible_1_trajectory\.safetensors: need "
                     r"1,000,000 TB, [\d.,]+ [KMGT]?B free in .*new/run; pass --output_dir on a "
                     r"larger disk or fewer --steps$")
    self.assertNotIn("\n", message)

  def test_refuses_absurd_ram(self):
    if not os.path.exists("/proc/meminfo"):
      self.skipTest("no /proc/meminfo: the RAM check is skipped on this system")
    with self.assertRaisesRegex(disk.StoreError, r"^not enough RAM for crucible_1_traj.*: need "
                                r"1,000 TB, [\d.,]+ [KMGT]?B available; pass a smaller"):
      disk.preflight(self.dir, 1, 10**15, file_name=NAME)

  def test_passes_when_it_fits(self):
    disk.preflight(self.dir, tensorfile.estimate_bytes(SPECS), 1 << 20, file_name=NAME)

  def test_estimate_bytes_is_the_file_size(self):
    self.assertEqual(os.path.getsize(_write_file(os.path.join(self.dir, NAME), _records(), 7)),
                     tensorfile.estimate_bytes(SPECS, META))
    crucible_1 = {  # the lab printed "File size: 7.10 GB" (its Crucible 1 notebook)
        "W": (np.uint16, (5001, 3699, 64)), "delta_W_prime": (np.float32, (5000, 3699, 64)),
        "centroid": (np.float32, (5001, 64)), "loss": (np.float32, (5001,)),
        "last_motion_step": (np.int32, (3699,)), "dead_mask": (np.bool_, (10000,)),
        "dead_indices": (np.int64, (3699,))}
    self.assertEqual(f"{tensorfile.estimate_bytes(crucible_1) / 1e9:.2f}", "7.10")


if __name__ == "__main__":
  absltest.main()
