"""Backend settings in one place: XLA determinism flags, set before JAX starts.

XLA reads `XLA_FLAGS` once, when the first backend is created (the first
computation or `jax.devices()` call), not when `jax` is imported. Importing
`jaxdt` calls `configure()` when no backend exists yet (so library use gets
the same arithmetic as `run.py`, which calls it again at the top of `main`).

What the flags do (docs/adamw.md §Determinism; help texts of jaxlib 0.10.2):
  --xla_gpu_deterministic_ops=true            "Guarantees run-to-run determinism
                                              on GPU" (scatter, reductions,
                                              GEMM/conv algorithms).
  --xla_gpu_exclude_nondeterministic_ops=true switches scatter, GEMMs,
                                              convolutions and attention to
                                              deterministic kernels (a subset
                                              of the flag above).
Both are accepted and ignored by XLA:CPU, so one setting serves every backend.
  --xla_allow_excess_precision=false          every bf16 rounding the program
                                              asks for happens: with XLA's
                                              default (true) the simplifier
                                              drops an f32 -> bf16 -> f32
                                              convert pair and hands on the
                                              unrounded f32 value (measured: the
                                              optimizer then read the embedding
                                              gradient unrounded, where torch's
                                              `.grad` is bf16; BUILD_NOTES).

Flags reported but left at XLA's defaults (changing them changes our bits):
  xla_cpu_ftz=true            XLA:CPU flushes f32 subnormals (docs/adamw.md).
  xla_gpu_ftz=false           XLA:GPU keeps them.
  xla_cpu_enable_fast_math=false
  xla_cpu_enable_platform_dependent_math=true   transcendental kernels may
                              differ between CPU instruction sets.
FMA contraction has no XLA flag: XLA:CPU contracts `a*b + c` under jit, and
`fma_contracts()` measures it on the live backend (the optimizer's lerp and
addcmul need it). CPU results also depend on the number of cores XLA:CPU uses
(docs/adamw.md §Determinism: `taskset -c 0` changed the bits), so `cpu_threads()` is recorded.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping, MutableMapping, Optional

DETERMINISM_FLAGS = {
    "xla_gpu_deterministic_ops": "true",
    "xla_gpu_exclude_nondeterministic_ops": "true",
    "xla_allow_excess_precision": "false",
}
# Flags that bear on the bits, with XLA's defaults in jaxlib 0.10.2.
REPORTED_DEFAULTS = {
    "xla_gpu_deterministic_ops": "false",
    "xla_gpu_exclude_nondeterministic_ops": "false",
    "xla_cpu_ftz": "true",
    "xla_gpu_ftz": "false",
    "xla_cpu_enable_fast_math": "false",
    "xla_cpu_enable_platform_dependent_math": "true",
    "xla_allow_excess_precision": "true",
}


def parse_xla_flags(text: Optional[str]) -> dict:
  """`XLA_FLAGS` text as {name: value}; a bare `--name` means "true".

  Args:
    text: e.g. "--xla_cpu_ftz=false --xla_gpu_deterministic_ops".

  Returns:
    dict name (without dashes) -> value string; later repeats win.
  """
  out = {}
  for token in (text or "").split():
    name, _, value = token.lstrip("-").partition("=")
    if name:
      out[name] = value if _ else "true"
  return out


def with_flags(text: Optional[str], flags: Mapping[str, str]) -> str:
  """`text` with each of `flags` appended unless it already sets that flag.

  A value the user already gave always wins, so `XLA_FLAGS=--xla_gpu_deterministic_ops=false`
  turns determinism off for an experiment.
  """
  present = parse_xla_flags(text)
  extra = [f"--{k}={v}" for k, v in flags.items() if k not in present]
  return " ".join(t for t in [(text or "").strip()] + extra if t)


def backends_initialized() -> bool:
  """Whether JAX has already created a backend (after which XLA_FLAGS is ignored)."""
  try:
    from jax._src import xla_bridge  # no public API says this
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def configure(deterministic: bool = True,
              environ: Optional[MutableMapping[str, str]] = None) -> str:
  """Sets `XLA_FLAGS` for reproducible runs; call before any JAX computation.

  Args:
    deterministic: add `DETERMINISM_FLAGS` (flags the user set keep their value).
    environ: the environment to edit (default os.environ).

  Returns:
    The XLA_FLAGS now in effect.

  Raises:
    RuntimeError: a JAX backend already exists, so new flags would be ignored.
  """
  environ = os.environ if environ is None else environ
  text = environ.get("XLA_FLAGS", "")
  new = with_flags(text, DETERMINISM_FLAGS) if deterministic else text
  if new != text:
    if environ is os.environ and backends_initialized():
      raise RuntimeError("backend.configure() ran after JAX created its backend, so XLA_FLAGS "
                         "would be ignored; call it before any JAX computation")
    environ["XLA_FLAGS"] = new
  return new


def effective_flags(text: Optional[str] = None) -> dict:
  """The bit-relevant flags in effect: {name: (value, "set" | "default")}.

  Args:
    text: an XLA_FLAGS string (default: the current environment's).
  """
  given = parse_xla_flags(os.environ.get("XLA_FLAGS", "") if text is None else text)
  return {k: (given[k], "set") if k in given else (d, "default")
          for k, d in REPORTED_DEFAULTS.items()}


def cpu_threads() -> int:
  """CPU cores this process may run on (what XLA:CPU sizes its thread pool by)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def describe() -> dict:
  """The backend a run uses, for metadata and reports (creates the backend).

  Returns:
    dict: backend, device_kind, device_count, cpu_threads, xla_flags (raw
    text), flags (`effective_flags`), fma_contracts, jax_version, cpu_model,
    cpu_features (`cpu_description`).
  """
  import jax
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "cpu_threads": cpu_threads(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "flags": {k: v for k, (v, _) in effective_flags().items()},
      "fma_contracts": fma_contracts(), "jax_version": jax.__version__,
      **cpu_description(),
  }


def format_description(d: Mapping) -> str:
  """One line per fact of `describe()`, for printing."""
  flags = " ".join(f"{k}={v}" for k, v in d["flags"].items())
  return "\n".join([
      f"Backend: {d['backend']} ({d['device_kind']}, {d['device_count']} device(s)), "
      f"{d['cpu_threads']} CPU threads, jax {d['jax_version']}",
      f"XLA_FLAGS: {d['xla_flags'] or '(empty)'}",
      f"Bit-relevant flags: {flags}",
      f"a*b+c contracted to FMA under jit: {d['fma_contracts']}",
  ])


def quiet_backend_probe() -> None:
  """Silences JAX's INFO line for every platform it fails to load ("Unable to
  initialize backend 'tpu' ... libtpu.so"), which absl's handler would print."""
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


@functools.cache
def fma_contracts() -> bool:
  """True if `a * b + c` is fused into an FMA under jit on the default backend.

  Probed once per process (a jit compile; the backend cannot change under it).

  torch's lerp_ and addcmul_ are FMAs; without contraction `adamw` is not
  bit-exact (docs/adamw.md, rule 2).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = b = np.float32(1 + 2.0**-12)
  c = np.float32(-(1 + 2.0**-11))
  # a·b = 1 + 2^-11 + 2^-24 exactly; rounded to f32 first it is a tie that goes
  # to 1 + 2^-11, so a·b + c = 0, whereas an FMA gives 2^-24.
  out = jax.jit(lambda x, y, z: x * y + z)(a, b, c)
  return float(out) == 2.0**-24


# CPU features with bf16 GEMM units (AVX512_BF16: vdpbf16ps; AMX: tile dot products).
BF16_GEMM_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
  """The CPU's feature flags as the kernel reports them ("flags" on x86, "Features" on
  aarch64; empty where unknown; read once)."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


