"""Low-level file operations every run-folder writer shares.

Hashing, durable renames (fsync of the folder), atomic text writes, the
free-space and RAM preflight, and the named fault points of the run-folder
protocol (tests replace `FAULT_HOOK` to crash the process there).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from typing import Optional



_HASH_BLOCK = 16 << 20  # bytes per read when hashing a file back

def sha256_file(path: str) -> str:
  """The SHA-256 (hex) of a whole file, read in blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_HASH_BLOCK):
      h.update(block)
  return h.hexdigest()


def hash_range(fd: int, begin: int, end: int, path: str, *hashers) -> None:
  """Feeds bytes [begin, end) of an open file to every hasher, in blocks."""
  offset = begin
  while offset < end:
    block = os.pread(fd, min(_HASH_BLOCK, end - offset), offset)
    if not block:
      raise StoreError(f"{path} ended early at byte {offset:,}; the file is truncated, continue "
                       "its run with --resume or re-create it")
    for h in hashers:
      h.update(block)
    offset += len(block)


def fault_point(name: str) -> None:
  """A named instant of the run-folder protocol (between two writes).

  Fault-injection tests replace `FAULT_HOOK` to raise or to SIGKILL the
  process there; it is None otherwise and costs one global lookup.
  """
  if FAULT_HOOK is not None:
    FAULT_HOOK(name)


FAULT_HOOK = None


class StoreError(ValueError):
  """Bad storage input or state. The message is one line naming the file and the fix."""

def fsync_dir(directory: str) -> None:
  """Makes a rename in `directory` durable (POSIX; a no-op where dirs cannot be opened)."""
  try:
    fd = os.open(directory or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)

def atomic_write_bytes(path: str, data: bytes) -> None:
  """tmp file + fsync + os.replace: readers see the old file or the new one, never half."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  fsync_dir(os.path.dirname(path))


def atomic_write_text(path: str, text: str) -> None:
  """`atomic_write_bytes` of UTF-8 text."""
  atomic_write_bytes(path, text.encode("utf-8"))

# --- Preflight --------------------------------------------------------------


def fmt_bytes(n: float) -> str:
  """A byte count in the largest unit that keeps it >= 1 (e.g. 4.52 MB, 83.6 GB)."""
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(n) >= size:
      v = n / size
      return f"{v:,.{2 if v < 10 else 1 if v < 100 else 0}f} {unit}"
  return f"{int(n)} bytes"


def _mem_available() -> Optional[int]:
  """MemAvailable from /proc/meminfo in bytes, or None where there is none."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


BUDGET_ENV = "JAXDT_MEMORY_BUDGET"  # bytes a reader may allocate, e.g. "2G", "512M", "1000000"
BUDGET_FRACTION = 0.5  # of MemAvailable, when the variable is not set
BUDGET_FALLBACK = 4 << 30  # where /proc/meminfo says nothing
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_budget() -> int:
  """The bytes one reader may allocate from what a file declares (headers, shapes, rows).

  $JAXDT_MEMORY_BUDGET when set (an integer, optionally with K, M, G or T:
  powers of 1024), else half of MemAvailable, else 4 GiB. Readers check every
  size a file declares against it BEFORE allocating, so a lying header is
  refused in one line instead of exhausting the machine.

  Raises:
    StoreError: the variable is set to something else than a positive size.
  """
  text = os.environ.get(BUDGET_ENV, "").strip()
  if text:
    unit = text[-1].upper() if text[-1].upper() in _UNITS else ""
    number = text[:-1] if unit else text
    try:
      value = int(number) * _UNITS[unit]
    except ValueError:
      value = 0
    if value <= 0:
      raise StoreError(f"{BUDGET_ENV}={text[:40]!r} is not a size; set it to bytes, e.g. "
                       f"{BUDGET_ENV}=8G, or unset it")
    return value
  available = _mem_available()
  return int(available * BUDGET_FRACTION) if available else BUDGET_FALLBACK


