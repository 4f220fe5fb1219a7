"""Loading a corpus: the lab's three files (or the embedded default), checked.

Three inputs feed every experiment (docs/definitions.md §Steps and files):
  * a `tokenizers` JSON (`flannel_tokenizer_chars.json`),
  * the model corpus as UTF-8 text (`flannel_model_corpus.txt`),
  * the live/dead mask (`live_dead_tokens.safetensors`).
Users may pass the lab's own files unchanged; `load_corpus` checks them
against each other (vocab size, counts, masks) and says which file to fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from jaxdt.config import DataConfig
from jaxdt.data import recipe
from jaxdt.data import sampler
from jaxdt.data import vocabulary


# --- Loading a corpus --------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A tokenized model corpus and its live/dead split."""

  tokens: np.ndarray  # int32 [N], one encode of the whole corpus, no EOS
  vocab_size: int
  dead_mask: np.ndarray  # bool [V]
  live_mask: np.ndarray  # bool [V]
  dead_indices: np.ndarray  # int64 [n_dead], sorted
  live_indices: np.ndarray  # int64 [n_live], sorted
  token_occurrence_counts: np.ndarray  # int64 [V]
  vocab: tuple  # token string per id
  n_chars: int  # characters of the corpus text (for tokens per character)
  files: dict  # input name -> sha256 of the file used
  paths: dict  # input name -> path
  default: Optional[recipe.DefaultData] = None  # set when the embedded default was used

  @property
  def n_dead(self) -> int:
    return int(self.dead_mask.sum())

  @property
  def n_live(self) -> int:
    return int(self.live_mask.sum())


def _load_tokenizer(path: str, vocab_size: int):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  raw = vocabulary.read_bytes(path, "tokenizer", "--tokenizer_path")
  try:
    tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
  except Exception as e:  # tokenizers raises a bare Exception
    raise vocabulary.DataError(
        f"tokenizer {path!r} is not a tokenizers JSON ({vocabulary.one_line(e)}); "
        "pass the lab's flannel_tokenizer_chars.json") from None
  got = tokenizer.get_vocab_size(with_added_tokens=True)
  if got != vocab_size:
    raise vocabulary.DataError(
        f"tokenizer {path!r} has {got} tokens but the model is configured for {vocab_size}; "
        f"use a {vocab_size}-token tokenizer or set model.vocab_size={got}")
  return tokenizer, vocabulary.sha256_bytes(raw)


def _check_mask(path: str, arrays: dict, counts: np.ndarray, corpus_path: str) -> None:
  """The user's mask must have the lab's layout and the recount's dead set."""
  vocab_size = counts.size
  fix = ("rebuild it from this corpus (omit --dead_mask_path) "
         "or pass the corpus and tokenizer it was made from")
  lab = "pass the lab's live_dead_tokens.safetensors"
  if "dead_mask" not in arrays:
    raise vocabulary.DataError(f"mask file {path!r} has no 'dead_mask' (keys {sorted(arrays)}); {lab}")
  dead = arrays["dead_mask"]
  if dead.dtype != np.bool_ or dead.ndim != 1:
    raise vocabulary.DataError(
        f"mask file {path!r}: dead_mask is {dead.dtype} {list(dead.shape)}, not bool [V]; {lab}")
  if dead.size != vocab_size:
    raise vocabulary.DataError(
        f"mask file {path!r}: dead_mask has length {dead.size} but the vocabulary has "
        f"{vocab_size}; pass the mask made with this tokenizer")
  expected = vocabulary.masks_from_counts(counts)
  wrong = np.flatnonzero(dead != expected["dead_mask"])
  if wrong.size:
    i = int(wrong[0])
    raise vocabulary.DataError(
        f"mask file {path!r} disagrees with the recount of {corpus_path!r} on {wrong.size} ids "
        f"(first: id {i} has {int(counts[i])} occurrences, mask says "
        f"{'dead' if dead[i] else 'live'}); {fix}")
  for key in ("live_mask", "live_indices", "dead_indices", "token_occurrence_counts"):
    if key in arrays and not np.array_equal(arrays[key], expected[key]):
      raise vocabulary.DataError(
          f"mask file {path!r}: {key} disagrees with the recount of {corpus_path!r}; {fix}")


