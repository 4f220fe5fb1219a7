"""Shared fixtures: a tiny tokenizer/corpus/mask in the lab's formats, and tiny configs."""

import dataclasses
import os

import pytest
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

# jaxdt must never need a GPU; keep tests on the CPU even where one exists.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests train the same tiny model from scratch; a persistent compilation
# cache lets every run after the first skip XLA compilation.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxdt-test-xla-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

TINY_VOCAB = 256
_THAI = "ภาษาไทย เป็น ภาษา ที่ ใช้ ใน ประเทศไทย สวัสดี ครับ ขอบคุณ มาก แมว กิน ปลา " * 40


def _english():
  return "\n\n".join(topics[k] for k in sorted(topics))


def make_tiny_data(folder: str) -> dict:
  """Tokenizer (English + Thai BPE, vocab 256) and an English-only corpus; Thai is dead."""
  from jaxdt.data import vocabulary
  english = _english()
  tok_text = english[:60_000] + "\n\n" + _THAI
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.train_from_iterator([tok_text], trainer=trainers.BpeTrainer(
      vocab_size=TINY_VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"],
      initial_alphabet=sorted(set(tok_text)), show_progress=False))
  assert tokenizer.get_vocab_size() == TINY_VOCAB, tokenizer.get_vocab_size()
  corpus = english[60_000:90_000]
  paths = {k: os.path.join(folder, n) for k, n in (
      ("tokenizer", "tok.json"), ("corpus", "corpus.txt"), ("mask", "mask.safetensors"))}
  tokenizer.save(paths["tokenizer"])
  with open(paths["corpus"], "w", encoding="utf-8") as f:
    f.write(corpus)
  vocabulary.write_mask_file(paths["mask"], vocabulary.masks_from_counts(vocabulary.count_tokens(tokenizer, corpus)))
  return paths


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  return make_tiny_data(str(tmp_path_factory.mktemp("tiny_data")))


def tiny_config(paths: dict, **overrides):
  """crucible1 shrunk: vocab 256, D 32, batch 4 x 16, 12 steps, checkpoints at 5 and 9."""
  import experiments
  cfg = experiments.load("crucible1")
  cfg = dataclasses.replace(
      cfg, steps=12,
      model=dataclasses.replace(cfg.model, vocab_size=TINY_VOCAB, hidden_dim=32, max_seq_len=16),
      data=dataclasses.replace(cfg.data, batch_size=4, seq_len=16, corpus_path=paths["corpus"],
                               tokenizer_path=paths["tokenizer"], dead_mask_path=paths["mask"]),
      store=dataclasses.replace(cfg.store, checkpoint_steps=(5, 9), chunk_steps=4))
  return dataclasses.replace(cfg, **overrides)


def single_trace(cfg):
  """`cfg` without checkpoints and with chunks that divide its steps: one chunk length,
  so one trace and compile of the chunk program (for tests that need no checkpoint)."""
  chunk = max(k for k in range(1, 9) if cfg.steps % k == 0)
  return dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, checkpoint_steps=(),
                                                            chunk_steps=chunk))


PHASES = ("data: ", "run folder: ", "compiled the ")  # train's phase lines


def notes_of(said: list) -> list:
  """What `train(log=said.append)` logged apart from its phase lines."""
  return [s for s in said if not s.startswith(PHASES)]
