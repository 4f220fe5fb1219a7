"""Tests of jaxdt.data: the default build, the lab's formats, bad inputs, sampling.

The default is built twice (about 20 s each on 2 cores) in module-scoped
fixtures; every other test reuses those builds or tiny files made here.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from jaxdt.config import DataConfig
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import demographics
from jaxdt.data import recipe
from jaxdt.data import sampler
from jaxdt.data import vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB_KEYS = ("live_mask", "dead_mask", "live_indices", "dead_indices", "token_occurrence_counts")
TINY_TEXT = " ".join(
    ["The quick brown fox jumps over the lazy dog, again and again."] * 40
    + ["Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow."] * 40)
# The tokenizer also sees characters and words the corpus lacks: they are dead.
TINY_TOKENIZER_TEXT = TINY_TEXT + "\n\nZebras ขอบคุณ café ☃ quiz quiz"


def _hashes(folder):
  return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
          for name in sorted(os.listdir(folder))}


def _snapshot(folder):
  """Every path under `folder` with its size and mtime: 'nothing written' checks."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[path] = (st.st_size, st.st_mtime_ns)
  return out


# --- The default build ----------------------------------------------------------


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  first = recipe.build_default(str(tmp_path_factory.mktemp("build_a")))
  second = recipe.build_default(str(tmp_path_factory.mktemp("build_b")))
  return first, second


def test_two_fresh_builds_are_byte_identical(builds):
  first, second = builds
  assert first.built and second.built
  hashes = _hashes(first.directory)
  assert sorted(hashes) == sorted([recipe.TOKENIZER_FILE, recipe.CORPUS_FILE, recipe.MASK_FILE,
                                   recipe.TOKENIZER_CORPUS_FILE, recipe.MANIFEST_FILE])
  assert hashes == _hashes(second.directory)


def test_no_temporary_folder_is_left(builds):
  root = os.path.dirname(builds[0].directory)
  assert os.listdir(root) == [recipe.CACHE_SUBDIR]


def test_manifest_lists_every_file_versions_and_recipe(builds):
  d = builds[0]
  with open(os.path.join(d.directory, recipe.MANIFEST_FILE)) as f:
    manifest = json.load(f)
  assert manifest["recipe_version"] == recipe.RECIPE_VERSION
  assert set(manifest["files"]) == set(os.listdir(d.directory)) - {recipe.MANIFEST_FILE}
  for name, digest in manifest["files"].items():
    assert hashlib.sha256(open(os.path.join(d.directory, name), "rb").read()).hexdigest() == digest
  for dist in ("python", "tokenizers", "pythainlp", "numpy", "jax"):
    assert manifest["versions"][dist] != "not installed"
  assert d.directory not in json.dumps(manifest)  # no machine-specific paths


def test_independent_recount_equals_the_mask(builds):
  d = builds[0]
  tokenizer = Tokenizer.from_file(d.tokenizer_path)
  with open(d.corpus_path, "r", encoding="utf-8") as f:
    text = f.read()
  ids = np.asarray(tokenizer.encode(text).ids)  # the lab's single encode of the whole corpus
  counts = np.bincount(ids, minlength=tokenizer.get_vocab_size())
  masks = load_file(d.mask_path)
  assert sorted(masks) == sorted(LAB_KEYS)
  assert masks["dead_mask"].dtype == np.bool_ and masks["dead_indices"].dtype == np.int64
  np.testing.assert_array_equal(masks["token_occurrence_counts"], counts)
  np.testing.assert_array_equal(masks["dead_mask"], counts == 0)
  np.testing.assert_array_equal(masks["live_mask"], counts > 0)
  np.testing.assert_array_equal(masks["dead_indices"], np.flatnonzero(counts == 0))
  np.testing.assert_array_equal(masks["live_indices"], np.flatnonzero(counts > 0))


