"""Per-op profile of one experiment's jitted step: op, ms/step, GFLOP/s, share of the step.

    python benchmarks/profile_step.py [--experiment=crucible1] [--steps=4]
        [--gemm_operands=auto|float32|bfloat16] [--set data.batch_size=16 ...] [--top=30]

Compiles the experiment's chunk of `--steps` steps (the training step as
`jaxdt.training.loop` runs it: all probes on), runs it twice, then records a
third run with the JAX profiler and reads the trace (XSpace protobuf, decoded
here, no TensorFlow needed) next to the compiled HLO: each XLA:CPU thunk's
time, its FLOPs (from the dot shapes in its HLO), achieved GFLOP/s and share.
Eigen's dots run asynchronously; their time is the span from launch to their
"end:" event (it can overlap other thunks). Prints the CPU model and features
first, as every figure here depends on them.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))

from jaxdt.numerics import backend  # noqa: E402  pylint: disable=g-import-not-at-top

backend.configure()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top

import experiments  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt import config as config_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt.data import corpus as corpus_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt.training import layout as layout_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt.training import initial  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt.training import step as step_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdt.training import runs  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "crucible1", "experiment whose step is profiled")
flags.DEFINE_integer("steps", 4, "steps per profiled chunk")
flags.DEFINE_enum("gemm_operands", "auto", list(config_lib.GEMM_OPERANDS),
                  "the run's model.gemm_operands")
flags.DEFINE_multi_string("set", None, "config overrides, as run.py's --set")
flags.DEFINE_string("data_dir", None, "the embedded default data's cache folder")
flags.DEFINE_integer("top", 30, "ops listed")
flags.DEFINE_string("trace_dir", None, "keep the trace here (default: a temporary folder)")


# --- XSpace (tsl/profiler/protobuf/xplane.proto), decoded from the wire format -------


def _varint(b: bytes, i: int) -> tuple[int, int]:
  r = s = 0
  while True:
    c = b[i]
    i += 1
    r |= (c & 0x7F) << s
    s += 7
    if c < 0x80:
      return r, i


def _fields(b: bytes):
  """(field number, value) of one protobuf message; length-delimited values as bytes."""
  i = 0
  while i < len(b):
    key, i = _varint(b, i)
    wire = key & 7
    if wire == 0:
      v, i = _varint(b, i)
    elif wire == 1:
      v, i = int.from_bytes(b[i:i + 8], "little"), i + 8
    elif wire == 2:
      n, i = _varint(b, i)
      v, i = b[i:i + n], i + n
    elif wire == 5:
      v, i = int.from_bytes(b[i:i + 4], "little"), i + 4
    else:
      raise ValueError(f"protobuf wire type {wire}")
    yield key >> 3, v


def thunk_events(path: str):
  """(thread, event name, offset ps, duration ps) of every event on the XLA threads."""
  for f, plane in _fields(open(path, "rb").read()):
    if f != 1:
      continue
    names, lines = {}, []
    for pf, v in _fields(plane):
      if pf == 3:
        lines.append(v)
      elif pf == 4:  # map<int64, XEventMetadata>: key 1, value 2 (name 2)
        entry = dict(_fields(v))
        names[entry.get(1, 0)] = dict(_fields(entry.get(2, b""))).get(2, b"").decode(
            errors="replace")
    for line in lines:
      fields = list(_fields(line))
      thread = next((v.decode(errors="replace") for k, v in fields if k == 2), "")
      if not thread.startswith("tf_XLA"):
        continue
      for k, ev in fields:
        if k == 4:
          e = dict(_fields(ev))
          yield thread, names.get(e.get(1, 0), "?"), e.get(2, 0), e.get(3, 0)


# --- FLOPs from the compiled HLO -------------------------------------------------------


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def hlo_index(hlo: str) -> tuple[dict, dict]:
  """{instruction: (shape, opcode, rest of line)}, {computation: body}."""
  inst = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in re.finditer(
      r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", hlo, re.M)}
  comps = {m.group(1): m.group(2) for m in re.finditer(
      r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
  return inst, comps


def flops(name: str, inst: dict, comps: dict) -> int:
  """2 x output elements x contracted size, summed over the dots an instruction runs."""
  if name not in inst:
    return 0
  shape, op, rest = inst[name]
  called = re.search(r"calls=%([\w.\-]+)", rest)
  body = comps.get(called.group(1), "") if op == "fusion" and called else \
      f"%{name} = {shape} {op}({rest}"
  shapes = dict(re.findall(r"%([\w.\-]+) = (\S+) ", body))
  total = 0
  for m in re.finditer(r"= (\S+) dot\(([^)]*)\)(.*)", body):
    out = 1
    for d in _dims(m.group(1)):
      out *= d
    lhs = re.findall(r"%([\w.\-]+)", m.group(2))[0]
    lhs_shape = shapes.get(lhs) or (inst[lhs][0] if lhs in inst else "")
    if not lhs_shape:
      typed = re.search(r"(\w+\[[\d,]*\])\S* %" + re.escape(lhs), m.group(2))
      lhs_shape = typed.group(1) if typed else ""
    k, contracting = 1, re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(3))
    dims = _dims(lhs_shape)
    for i in (contracting.group(1).split(",") if contracting else []):
      if i and int(i) < len(dims):
        k *= dims[int(i)]
    total += 2 * out * k
  return total


# --- The run ------------------------------------------------------------------------------


def cpu_line() -> str:
  model = "?"
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
  except OSError:
    pass
  have = backend.cpu_flags()
  isa = " ".join(f"{k}={'yes' if k in have else 'no'}"
                 for k in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"))
  return f"machine: {model}, {os.cpu_count()} CPUs, {isa}"


def profile(cfg: config_lib.ExperimentConfig, k: int, trace_dir: str) -> tuple[float, str, str]:
  """(steady ms/step, xplane path, compiled HLO) of a k-step chunk of cfg's step."""
  corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size)
  lay = layout_lib.layout(cfg, corpus)
  state = initial.init_state(cfg, lay.dims)
  # The run's own compiled program (runs.program -> step.make_chunk), one member.
  devs = jax.devices()[:1]
  dispatch, sharding = runs.program([cfg], corpus.tokens, lay.rows, devs)
  state = runs.stacked([state], sharding)
  t = time.perf_counter()
  state, out = dispatch(state, 0, k)
  jax.block_until_ready(out)
  print(f"compile + first chunk: {time.perf_counter() - t:.1f} s", flush=True)
  t = time.perf_counter()
  state, out = dispatch(state, k, k)
  jax.block_until_ready(out)
  ms = (time.perf_counter() - t) / k * 1e3
  chunk = step_lib.make_chunk(cfg, corpus.tokens, lay.rows, sharding.mesh)
  data = jax.device_put(jax.tree.map(lambda x: np.asarray(x)[None],
                                      initial.member_data(cfg)), sharding)
  hlo = chunk.lower(state, data, jnp.int32(0), k).compile().as_text()
  jax.profiler.start_trace(trace_dir)
  state, out = dispatch(state, 2 * k, k)
  jax.block_until_ready(out)
  jax.profiler.stop_trace()
  return ms, sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1], hlo


