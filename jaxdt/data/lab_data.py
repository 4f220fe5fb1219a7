"""The lab's own data, rebuilt from FineWeb: the Flannel recipe (REFERENCE §1), when online.

    python run.py --experiment=flannel_data --data_source=fineweb [--data_dir=DIR]

reads parquet shards of `HuggingFaceFW/fineweb` (config sample-10BT) and
`HuggingFaceFW/fineweb-2` (config tha_Thai) in file order, row group by row
group, and stops each stream at its byte budget, so nothing is downloaded
beyond the row groups it reads:

  tokenizer corpus  English from document 0 until 80 MiB (the crossing document
                    included), then Thai until 20 MiB, joined with a blank line;
  model corpus      the English stream after skipping 10,000 documents, until 5 MiB;
  tokenizer         the lab's character-level BPE on the tokenizer corpus
                    (`recipe.train_tokenizer`);
  live/dead mask    one `encode` of the whole model corpus.

The four files and a manifest (each source's dataset, config, resolved
revision, the shards and row groups read, document and byte counts, every
file's SHA-256) go into `<data_dir>/fineweb-v1`, written in a temporary folder
and renamed into place, so the cache is never half-written. Row groups already
read are kept (`.fineweb-rows/`, each checked against its SHA-256 when reused),
so a cut connection resumes from them. Every later experiment takes the data
with `--data_source=fineweb`.

Online the shards are read through `huggingface_hub` (HfFileSystem range
reads) and `pyarrow`: the optional extra `pip install -e '.[lab-data]'`. A
local mirror in the hub's layout (`<mirror>/<dataset>/<file>`) takes the same
path with the local filesystem: that is how the tests run it offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Callable, Iterator, Optional

from jaxdt.data import recipe
from jaxdt.data import vocabulary
from jaxdt.io import disk

RECIPE_NAME, RECIPE_VERSION = "flannel-fineweb", 1
CACHE_SUBDIR = f"fineweb-v{RECIPE_VERSION}"
ROWS_SUBDIR = ".fineweb-rows"
MIB = 1 << 20
EXTRA_HINT = ("install the optional extra: pip install -e '.[lab-data]' (or pass the lab's "
              "own files with --corpus_path and --tokenizer_path)")

# The lab's published counts (REFERENCE §1), printed beside a build's.
LAB_COUNTS = {"english documents": 26_868, "english bytes": 83_888_103, "thai documents": 2_189,
              "thai bytes": 20_974_721, "tokenizer corpus bytes": 104_920_936,
              "unique characters": 2_800, "model documents": 1_607, "model bytes": 5_253_807,
              "model corpus file bytes": 5_257_019, "model tokens": 1_371_328,
              "live tokens": 6_301, "dead tokens": 3_699}


@dataclasses.dataclass(frozen=True)
class Source:
  """One hub dataset the recipe streams."""

  dataset: str
  config: str
  prefix: str  # the shards: `<prefix>*.parquet` in the repository, in file order
  revision: str = "main"  # resolved to a commit when read (recorded in the manifest)


ENGLISH = Source("HuggingFaceFW/fineweb", "sample-10BT", "sample/10BT/")
THAI = Source("HuggingFaceFW/fineweb-2", "tha_Thai", "data/tha_Thai/train/")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The Flannel recipe's budgets (the lab's by default; tests shrink them)."""

  english_bytes: int = 80 * MIB
  thai_bytes: int = 20 * MIB
  model_skip: int = 10_000
  model_bytes: int = 5 * MIB
  vocab_size: int = recipe.VOCAB_SIZE
  english: Source = ENGLISH
  thai: Source = THAI


# --- Reading shards --------------------------------------------------------------------


def _modules():
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise vocabulary.DataError(f"--data_source=fineweb needs pyarrow; {EXTRA_HINT}") from None
  return pq