def test_default_is_at_the_lab_scale(builds):
  d = builds[0]
  tokenizer = Tokenizer.from_file(d.tokenizer_path)
  assert tokenizer.get_vocab_size() == 10000
  assert tokenizer.id_to_token(0) == "<|endoftext|>"
  counts = d.manifest["counts"]
  assert abs(counts["total_tokens"] - 1_371_328) < 2_000
  assert counts["dead"] >= 1000
  assert sampler.batches_per_epoch(counts["total_tokens"], DataConfig()) == 83
  with open(d.corpus_path, encoding="utf-8") as f:
    assert not recipe._has_thai(f.read())  # English-only model corpus
  vocab = [tokenizer.id_to_token(i) for i in range(10000)]
  dead = load_file(d.mask_path)["dead_mask"]
  thai = np.array([vocabulary.token_category(t) == "thai" for t in vocab])
  assert thai.sum() > 1000 and dead[thai].all()  # every Thai token is dead


def test_load_corpus_uses_the_cache(builds):
  d = builds[0]
  corpus = corpus_lib.load_corpus(DataConfig(data_dir=os.path.dirname(d.directory)), 10000)
  assert corpus.default is not None and not corpus.default.built
  assert corpus.tokens.dtype == np.int32
  assert corpus.tokens.size == d.manifest["counts"]["total_tokens"]
  assert corpus.n_dead == d.manifest["counts"]["dead"]
  assert set(corpus.files) == {"corpus", "tokenizer", "mask"}
  report = demographics.report(corpus, DataConfig())
  assert f"Dead: {corpus.n_dead:,}" in report and "Dead tokens by category:" in report


def _copy_cache(build, tmp_path):
  root = tmp_path / "cache"
  shutil.copytree(build.directory, root / recipe.CACHE_SUBDIR)
  return str(root), str(root / recipe.CACHE_SUBDIR)


def test_tampered_cache_file_is_reported_and_left_alone(builds, tmp_path):
  root, folder = _copy_cache(builds[0], tmp_path)
  corpus = os.path.join(folder, recipe.CORPUS_FILE)
  with open(corpus, "r+b") as f:
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 1]))
  before = _snapshot(root)
  with pytest.raises(vocabulary.DataError, match=recipe.CORPUS_FILE) as e:
    recipe.build_default(root)
  assert "\n" not in str(e.value) and "delete" in str(e.value)
  assert _snapshot(root) == before


def test_manifest_of_other_versions_is_reported(builds, tmp_path):
  root, folder = _copy_cache(builds[0], tmp_path)
  path = os.path.join(folder, recipe.MANIFEST_FILE)
  manifest = json.load(open(path))
  manifest["versions"]["tokenizers"] = "0.0.1"
  json.dump(manifest, open(path, "w"))
  with pytest.raises(vocabulary.DataError, match="tokenizers 0.0.1"):
    recipe.build_default(root)


def test_folder_without_manifest_is_reported(builds, tmp_path):
  root, folder = _copy_cache(builds[0], tmp_path)
  os.remove(os.path.join(folder, recipe.MANIFEST_FILE))
  with pytest.raises(vocabulary.DataError, match="no manifest.json"):
    recipe.build_default(root)


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
  def crash(folder, log):
    open(os.path.join(folder, recipe.CORPUS_FILE), "w").write("half")
    raise RuntimeError("crash mid-build")
  monkeypatch.setattr(recipe, "_build_files", crash)
  with pytest.raises(RuntimeError):
    recipe.build_default(str(tmp_path))
  assert os.listdir(tmp_path) == []


# --- User files and bad inputs ---------------------------------------------------


