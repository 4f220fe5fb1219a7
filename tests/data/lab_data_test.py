"""The lab's data from FineWeb, built offline from parquet shards in the hub's layout.

The mirror holds the hub's file names and a `text` column, several shards of
several row groups each, so the whole pipeline (budgets and the skip, join
order, tokenizer settings, mask, manifest) runs through the code path the
network takes, with the local filesystem instead of HfFileSystem.
"""

import builtins
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydoc_data.topics import topics

from conftest import single_trace

from jaxdt import config as config_lib
from jaxdt.data import corpus as corpus_lib
from jaxdt.data import lab_data
from jaxdt.data import recipe
from jaxdt.data import vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REC = lab_data.Recipe(english_bytes=60_000, thai_bytes=12_000, model_skip=25,
                      model_bytes=20_000, vocab_size=400)
THAI = ("ภาษาไทย เป็น ภาษา ที่ ใช้ ใน ประเทศไทย", "สวัสดี ครับ ขอบคุณ มาก", "แมว กิน ปลา ทุก วัน")


def english_docs():
  docs = []
  for k in sorted(topics):
    docs += [p for p in topics[k].split("\n\n") if len(p) > 200]
  return docs


def write_shards(folder, docs, per_shard, per_group):
  os.makedirs(folder, exist_ok=True)
  for i in range(0, len(docs), per_shard):
    table = pa.table({"text": docs[i:i + per_shard], "id": [str(j) for j in range(i, i + len(
        docs[i:i + per_shard]))]})
    pq.write_table(table, os.path.join(folder, f"{i // per_shard:03d}_00000.parquet"),
                   row_group_size=per_group)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
  root = tmp_path_factory.mktemp("mirror")
  en = root / "HuggingFaceFW" / "fineweb"
  th = root / "HuggingFaceFW" / "fineweb-2"
  write_shards(en / "sample" / "10BT", english_docs()[:400], per_shard=60, per_group=7)
  write_shards(th / "data" / "tha_Thai" / "train",
               [" ".join(THAI[(i + j) % 3] for j in range(i % 5 + 3)) for i in range(600)],
               per_shard=150, per_group=40)
  (en / ".revision").write_text("en-commit-1\n")
  (th / ".revision").write_text("th-commit-1\n")
  return str(root)


@pytest.fixture(scope="module")
def built(mirror, tmp_path_factory):
  return lab_data.build(str(tmp_path_factory.mktemp("cache")), mirror=mirror, rec=REC)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_budgets_skip_and_join_order(built):
  docs = english_docs()[:400]
  cum = np.cumsum([len(d.encode()) for d in docs])
  n_en = int(np.argmax(cum >= REC.english_bytes)) + 1  # the crossing document included
  model_cum = np.cumsum([len(d.encode()) for d in docs[REC.model_skip:]])
  n_model = int(np.argmax(model_cum >= REC.model_bytes)) + 1
  s = built.manifest["sources"]
  assert s["english"]["documents"] == n_en and s["english"]["bytes"] == int(cum[n_en - 1])
  assert s["model"]["documents"] == n_model and s["model"]["skip"] == REC.model_skip
  model_text = _read(built.corpus_path).decode()
  assert model_text == "\n\n".join(docs[REC.model_skip:REC.model_skip + n_model])
  tok_text = _read(built.tokenizer_corpus_path).decode()
  assert tok_text.startswith("\n\n".join(docs[:n_en]) + "\n\n")  # English first, then Thai
  assert s["thai"]["bytes"] >= REC.thai_bytes and "ภาษาไทย" in tok_text.split("\n\n", n_en)[-1]


def test_tokenizer_mask_and_manifest(built):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(built.tokenizer_path)
  spec = json.loads(tok.to_str())
  assert tok.get_vocab_size() == REC.vocab_size and tok.id_to_token(0) == "<|endoftext|>"
  assert spec["pre_tokenizer"]["type"] == "Whitespace" and spec["normalizer"] is None
  counts = vocabulary.count_tokens(tok, _read(built.corpus_path).decode())
  masks = vocabulary.load_mask_file(built.mask_path)
  np.testing.assert_array_equal(masks["dead_mask"], counts == 0)
  m = built.manifest
  assert m["recipe"] == lab_data.RECIPE_NAME and m["counts"]["dead"] == int((counts == 0).sum())
  en = m["sources"]["english"]
  assert (en["dataset"], en["config"], en["revision"]) == ("HuggingFaceFW/fineweb", "sample-10BT",
                                                          "en-commit-1")
  assert en["shards"][0] == {"file": "sample/10BT/000_00000.parquet", "row_groups": 9}
  for name, digest in m["files"].items():
    assert vocabulary.sha256_file(os.path.join(built.directory, name)) == digest
  assert m["sources"]["thai"]["revision"] == "th-commit-1"


def test_two_builds_are_byte_identical(built, mirror, tmp_path):
  again = lab_data.build(str(tmp_path), mirror=mirror, rec=REC)
  for name in (recipe.TOKENIZER_FILE, recipe.CORPUS_FILE, recipe.MASK_FILE,
               recipe.TOKENIZER_CORPUS_FILE, recipe.MANIFEST_FILE):
    assert _read(os.path.join(again.directory, name)) == _read(os.path.join(built.directory, name))