class Hub:
  """Where shards come from: the Hugging Face Hub, or a local mirror in its layout."""

  def __init__(self, mirror: Optional[str] = None):
    self.mirror = mirror

  def resolve(self, src: Source) -> tuple[str, list]:
    """(the revision's commit, the shard files in order)."""
    if self.mirror:
      root = os.path.join(self.mirror, src.dataset)
      revision = _read_revision(root)
      if src.revision not in ("main", revision):
        raise vocabulary.DataError(f"revision {src.revision!r} of {src.dataset} is not in the "
                                   f"mirror {self.mirror} (it has {revision!r}); pass "
                                   "--fineweb_revision=" + revision)
      base = os.path.join(root, src.prefix)
      names = sorted(f for f in os.listdir(base) if f.endswith(".parquet")) if os.path.isdir(
          base) else []
      return revision, [src.prefix + f for f in names]
    return _hub_resolve(src)

  def open(self, src: Source, revision: str, path: str):
    if self.mirror:
      return open(os.path.join(self.mirror, src.dataset, path), "rb")
    from huggingface_hub import HfFileSystem  # pylint: disable=g-import-not-at-top
    return HfFileSystem().open(f"datasets/{src.dataset}@{revision}/{path}", "rb")


def _read_revision(root: str) -> str:
  try:
    with open(os.path.join(root, ".revision"), encoding="utf-8") as f:
      return f.read().strip() or "mirror"
  except OSError:
    return "mirror"


def _hub_resolve(src: Source) -> tuple[str, list]:
  try:
    from huggingface_hub import HfApi  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise vocabulary.DataError(f"--data_source=fineweb needs huggingface_hub; {EXTRA_HINT}") from None
  api = HfApi()
  try:
    sha = api.dataset_info(src.dataset, revision=src.revision).sha
    files = api.list_repo_files(src.dataset, repo_type="dataset", revision=sha)
  except (errors.RevisionNotFoundError, errors.RepositoryNotFoundError):
    raise vocabulary.DataError(f"revision {src.revision!r} of {src.dataset} does not exist (any "
                               "more); pass a revision the hub has with --fineweb_revision") from None
  except Exception as e:  # pylint: disable=broad-except  # requests/httpx/offline errors
    raise vocabulary.DataError(
        f"cannot reach the Hugging Face Hub for {src.dataset} ({vocabulary.one_line(e)}); check "
        "the network (HF_HUB_OFFLINE unset), or pass the lab's own files with --corpus_path and "
        "--tokenizer_path") from None
  shards = sorted(f for f in files if f.startswith(src.prefix) and f.endswith(".parquet"))
  return sha, shards


class Rows:
  """Row groups already read, kept on disk (a cut connection resumes from them)."""

  def __init__(self, folder: str):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)

  def _path(self, src: Source, revision: str, shard: str, group: int) -> str:
    key = hashlib.sha256(f"{src.dataset}@{revision}/{shard}#{group}".encode()).hexdigest()[:32]
    return os.path.join(self.folder, key + ".json")

  def get(self, src, revision, shard, group) -> Optional[list]:
    path = self._path(src, revision, shard, group)
    fix = f"delete {self.folder} (a damaged download cache) and build again"
    saved = vocabulary.read_json(path, fix, schema={"texts": list, "texts[]": str, "sha256": str},
                                 max_bytes=max(16 << 20, disk.memory_budget() // 4),
                                 missing_ok=True)
    if saved is None:
      return None
    texts = saved.get("texts")
    if _digest(texts) != saved.get("sha256"):
      raise vocabulary.DataError(f"kept row group {path} does not match its SHA-256 (a damaged "
                                 f"download cache); delete {self.folder} and build again")
    return texts

  def groups(self, src, revision, shard) -> Optional[int]:
    """The shard's row-group count, once it has been read to its end."""
    try:
      saved = vocabulary.read_json(self._path(src, revision, shard, -1), "", missing_ok=True,
                                   schema={"row_groups": int}, required=("row_groups",))
    except vocabulary.DataError:
      return None  # read the shard again
    return None if saved is None else saved["row_groups"]

  def put_groups(self, src, revision, shard, n: int) -> None:
    path = self._path(src, revision, shard, -1)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"shard": shard, "row_groups": n}, f)
    os.replace(path + ".tmp", path)

  def put(self, src, revision, shard, group, texts: list) -> None:
    path = self._path(src, revision, shard, group)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"shard": shard, "group": group, "sha256": _digest(texts), "texts": texts}, f,
                ensure_ascii=False)
    os.replace(tmp, path)


def _digest(texts) -> str:
  return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()


