"""Who holds a run folder: flock(2) on the folder itself, and the holder's pid from /proc/locks."""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from jaxdt.io import disk


def holder_of(fd: int) -> Optional[int]:
  """The pid holding an flock on the file behind `fd` (Linux /proc/locks), or None."""
  st = os.fstat(fd)
  ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
  try:
    with open("/proc/locks", encoding="ascii") as f:
      for line in f:
        parts = line.split()
        if "FLOCK" in parts and len(parts) > 5 and parts[5] == ident:
          return int(parts[4])
  except (OSError, ValueError):
    pass
  return None


def holder_text(fd: int) -> str:
  """"pid N" of the lock's holder, or "another process" where /proc/locks does not say."""
  holder = holder_of(fd)
  return f"pid {holder}" if holder is not None else "another process"


def writer_of(path: str) -> Optional[str]:
  """Who writes the run folder `path` now ("pid N" or "another process"), or None.

  Takes and drops a shared lock, which a running writer's exclusive lock refuses.
  """
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return holder_text(fd)
  finally:
    os.close(fd)
  return None


def unfinished_advice(folder: str) -> str:
  """What to do with an unfinished run: wait for its writer, or resume it."""
  who = writer_of(folder)
  return (f"it is still running ({who}); wait for it to finish" if who else
          "continue it with --resume first")


def lock_exclusive(fd: int, path: str) -> None:
  """Takes the exclusive lock of the open folder `fd`, or refuses with its holder's pid.

  Raises:
    StoreError: another process holds the lock (one line: who, and what to do).
  """
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise disk.StoreError(f"{path} is in use by {holder_text(fd)} (another jaxdt run writes "
                          "there); wait for it to end or choose another --output_dir") from None
