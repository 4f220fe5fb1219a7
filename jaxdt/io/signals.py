"""SIGINT and SIGTERM during a run: raised as exceptions, remembered, and reported in one line.

`raise_on_signals` makes both raise `Signalled` (a KeyboardInterrupt) in the
main thread and records them, so a signal whose exception Python lost in a
finalizer is raised again by `check_signals`, which the chunk loop calls after
every chunk. The loop turns the exception into `Interrupted`, whose message is
the one line the CLI prints; `exit_status` is the shell's status for it.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional


class Interrupted(Exception):
  """SIGINT/SIGTERM during a run: the folder is left resumable.

  Attributes:
    signum: the signal (signal.SIGINT or signal.SIGTERM).
    step: steps done when it came (rows may not all be on disk).
    resume_from: the step `--resume` will continue from (its newest checkpoint).
  """

  def __init__(self, signum: int, step: Optional[int], resume_from: Optional[int],
               finished_in: Optional[str] = None):
    self.signum, self.step, self.resume_from = signum, step, resume_from
    if finished_in is not None:  # the signal came after the commit point
      super().__init__(f"interrupted after the run finished; see it with --analyze={finished_in}")
      return
    where = "" if step is None else f" after step {step}"
    restart = (" (from step 0: no checkpoint yet)" if resume_from is None else
               f" (from the checkpoint at step {resume_from})")
    super().__init__(f"interrupted{where}; continue with --resume{restart}")

  @classmethod
  def from_signal(cls, e: KeyboardInterrupt, step: Optional[int], resume_from: Optional[int],
                  finished_in: Optional[str] = None) -> "Interrupted":
    """The Interrupted for a caught Ctrl-C or `Signalled`; the signal counts as handled."""
    clear_signals()
    return cls(getattr(e, "signum", signal.SIGINT), step, resume_from, finished_in)


class Signalled(KeyboardInterrupt):
  """SIGTERM raised like Ctrl-C (so the same clean-up runs); `signum` says which."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


_SIGNALS_SEEN: list = []  # signals whose handler ran in this process (`check_signals`)


def raise_on_signals() -> None:
  """Makes SIGINT and SIGTERM raise `Signalled` in the main thread, and remembers them.

  Python raises a signal's exception wherever the main thread happens to be. If
  that is a finalizer or a callback from C (a `__del__`, a weakref callback),
  Python reports the exception as "ignored" and the run goes on as if no signal
  had come. So the handler also records the signal, the chunk loop calls
  `check_signals()` after every chunk's rows are written, and such an ignored
  report is not printed (the signal is raised again at that point).
  """

  def handler(signum, frame):
    _SIGNALS_SEEN.append(signum)
    raise Signalled(signum)

  signal.signal(signal.SIGINT, handler)
  signal.signal(signal.SIGTERM, handler)
  report = sys.unraisablehook

  def unraisable(info):
    if not isinstance(info.exc_value, Signalled):  # a lost signal: check_signals raises it
      report(info)

  sys.unraisablehook = unraisable


def check_signals() -> None:
  """Raises `Signalled` for a signal that came but whose exception never reached the loop."""
  if _SIGNALS_SEEN:
    raise Signalled(_SIGNALS_SEEN[-1])


def clear_signals() -> None:
  """Forgets the signals seen (once one is turned into `Interrupted`)."""
  _SIGNALS_SEEN.clear()


def exit_status(signum: int) -> int:
  """The shell's status for death by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
  return 128 + int(signum)