def documents(hub: Hub, src: Source, rows: Rows, read: dict) -> Iterator[str]:
  """The source's documents in order, row group by row group; `read` records the shards and
  row groups taken (for the manifest)."""
  pq = _modules()
  revision, shards = hub.resolve(src)
  read.update(dataset=src.dataset, config=src.config, revision=revision, shards=[])
  if not shards:
    raise vocabulary.DataError(f"{src.dataset} has no shards under {src.prefix!r} at revision "
                               f"{revision}; check the dataset and --fineweb_revision")
  for shard in shards:
    entry = {"file": shard, "row_groups": 0}
    read["shards"].append(entry)
    meta, n_groups = None, rows.groups(src, revision, shard)
    group = 0
    while n_groups is None or group < n_groups:
      texts = rows.get(src, revision, shard, group)
      if texts is None:
        meta = meta or _parquet(pq, hub, src, revision, shard)
        if n_groups is None:
          n_groups = meta.num_row_groups
          rows.put_groups(src, revision, shard, n_groups)
        if group >= n_groups:
          break
        texts = _row_group_texts(meta, group, shard)
        rows.put(src, revision, shard, group, texts)
      entry["row_groups"] = group + 1
      yield from texts
      group += 1


def _parquet(pq, hub, src, revision, shard):
  try:
    return pq.ParquetFile(hub.open(src, revision, shard))
  except OSError as e:
    raise vocabulary.DataError(f"cannot read shard {shard} of {src.dataset} "
                               f"({vocabulary.one_line(e)}); check the network, or delete a "
                               "damaged mirror file") from None
  except Exception as e:  # pylint: disable=broad-except  # pyarrow's ArrowInvalid and kin
    raise vocabulary.DataError(f"shard {shard} of {src.dataset} is not a readable parquet file "
                               f"({vocabulary.one_line(e)}): truncated or corrupt; delete it "
                               "and read it again") from None


def _row_group_texts(meta, group: int, shard: str) -> list:
  try:
    table = meta.read_row_group(group, columns=["text"])
  except Exception as e:  # pylint: disable=broad-except
    raise vocabulary.DataError(f"row group {group} of shard {shard} is unreadable "
                               f"({vocabulary.one_line(e)}): truncated or corrupt; delete it "
                               "and read it again") from None
  return [t if isinstance(t, str) else "" for t in table.column("text").to_pylist()]


def take(docs: Iterator[str], budget: int, skip: int = 0) -> tuple[list, int]:
  """Documents after the first `skip`, until their UTF-8 bytes reach `budget` (the crossing
  document included, as the lab's loop did); (docs, bytes)."""
  out, total = [], 0
  for i, d in enumerate(docs):
    if i < skip:
      continue
    out.append(d)
    total += len(d.encode("utf-8"))
    if total >= budget:
      break
  return out, total


# --- Building the cache ----------------------------------------------------------------


def _check_disk(root: str, need: int) -> None:
  try:
    free = shutil.disk_usage(root).free
  except OSError:
    return
  if free < need:
    raise vocabulary.DataError(f"{root} has {free / MIB:.0f} MiB free; the lab's data needs about "
                               f"{need / MIB:.0f} MiB: free space or pass another --data_dir")