def _load_files(corpus_path: str, tokenizer_path: str, mask_path: Optional[str], vocab_size: int,
                default: Optional[recipe.DefaultData] = None) -> Corpus:
  tokenizer, tokenizer_sha = _load_tokenizer(tokenizer_path, vocab_size)
  raw = vocabulary.read_bytes(corpus_path, "corpus", "--corpus_path")
  text = vocabulary.decode_text(raw, corpus_path, "--corpus_path")
  tokens = vocabulary.encode_text(tokenizer, text)
  counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
  files = {"corpus": vocabulary.sha256_bytes(raw), "tokenizer": tokenizer_sha}
  paths = {"corpus": corpus_path, "tokenizer": tokenizer_path}
  if mask_path is not None:
    _check_mask(mask_path, vocabulary.load_mask_file(mask_path), counts, corpus_path)
    files["mask"], paths["mask"] = vocabulary.sha256_file(mask_path), mask_path
  masks = vocabulary.masks_from_counts(counts)
  vocab = tuple(tokenizer.id_to_token(i) or "" for i in range(vocab_size))
  return Corpus(tokens, vocab_size, masks["dead_mask"], masks["live_mask"], masks["dead_indices"],
                masks["live_indices"], counts, vocab, len(text), files, paths, default)


def _fineweb_cache(cfg: DataConfig) -> recipe.DefaultData:
  """The lab's data rebuilt from FineWeb (`lab_data`), which must have been built."""
  from jaxdt.data import lab_data  # pylint: disable=g-import-not-at-top
  directory = lab_data.cache_directory(cfg.data_dir)
  if not os.path.exists(directory):
    raise vocabulary.DataError(
        f"--data_source=fineweb: {directory} does not exist; build it first with "
        "python run.py --experiment=flannel_data --data_source=fineweb (same --data_dir)")
  return recipe.check_cache(directory, lab_data.RECIPE_VERSION)


def load_corpus(cfg: DataConfig, vocab_size: int, *, verbose: bool = False) -> Corpus:
  """The model corpus for `cfg`: the user's files, or the embedded default.

  Args:
    cfg: data config. `corpus_path` and `tokenizer_path` go together;
      `dead_mask_path` is optional and is checked against a recount.
    vocab_size: the model's vocabulary size; the tokenizer must match it.
    verbose: print build progress when the default is built.

  Returns:
    The tokenized corpus with its masks.

  Raises:
    DataError: missing or unreadable files, non-UTF-8 text, tokenizer vocab !=
      vocab_size, mask length != vocab, a mask that disagrees with the corpus
      counts, a corpus shorter than one batch, or a bad cache. Nothing is
      written in any of these cases.
  """
  if (cfg.corpus_path is None) != (cfg.tokenizer_path is None):
    given = "--corpus_path" if cfg.corpus_path else "--tokenizer_path"
    raise vocabulary.DataError(
        f"{given} was given alone; pass both --corpus_path and --tokenizer_path (a corpus "
        "needs its own tokenizer), or neither for the default")
  sampler.check_scheme(cfg)
  if cfg.corpus_path is None and cfg.source == "fineweb":
    default = _fineweb_cache(cfg)
    corpus = _load_files(default.corpus_path, default.tokenizer_path,
                         cfg.dead_mask_path or default.mask_path, vocab_size, default)
  elif cfg.corpus_path is None:
    default = recipe.build_default(cfg.data_dir, verbose=verbose)
    corpus = _load_files(default.corpus_path, default.tokenizer_path,
                         cfg.dead_mask_path or default.mask_path, vocab_size, default)
  else:
    corpus = _load_files(cfg.corpus_path, cfg.tokenizer_path, cfg.dead_mask_path, vocab_size)
  if sampler.batches_per_epoch(corpus.tokens.size, cfg) < 1:
    raise vocabulary.DataError(
        f"corpus {corpus.paths['corpus']!r} has {corpus.tokens.size:,} tokens, fewer than one "
        f"{cfg.scheme} batch of {cfg.batch_size} x {cfg.seq_len}; "
        "use a longer corpus or a smaller batch_size/seq_len")
  return corpus