def test_experiments_load_it_with_data_source_fineweb(built):
  cfg = config_lib.DataConfig(source="fineweb", data_dir=os.path.dirname(built.directory),
                              batch_size=4, seq_len=16)
  c = corpus_lib.load_corpus(cfg, REC.vocab_size)
  assert c.paths["corpus"] == built.corpus_path and c.n_dead > 0
  with pytest.raises(vocabulary.DataError, match="build it first with"):
    corpus_lib.load_corpus(config_lib.DataConfig(source="fineweb", data_dir="/nonexistent/x"),
                           REC.vocab_size)


def test_crucible1_trains_on_it_end_to_end(built, tmp_path):
  # The mirror's structure through a run: build -> --data_source=fineweb -> trajectory.
  import experiments
  from jaxdt.io import tensorfile
  from jaxdt.training import loop
  cfg = experiments.load("crucible1")
  cfg = single_trace(dataclasses.replace(
      cfg, steps=4,
      model=dataclasses.replace(cfg.model, vocab_size=REC.vocab_size, hidden_dim=32,
                                max_seq_len=16),
      data=dataclasses.replace(cfg.data, source="fineweb", batch_size=4, seq_len=16,
                               data_dir=os.path.dirname(built.directory))))
  result = loop.train(cfg, str(tmp_path / "run"), progress=False, log=lambda s: None)
  mask = corpus_lib.load_corpus(cfg.data, REC.vocab_size).dead_mask
  with tensorfile.TrajectoryReader(result.trajectory) as r:
    assert r.shape("W") == (5, int(mask.sum()), 32)
    np.testing.assert_array_equal(r.read("dead_mask"), mask)
    assert np.isfinite(r.read("loss")[1:]).all()
  assert result.metadata["data_files"]["corpus"] == hashlib.sha256(_read(built.corpus_path)).hexdigest()


def test_streams_stop_at_the_budgets(mirror, tmp_path, monkeypatch):
  opened = []
  real = lab_data.Hub.open
  monkeypatch.setattr(lab_data.Hub, "open", lambda self, src, rev, path: (
      opened.append(path), real(self, src, rev, path))[1])
  lab_data.build(str(tmp_path), mirror=mirror, rec=REC)
  shards = {p for p in opened if "10BT" in p}
  assert len(shards) < 7  # 400 documents in 7 shards; the budgets need fewer
  assert "sample/10BT/006_00000.parquet" not in shards


def test_a_cut_connection_resumes_from_the_row_groups_read(mirror, tmp_path, monkeypatch):
  real = lab_data.Hub.open
  def flaky(self, src, rev, path):
    if path.endswith("002_00000.parquet"):
      raise OSError("connection reset by peer")
    return real(self, src, rev, path)
  monkeypatch.setattr(lab_data.Hub, "open", flaky)
  with pytest.raises(vocabulary.DataError, match="cannot read shard sample/10BT/002_00000"):
    lab_data.build(str(tmp_path), mirror=mirror, rec=REC)
  assert not os.path.exists(lab_data.cache_directory(str(tmp_path)))  # nothing half-written
  kept = len(os.listdir(tmp_path / lab_data.ROWS_SUBDIR))
  assert kept >= 20  # shards 000 and 001, row group by row group, and their counts
  opened = []
  monkeypatch.setattr(lab_data.Hub, "open", lambda self, src, rev, path: (
      opened.append(path), real(self, src, rev, path))[1])
  lab_data.build(str(tmp_path), mirror=mirror, rec=REC)
  assert not any(p in ("sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet")
                 for p in opened)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_corrupt_shard_is_one_line(mirror, tmp_path, damage):
  import shutil
  bad = tmp_path / "mirror"
  shutil.copytree(mirror, bad)
  shard = bad / "HuggingFaceFW" / "fineweb" / "sample" / "10BT" / "001_00000.parquet"
  raw = shard.read_bytes()
  shard.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else b"PAR1" + b"\0" * 100)
  with pytest.raises(vocabulary.DataError) as e:
    lab_data.build(str(tmp_path / "cache"), mirror=str(bad), rec=REC)
  assert "001_00000.parquet" in str(e.value) and "\n" not in str(e.value)
  assert "truncated or corrupt" in str(e.value)


def test_a_missing_revision_extra_or_disk_is_one_line(mirror, tmp_path, monkeypatch):
  with pytest.raises(vocabulary.DataError, match="revision 'gone' of HuggingFaceFW/fineweb is not"):
    lab_data.build(str(tmp_path / "a"), mirror=mirror, revision="gone", rec=REC)
  monkeypatch.setattr(lab_data.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20}))
  with pytest.raises(vocabulary.DataError, match="MiB free; the lab's data needs about"):
    lab_data.build(str(tmp_path / "b"), mirror=mirror, rec=REC)
  monkeypatch.undo()
  real_import = builtins.__import__
  def no_pyarrow(name, *a, **k):
    if name.startswith("pyarrow"):
      raise ImportError(name)
    return real_import(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", no_pyarrow)
  with pytest.raises(vocabulary.DataError, match=r"pip install -e '\.\[lab-data\]'"):
    lab_data.build(str(tmp_path / "c"), mirror=mirror, rec=REC)


def test_cli_without_network_is_one_line_naming_the_routes(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--experiment=flannel_data",
                      "--data_source=fineweb", f"--data_dir={tmp_path}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
  assert "network" in r.stderr and "--corpus_path" in r.stderr, r.stderr
  assert not os.path.exists(lab_data.cache_directory(str(tmp_path)))
