"""What the command-line scripts share (benchmarks/, torchref.peer): absl errors as one line, exit 2."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its errors as one line and exit status 2 (as run.py)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {'; '.join(str(e).splitlines())}; see --helpfull", file=sys.stderr)
    sys.exit(2)


def run_tool(main, define_flags) -> None:
  """A tool module's command line (`python -m torchref.twins`, ...): its flags defined,
  then `main` under absl with one-line flag errors (`parse_flags`)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main, flags_parser=parse_flags)