def over_budget(path: str, what: str, needed: int, budget: int, fix: str) -> "StoreError":
  """The one-line refusal of an allocation a file asks for beyond the memory budget."""
  return StoreError(f"{path}: {what} needs {fmt_bytes(needed)}, more than the memory budget of "
                    f"{fmt_bytes(budget)} ({BUDGET_ENV}); {fix}")


def preflight(out_dir: str | os.PathLike, needed_bytes: int, needed_ram_bytes: int = 0,
              file_name: str = "the run's output") -> None:
  """Refuses to start a run that cannot fit on disk or in RAM.

  Args:
    out_dir: where the output goes (may not exist yet; its filesystem is checked).
    needed_bytes: disk bytes the run will write (`estimate_bytes` of its specs).
    needed_ram_bytes: host RAM the run needs (0 = skip the RAM check). Checked
      against MemAvailable from /proc/meminfo where that exists.
    file_name: the output named in the message, e.g. "crucible_1_trajectory.safetensors".

  Raises:
    StoreError: one line with the need, what is free, where, and the fix.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  probe = out_dir
  while not os.path.exists(probe):  # the nearest existing ancestor has the filesystem
    probe = os.path.dirname(probe)
  free = shutil.disk_usage(probe).free
  if needed_bytes > free:
    raise StoreError(f"not enough disk for {file_name}: need {fmt_bytes(needed_bytes)}, "
                     f"{fmt_bytes(free)} free in {out_dir}; pass --output_dir on a larger "
                     "disk or fewer --steps")
  available = _mem_available() if needed_ram_bytes > 0 else None
  if available is not None and needed_ram_bytes > available:
    raise StoreError(f"not enough RAM for {file_name}: need {fmt_bytes(needed_ram_bytes)}, "
                     f"{fmt_bytes(available)} available; pass a smaller --chunk_steps or "
                     "record fewer rows")


def check_fits(path: str, fix: str) -> None:
  """Refuses a path the file system of its (existing) folder cannot hold: a name over
  NAME_MAX bytes (e.g. a `.partial` name over 255) or a path of PATH_MAX bytes or more.

  Raises:
    StoreError: one line with the lengths and `fix`.
  """
  try:
    name_max = os.pathconf(os.path.dirname(path) or ".", "PC_NAME_MAX")
    path_max = os.pathconf(os.path.dirname(path) or ".", "PC_PATH_MAX")
  except (OSError, ValueError):
    name_max, path_max = 255, 4096
  name, whole = os.fsencode(os.path.basename(path)), os.fsencode(path)
  if len(name) > name_max or len(whole) >= path_max:
    shown = os.path.basename(path)
    shown = repr(shown) if len(shown) <= 60 else repr(shown[:57]) + "..."
    raise StoreError(f"{shown} in {os.path.dirname(path)[:200]} cannot be created: its name is "
                     f"{len(name)} bytes (the file system holds {name_max}) and its path "
                     f"{len(whole)} (it holds under {path_max}); {fix}")


def os_error_message(e: OSError, path: Optional[str] = None) -> str:
  """One line for an OS error during a run, with the fix."""
  where = e.filename or path or "the run folder"
  what = e.strerror or str(e)
  fix = {errno.ENOSPC: "free space (or move --output_dir to a larger disk), then continue "
                       "with --resume",
         errno.EDQUOT: "free quota, then continue with --resume",
         errno.EROFS: "the filesystem is read-only: choose a writable --output_dir",
         errno.EACCES: "no permission: choose a writable --output_dir",
         errno.EPERM: "no permission: choose a writable --output_dir",
         errno.ENOTDIR: "a path component is a file: choose another --output_dir",
         errno.EISDIR: "a folder stands where a file should be: choose another --output_dir",
         }.get(e.errno, "fix the cause, then continue with --resume")
  return f"{what}: {where}; {fix}"
