"""A training run in its own process, for the fault tests: `python fault_runner.py ARGS.json`.

ARGS.json: {"config": config JSON, "out_dir", "resume": bool, "kill_at": "point#n" or
null, "times": path or null}. With kill_at, the process SIGKILLs itself at the n-th
(1-based) call of `disk.fault_point(point)` (no Python clean-up runs: as a
power cut or `kill -9`). With times, it appends "<seconds since start> <point>"
per protocol point (for choosing random kill instants inside the run).
"""

import json
import os
import signal
import sys
import time

T0 = time.perf_counter()

from jaxdt import config as config_lib  # noqa: E402
from jaxdt.io import disk  # noqa: E402
from jaxdt.training import loop  # noqa: E402


def main(path: str) -> int:
  with open(path, encoding="utf-8") as f:
    args = json.load(f)
  cfg = config_lib.from_json(config_lib.ExperimentConfig, args["config"])
  kill_at, counts = args.get("kill_at"), {}
  times = open(args["times"], "a", encoding="utf-8") if args.get("times") else None

  def hook(point: str) -> None:
    counts[point] = counts.get(point, 0) + 1
    if times is not None:
      times.write(f"{time.perf_counter() - T0:.6f} {point}\n")
      times.flush()
    if kill_at == f"{point}#{counts[point]}":
      os.kill(os.getpid(), signal.SIGKILL)

  disk.FAULT_HOOK = hook
  loop.train(cfg, args["out_dir"], resume=args["resume"], progress=False, log=lambda s: None)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
