"""run.py's `main` on a config of the test's choosing: `python cli_runner.py CONFIG.json [FLAGS]`.

CONFIG.json holds {"config": config JSON, "fault": null or ["point#n", "errno name"]}.
`experiments.load(<its name>)` returns that config (run.py's flags still apply on
top; its data paths are passed as flags), so the tests drive the real command
line on a tiny model. With fault, the
n-th call of `disk.fault_point(point)` raises OSError(errno), as a full or
failing disk would, or (errno "SIGINT", "SIGTERM") sends the process that signal.
"""

import errno
import importlib.util
import json
import os
import signal
import sys

from absl import app

import experiments

# run.py is a script, not a package module: load it from the checkout by its path.
_RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "run.py")
_spec = importlib.util.spec_from_file_location("run", _RUN)
run = importlib.util.module_from_spec(_spec)
sys.modules["run"] = run
_spec.loader.exec_module(run)

from jaxdt import config as config_lib  # noqa: E402
from jaxdt.io import disk  # noqa: E402


def _setup(path: str) -> None:
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  cfg = config_lib.from_json(config_lib.ExperimentConfig, spec["config"])
  for flag in ("corpus_path", "tokenizer_path", "dead_mask_path"):  # run.py sets these from flags
    if getattr(cfg.data, flag):
      sys.argv.append(f"--{flag}={getattr(cfg.data, flag)}")
  original = experiments.load
  experiments.load = lambda name: cfg if name == cfg.name else original(name)
  if spec.get("fault"):
    point, code = spec["fault"]
    counts = {}

    def hook(name):
      counts[name] = counts.get(name, 0) + 1
      if f"{name}#{counts[name]}" == point:
        if code.startswith("SIG"):  # a real signal, delivered at a known instant
          os.kill(os.getpid(), getattr(signal, code))
          return
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number), "injected")

    disk.FAULT_HOOK = hook


if __name__ == "__main__":
  _setup(sys.argv.pop(1))
  app.run(run.main)