def _build_files(folder: str, hub: Hub, rec: Recipe, rows: Rows, log) -> dict:
  """The four files into `folder`; returns the manifest (not written)."""
  english_read, thai_read, model_read = {}, {}, {}
  english, e_bytes = take(documents(hub, rec.english, rows, english_read), rec.english_bytes)
  log(f"English: {len(english):,} documents, {e_bytes:,} bytes")
  thai, t_bytes = take(documents(hub, rec.thai, rows, thai_read), rec.thai_bytes)
  log(f"Thai: {len(thai):,} documents, {t_bytes:,} bytes")
  model, m_bytes = take(documents(hub, rec.english, rows, model_read), rec.model_bytes,
                        skip=rec.model_skip)
  log(f"model corpus: {len(model):,} documents after skipping {rec.model_skip:,}, "
      f"{m_bytes:,} bytes")
  tokenizer_text = recipe.DOC_SEPARATOR.join(english + thai)  # English first, as the lab
  model_text = recipe.DOC_SEPARATOR.join(model)
  tokenizer = recipe.train_tokenizer(tokenizer_text, rec.vocab_size)
  counts = vocabulary.count_tokens(tokenizer, model_text)
  masks = vocabulary.masks_from_counts(counts)
  recipe.write_text(os.path.join(folder, recipe.TOKENIZER_CORPUS_FILE), tokenizer_text)
  recipe.write_text(os.path.join(folder, recipe.CORPUS_FILE), model_text)
  tokenizer.save(os.path.join(folder, recipe.TOKENIZER_FILE))
  vocabulary.write_mask_file(os.path.join(folder, recipe.MASK_FILE), masks)
  files = (recipe.TOKENIZER_FILE, recipe.CORPUS_FILE, recipe.MASK_FILE,
           recipe.TOKENIZER_CORPUS_FILE)
  return {
      "recipe": RECIPE_NAME, "recipe_version": RECIPE_VERSION,
      "budgets": dataclasses.asdict(rec), "versions": recipe.source_versions(),
      "sources": {
          "english": {**english_read, "documents": len(english), "bytes": e_bytes},
          "thai": {**thai_read, "documents": len(thai), "bytes": t_bytes},
          "model": {**model_read, "skip": rec.model_skip, "documents": len(model),
                    "bytes": m_bytes}},
      "files": {n: vocabulary.sha256_file(os.path.join(folder, n)) for n in sorted(files)},
      "counts": {"unique_characters": len(set(tokenizer_text)),
                 "tokenizer_corpus_bytes": len(tokenizer_text.encode("utf-8")),
                 "model_corpus_file_bytes": len(model_text.encode("utf-8")),
                 "vocab_size": int(counts.size), "total_tokens": int(counts.sum()),
                 "live": int(masks["live_mask"].sum()), "dead": int(masks["dead_mask"].sum())},
  }


def build(data_dir: Optional[str] = None, *, mirror: Optional[str] = None,
          revision: Optional[str] = None, rec: Recipe = Recipe(),
          log: Callable[[str], None] = lambda s: None) -> recipe.DefaultData:
  """Builds the lab's data into `<data_dir>/fineweb-v1` once, or checks and reuses it.

  Raises:
    DataError: one line: no extra, no network, a missing revision, a corrupt
      shard, too little disk, or a cache that does not match its manifest.
  """
  if revision:
    rec = dataclasses.replace(rec, english=dataclasses.replace(rec.english, revision=revision),
                              thai=dataclasses.replace(rec.thai, revision=revision))
  root = os.path.abspath(os.path.expanduser(data_dir or recipe.default_cache_root()))
  directory = os.path.join(root, CACHE_SUBDIR)
  if os.path.exists(directory):
    return recipe.check_cache(directory, RECIPE_VERSION)
  _modules()
  os.makedirs(root, exist_ok=True)
  _check_disk(root, 3 * (rec.english_bytes + rec.thai_bytes + rec.model_bytes) + 64 * MIB)
  rows = Rows(os.path.join(root, ROWS_SUBDIR))
  return recipe.atomic_build(root, CACHE_SUBDIR, lambda tmp: _build_files(
      tmp, Hub(mirror), rec, rows, log), log)


def cache_directory(data_dir: Optional[str]) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir or recipe.default_cache_root())),
                      CACHE_SUBDIR)


def lab_comparison(manifest: dict) -> str:
  """This build's counts beside the lab's published ones."""
  s, c = manifest["sources"], manifest["counts"]
  ours = {"english documents": s["english"]["documents"], "english bytes": s["english"]["bytes"],
          "thai documents": s["thai"]["documents"], "thai bytes": s["thai"]["bytes"],
          "tokenizer corpus bytes": c["tokenizer_corpus_bytes"],
          "unique characters": c["unique_characters"],
          "model documents": s["model"]["documents"], "model bytes": s["model"]["bytes"],
          "model corpus file bytes": c["model_corpus_file_bytes"],
          "model tokens": c["total_tokens"], "live tokens": c["live"], "dead tokens": c["dead"]}
  lines = [f"{'':<26} {'this build':>14} {'the lab':>14}"]
  lines += [f"{k:<26} {ours[k]:>14,} {v:>14,}" for k, v in LAB_COUNTS.items()]
  revs = ", ".join(f"{x['dataset']}@{x['revision']}" for x in (s["english"], s["thai"]))
  return "\n".join(lines + [f"sources: {revs}"])
