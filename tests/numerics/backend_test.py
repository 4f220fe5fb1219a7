"""backend: the host facts a run records, and giving freed heap back to the OS."""

import ctypes
import subprocess
import sys

import pytest

from jaxdt.numerics import backend

_CHILD = r"""
import ctypes, sys
from jaxdt.numerics import backend

def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(2000)]  # 128 MB on the heap (below mmap's threshold)
for b in blocks:
  ctypes.memset(b, 1, 64 << 10)  # touched: resident
keep = libc.malloc(64 << 10)  # above them all, so free() cannot shrink the heap's top
for b in blocks:
  libc.free(b)
before = rss()
backend.release_heap()
print(before - rss())
"""


def _has_malloc_trim() -> bool:
  try:
    ctypes.CDLL(None).malloc_trim  # pylint: disable=expression-not-assigned
    return True
  except (AttributeError, OSError):
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_malloc_trim(),
                    reason="glibc's malloc_trim only")
def test_release_heap_hands_freed_memory_back():
  """128 MB freed into glibc's heap stays resident until release_heap() returns it."""
  root = __file__.rsplit("/tests/", 1)[0]
  out = subprocess.run([sys.executable, "-c", _CHILD.format(root=root)], capture_output=True,
                       text=True, timeout=120, check=True)
  assert int(out.stdout.split()[-1]) > 100 << 20, out.stdout


def test_release_heap_is_harmless_without_malloc_trim(monkeypatch):
  monkeypatch.setattr(backend, "_malloc_trim", lambda: None)
  backend.release_heap()  # no C library hook: nothing to do, no error


def test_host_facts_are_computed_once_per_process():
  assert backend.cpu_flags() is backend.cpu_flags()
  assert backend.fma_contracts.cache_info().currsize <= 1
  backend.fma_contracts()
  hits = backend.fma_contracts.cache_info().hits
  backend.fma_contracts()
  assert backend.fma_contracts.cache_info().hits == hits + 1
