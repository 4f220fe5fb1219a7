"""What a benchmark child reports about its own process (Linux): RSS, peak RSS, CPU time,
context switches. Shared by torch_crucible1.py and jax_crucible1.py, run as scripts from
this folder."""

import os
import resource


def rss_bytes() -> int:
  """Current resident set size (VmRSS) of this process."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def context_switches() -> tuple:
  """(voluntary, involuntary) context switches and minor page faults of this process so far."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_nvcsw, r.ru_nivcsw, r.ru_minflt
