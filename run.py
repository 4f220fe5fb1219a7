"""jaxdt entry point: `python run.py --experiment=NAME [flags]`.

Experiments are functions in EXPERIMENTS, keyed by name. Bad data input
(`jaxdt.data.DataError`) prints one line, `error: <message>`, to stderr and
exits with status 2, without a traceback.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags

from jaxdt import config as config_lib
from jaxdt import data

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None, "Experiment to run, one of: flannel_data.")
flags.DEFINE_string(
    "data_dir", None,
    "Cache for the embedded default data (default: $XDG_CACHE_HOME/jaxdt or ~/.cache/jaxdt).")
flags.DEFINE_string(
    "corpus_path", None, "The lab's flannel_model_corpus.txt (UTF-8); needs --tokenizer_path.")
flags.DEFINE_string(
    "tokenizer_path", None, "The lab's flannel_tokenizer_chars.json; needs --corpus_path.")
flags.DEFINE_string(
    "dead_mask_path", None,
    "The lab's live_dead_tokens.safetensors; checked against a recount of the corpus.")


def data_config(base: config_lib.DataConfig) -> config_lib.DataConfig:
  """`base` with the data flags applied."""
  return dataclasses.replace(
      base, data_dir=FLAGS.data_dir, corpus_path=FLAGS.corpus_path,
      tokenizer_path=FLAGS.tokenizer_path, dead_mask_path=FLAGS.dead_mask_path)


def flannel_data() -> None:
  """Builds or validates the data and prints the lab's notebook counts."""
  cfg = config_lib.ExperimentConfig()
  cfg = dataclasses.replace(cfg, data=data_config(cfg.data))
  corpus = data.load_corpus(cfg.data, cfg.model.vocab_size, verbose=True)
  print(data.report(corpus, cfg.data))


EXPERIMENTS = {
    "flannel_data": flannel_data,
}


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run = EXPERIMENTS.get(FLAGS.experiment)
  if run is None:
    print(f"error: unknown experiment {FLAGS.experiment!r}; "
          f"use --experiment=one of {sorted(EXPERIMENTS)}", file=sys.stderr)
    return 2
  try:
    run()
  except data.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