@pytest.fixture()
def tiny(tmp_path):
  """A small tokenizer, corpus and matching mask, in the lab's formats."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(
      vocab_size=80, min_frequency=2, special_tokens=["<|endoftext|>"],
      initial_alphabet=sorted(set(TINY_TOKENIZER_TEXT)), show_progress=False)
  tokenizer.train_from_iterator([TINY_TOKENIZER_TEXT], trainer=trainer)
  paths = {"tokenizer": str(tmp_path / "tok.json"), "corpus": str(tmp_path / "corpus.txt"),
           "mask": str(tmp_path / "mask.safetensors")}
  tokenizer.save(paths["tokenizer"])
  with open(paths["corpus"], "w", encoding="utf-8") as f:
    f.write(TINY_TEXT)
  counts = vocabulary.count_tokens(tokenizer, TINY_TEXT)
  vocabulary.write_mask_file(paths["mask"], vocabulary.masks_from_counts(counts))
  cfg = DataConfig(batch_size=4, seq_len=8, corpus_path=paths["corpus"],
                   tokenizer_path=paths["tokenizer"], dead_mask_path=paths["mask"])
  return dict(paths=paths, cfg=cfg, vocab=tokenizer.get_vocab_size(), counts=counts,
              dir=str(tmp_path))


def test_user_files_load_unchanged(tiny):
  corpus = corpus_lib.load_corpus(tiny["cfg"], tiny["vocab"])
  np.testing.assert_array_equal(corpus.token_occurrence_counts, tiny["counts"])
  assert corpus.n_dead > 0  # the Thai, 'é', '☃' and 'Zebras' pieces
  assert corpus.default is None and set(corpus.paths) == {"corpus", "tokenizer", "mask"}
  no_mask = corpus_lib.load_corpus(dataclasses.replace(tiny["cfg"], dead_mask_path=None), tiny["vocab"])
  np.testing.assert_array_equal(no_mask.dead_mask, corpus.dead_mask)


def test_encode_text_equals_one_encode():
  text = "alpha beta.\n\ngamma, delta!\r\n  epsilon\n" * 3000
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=40, show_progress=False))
  np.testing.assert_array_equal(vocabulary.encode_text(tokenizer, text), tokenizer.encode(text).ids)


def _write(path, content):
  mode = "wb" if isinstance(content, bytes) else "w"
  with open(path, mode) as f:
    f.write(content)
  return path


def _bad_inputs(tiny):
  """(name, cfg, vocab, the file the message must name) for every bad input."""
  cfg, p, d, v = tiny["cfg"], tiny["paths"], tiny["dir"], tiny["vocab"]
  counts = tiny["counts"]
  flipped = vocabulary.masks_from_counts(counts)
  live_id = int(np.flatnonzero(counts)[0])
  flipped["dead_mask"][live_id] = True
  short = vocabulary.masks_from_counts(counts[:-1])
  bad_counts = vocabulary.masks_from_counts(counts)
  bad_counts["token_occurrence_counts"] = counts + (counts > 0)
  missing = os.path.join(d, "missing.txt")
  files = {
      "latin1.txt": TINY_TEXT.encode() + "café".encode("latin-1"),
      "tok.txt": "not json",
      "m.bin": b"\x00" * 64,
      "short.txt": "The quick brown fox.",
  }
  f = {name: _write(os.path.join(d, name), content) for name, content in files.items()}
  for name, masks in (("short.st", short), ("flip.st", flipped), ("cnt.st", bad_counts)):
    f[name] = os.path.join(d, name)
    vocabulary.write_mask_file(f[name], masks)
  with_ = lambda **kw: dataclasses.replace(cfg, **kw)
  return [
      ("missing corpus", with_(corpus_path=missing), v, missing),
      ("missing tokenizer", with_(tokenizer_path=missing), v, missing),
      ("missing mask", with_(dead_mask_path=missing), v, missing),
      ("directory as corpus", with_(corpus_path=d), v, d),
      ("non-UTF-8 corpus", with_(corpus_path=f["latin1.txt"]), v, f["latin1.txt"]),
      ("tokenizer not JSON", with_(tokenizer_path=f["tok.txt"]), v, f["tok.txt"]),
      ("tokenizer vocab != configured", cfg, v + 1, p["tokenizer"]),
      ("mask not safetensors", with_(dead_mask_path=f["m.bin"]), v, f["m.bin"]),
      ("mask length != vocab", with_(dead_mask_path=f["short.st"]), v, f["short.st"]),
      ("mask disagrees with counts", with_(dead_mask_path=f["flip.st"]), v, f["flip.st"]),
      ("mask counts disagree", with_(dead_mask_path=f["cnt.st"]), v, f["cnt.st"]),
      ("corpus shorter than one batch",
       with_(corpus_path=f["short.txt"], dead_mask_path=None), v, f["short.txt"]),
      ("corpus without tokenizer", with_(tokenizer_path=None), v, "--tokenizer_path"),
  ]


def test_every_bad_input_is_one_line_naming_the_file_and_writes_nothing(tiny):
  cases = _bad_inputs(tiny)
  before = _snapshot(tiny["dir"])
  for name, cfg, vocab, culprit in cases:
    with pytest.raises(vocabulary.DataError) as e:
      corpus_lib.load_corpus(cfg, vocab)
    message = str(e.value)
    assert "\n" not in message, name
    assert culprit in message, (name, message)
    assert ";" in message, (name, message)  # "<what is wrong>; <the fix>"
  assert _snapshot(tiny["dir"]) == before


def test_unwritable_data_dir_is_reported(tmp_path):
  blocker = _write(str(tmp_path / "a_file"), "x")
  with pytest.raises(vocabulary.DataError, match="a_file"):
    recipe.build_default(os.path.join(blocker, "cache"))


# --- Token classes -------------------------------------------------------------------


@pytest.mark.parametrize("token,category", [
    ("<|endoftext|>", "special"), ("th", "english"), ("ing.", "english"), ("ก", "thai"),
    ("ที่", "thai"), ("\xa0", "whitespace"), ("\n", "whitespace"), (").", "punctuation"),
    ("20", "numeric"), ("1.5", "numeric"), ("¡", "other"), ("é", "other"), ("π", "other"),
    ("aé", "mixed"), ("กa", "mixed"), ("ก1", "other"),
])
def test_token_category_follows_the_lab(token, category):
  assert vocabulary.token_category(token) == category


# --- Sampling ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 100, 1000, 4096, 10713, 65537])
def test_feistel_is_a_bijection(n):
  for seed in (0, 7):
    perm = np.asarray(sampler.feistel_permute(jax.random.PRNGKey(seed), jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    if n >= 100:
      assert (perm != np.arange(n)).mean() > 0.9  # a real shuffle, not the identity


def test_feistel_depends_on_the_key():
  a = sampler.feistel_permute(jax.random.PRNGKey(0), jnp.arange(1000), 1000)
  b = sampler.feistel_permute(jax.random.PRNGKey(1), jnp.arange(1000), 1000)
  assert (np.asarray(a) != np.asarray(b)).mean() > 0.9


def test_lab_batch_arithmetic():
  cfg = DataConfig()
  assert sampler.num_sequences(10713 * 128 + 100, cfg) == 10713
  assert sampler.batches_per_epoch(10713 * 128 + 100, cfg) == 83
  windows = dataclasses.replace(cfg, scheme="windows")
  assert sampler.num_sequences(1_371_328, windows) == 1_371_200  # the lab's len = N - 128


def _chunk_ids(sample, key, steps, seq_len):
  return np.stack([np.asarray(sample(key, t).inputs[:, 0]) // seq_len for t in steps])


def test_chunks_cover_every_sequence_once_per_epoch_and_reshuffle():
  cfg = DataConfig(scheme="chunks", batch_size=4, seq_len=8)
  n_seq = 24
  tokens = np.arange(n_seq * 8 + 5, dtype=np.int32)  # a tail shorter than a chunk is dropped
  sample = jax.jit(sampler.make_sampler(tokens, cfg))
  key = jax.random.PRNGKey(42)
  per_epoch = sampler.batches_per_epoch(tokens.size, cfg)
  assert per_epoch == 6
  epoch1 = _chunk_ids(sample, key, range(1, per_epoch + 1), 8)
  epoch2 = _chunk_ids(sample, key, range(per_epoch + 1, 2 * per_epoch + 1), 8)
  np.testing.assert_array_equal(np.sort(epoch1.ravel()), np.arange(n_seq))
  np.testing.assert_array_equal(np.sort(epoch2.ravel()), np.arange(n_seq))
  assert not np.array_equal(epoch1, epoch2)
  batch = sample(key, 3)
  assert batch.inputs.shape == (4, 8) and batch.targets.shape == (4, 7)
  assert batch.inputs.dtype == jnp.int32 and batch.targets.dtype == jnp.int32
  np.testing.assert_array_equal(batch.targets, batch.inputs[:, 1:])  # the lab's Crucible loss
  aligned = np.broadcast_to(np.arange(8), (4, 8))
  np.testing.assert_array_equal(batch.inputs % 8, aligned)  # chunks start at multiples of L


def test_chunks_drop_last_within_an_epoch():
  cfg = DataConfig(scheme="chunks", batch_size=4, seq_len=8)
  tokens = np.arange(23 * 8, dtype=np.int32)  # 23 chunks -> 5 batches, 3 chunks dropped
  sample = sampler.make_sampler(tokens, cfg)
  ids = _chunk_ids(sample, jax.random.PRNGKey(0), range(1, 6), 8).ravel()
  assert len(set(ids.tolist())) == 20 and ids.max() < 23


def test_windows_targets_are_next_tokens_and_double_shift():
  tokens = np.arange(500, dtype=np.int32)
  cfg = DataConfig(scheme="windows", batch_size=5, seq_len=16)
  key = jax.random.PRNGKey(3)
  batch = sampler.make_sampler(tokens, cfg)(key, 7)
  assert batch.inputs.shape == (5, 16) and batch.targets.shape == (5, 16)
  np.testing.assert_array_equal(batch.targets, batch.inputs + 1)
  shifted = sampler.make_sampler(tokens, dataclasses.replace(cfg, double_shift_labels=True))(key, 7)
  np.testing.assert_array_equal(shifted.inputs, batch.inputs)
  assert shifted.targets.shape == (5, 15)
  np.testing.assert_array_equal(shifted.targets, batch.inputs[:, :-1] + 2)  # two tokens ahead
  assert np.asarray(batch.inputs[:, 0]).max() <= 500 - 17  # every window fits


def test_windows_visit_every_start_once_per_epoch():
  tokens = np.arange(40, dtype=np.int32)
  cfg = DataConfig(scheme="windows", batch_size=4, seq_len=4)  # 36 windows, 9 batches
  sample = sampler.make_sampler(tokens, cfg)
  key = jax.random.PRNGKey(1)
  starts = np.concatenate([np.asarray(sample(key, t).inputs[:, 0]) for t in range(1, 10)])
  np.testing.assert_array_equal(np.sort(starts), np.arange(36))


def test_batches_are_pure_functions_of_key_and_step():
  tokens = np.random.default_rng(0).integers(0, 100, 3000).astype(np.int32)
  cfg = DataConfig(scheme="chunks", batch_size=8, seq_len=16)
  key = jax.random.PRNGKey(9)
  sample = sampler.make_sampler(tokens, cfg)
  fresh = jax.jit(sampler.make_sampler(tokens.copy(), cfg))  # as rebuilt after a resume
  for step in (1, 5, 23, 24, 100):
    a, b = sample(key, step), fresh(key, jnp.int32(step))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
  assert not np.array_equal(sample(key, 1).inputs, sample(jax.random.PRNGKey(10), 1).inputs)

  def body(carry, step):
    return carry, fresh(key, step)

  _, scanned = jax.lax.scan(body, 0, jnp.arange(1, 31, dtype=jnp.int32))
  for step in range(1, 31):
    np.testing.assert_array_equal(scanned.inputs[step - 1], sample(key, step).inputs)


def test_sampler_rejects_a_corpus_shorter_than_a_batch():
  with pytest.raises(vocabulary.DataError, match="fewer than one"):
    sampler.make_sampler(np.arange(10, dtype=np.int32), DataConfig(batch_size=4, seq_len=8))


# --- run.py ----------------------------------------------------------------------------


def _run(*flags):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_run_flannel_data_prints_the_lab_counts(builds):
  d = builds[0]
  result = _run("--experiment=flannel_data", f"--data_dir={os.path.dirname(d.directory)}")
  assert result.returncode == 0, result.stderr
  counts = d.manifest["counts"]
  assert f"Dead: {counts['dead']:,}" in result.stdout
  assert f"Total tokens: {counts['total_tokens']:,}" in result.stdout
  assert "Dead tokens by category:" in result.stdout


def test_run_bad_input_exits_nonzero_with_one_line(tmp_path):
  missing = str(tmp_path / "nope.txt")
  result = _run("--experiment=flannel_data", f"--corpus_path={missing}",
                f"--tokenizer_path={missing}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0]
  assert os.listdir(tmp_path) == []
  unknown = _run("--experiment=no_such_thing")
  assert unknown.returncode == 2 and "unknown experiment" in unknown.stderr