def table(xplane: str, hlo: str, k: int, top: int) -> list[str]:
  inst, comps = hlo_index(hlo)
  busy, calls, starts = collections.Counter(), collections.Counter(), {}
  wall = 0
  for thread, name, off, dur in thunk_events(xplane):
    if name.startswith("ThunkExecutor::Execute (wait"):
      wall = max(wall, dur)
    if name.startswith("end: "):  # an Eigen dot runs after its launch returns: add the span
      begin = starts.pop(name[5:], None)
      if begin is not None and inst.get(name[5:], ("", ""))[1] == "dot":
        busy[name[5:]] += off + dur - begin[0] - begin[1]
      continue
    if (name.startswith(("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool"))
        or inst.get(name, ("", ""))[1] in ("while", "call", "conditional")):  # containers
      continue
    busy[name] += dur
    calls[name] += 1
    starts[name] = (off, dur)
  total = sum(busy.values())
  lines = [f"traced chunk: {wall / 1e9 / k:.1f} ms/step wall; ops {total / 1e9 / k:.1f} ms/step "
           "summed over the threads",
           f"{'op':<40} {'ms/step':>8} {'calls':>6} {'GFLOP/s':>8} {'share':>6}  shape, source op"]
  kinds = collections.Counter()
  for name, ps in busy.most_common():
    fl = flops(name, inst, comps) * calls[name] / k
    kinds["GEMM" if fl else "other"] += ps
    if len(lines) - 2 >= top:
      continue
    ms = ps / 1e9 / k
    shape, op, rest = inst.get(name, ("", "", ""))
    src = re.search(r'op_name="([^"]*)"', rest)
    what = f"{shape} {src.group(1).split('/')[-1] if src else op}"
    lines.append(f"{name[:40]:<40} {ms:8.2f} {calls[name] // k:6d} "
                 f"{fl / ms / 1e6 if fl else 0:8.1f} {ps / total:6.1%}  {what[:60]}")
  lines.append(f"GEMMs {kinds['GEMM'] / total:.0%} of the op time, everything else "
               f"{kinds['other'] / total:.0%}")
  return lines


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; see --helpfull", file=sys.stderr)
    sys.exit(2)
  cfg = experiments.load(FLAGS.experiment)
  cfg = config_lib.set_path(cfg, "model.gemm_operands", FLAGS.gemm_operands)
  if FLAGS.data_dir:
    cfg = config_lib.set_path(cfg, "data.data_dir", FLAGS.data_dir)
  for assignment in FLAGS.set or ():
    cfg = config_lib.override(cfg, assignment)
  backend.quiet_backend_probe()
  print(cpu_line())
  print(f"{FLAGS.experiment}: vocab {cfg.model.vocab_size}, hidden {cfg.model.hidden_dim}, "
        f"batch {cfg.data.batch_size}, seq {cfg.data.seq_len}; GEMMs "
        f"{backend.gemm_path(cfg.model.gemm_operands)}; {backend.cpu_threads()} threads",
        flush=True)
  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="jaxdt-profile-")
  ms, xplane, hlo = profile(cfg, FLAGS.steps, trace_dir)
  print(f"steady (untraced) chunk: {ms:.1f} ms/step = {1e3 / ms:.3f} steps/s")
  for line in table(xplane, hlo, FLAGS.steps, FLAGS.top):
    print(line)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