# The CPU features that decide which kernels (and so which summation orders) a host runs.
ARITHMETIC_FEATURES = frozenset({
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
    "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm"})


@functools.cache
def cpu_model(path: str = "/proc/cpuinfo") -> str:
  """The CPU's model name as the kernel reports it (else the machine type)."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        key = line.split(":", 1)[0].strip().lower()
        if key in ("model name", "hardware", "cpu model") and ":" in line:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine() or "unknown"


def cpu_description() -> dict:
  """{cpu_model, cpu_features}: the host's CPU and its arithmetic-relevant features."""
  return {"cpu_model": cpu_model(), "cpu_features": sorted(cpu_flags() & ARITHMETIC_FEATURES)}


def gemm_operands(flags: Optional[frozenset] = None) -> str:
  """The GEMM operand dtype for bf16 values on the default backend: "bfloat16" or "float32".

  On CPU it follows the measured capability, the CPU's own feature flags: bf16
  operands only where the CPU has bf16 dot-product units (AVX512_BF16 or AMX);
  without them XLA:CPU's bf16 GEMMs run slower than its f32 ones (BUILD_NOTES,
  "Speed"). Accelerators (GPU, TPU) keep bf16. The choice is a pure
  function of the host, so every run on one machine takes the same path.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return "bfloat16"
  flags = cpu_flags() if flags is None else flags
  return "bfloat16" if flags & BF16_GEMM_FEATURES else "float32"


def gemm_path(setting: str = "auto") -> str:
  """What metadata records as `gemm_path`: the resolved operand dtype and why."""
  import jax  # pylint: disable=g-import-not-at-top
  if setting != "auto":
    return f"{setting} operands (forced)"
  chosen = gemm_operands()
  if jax.default_backend() != "cpu":
    return f"{chosen} operands ({jax.default_backend()})"
  have = sorted(cpu_flags() & BF16_GEMM_FEATURES)
  return f"{chosen} operands (cpu: {', '.join(have) if have else 'no avx512_bf16/amx_bf16'})"


@functools.cache
def _malloc_trim():
  """glibc's malloc_trim, or None (another C library)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    return ctypes.CDLL(None).malloc_trim
  except (AttributeError, OSError):
    return None


def release_heap() -> None:
  """Hands the C heap's free pages back to the OS (glibc `malloc_trim`; elsewhere a no-op).

  glibc keeps what a process frees for its next allocations, and the big frees
  of a run come once: tokenizing the corpus and XLA compiling the chunk free
  memory that would then count in the run's RSS to its end (BUILD_NOTES,
  "Speed"). Values are
  untouched; it costs a walk of the free lists, so the loop calls it between
  phases and once per chunk, never per step.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)
