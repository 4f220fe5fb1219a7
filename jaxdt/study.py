"""A study: named runs that answer questions, run, resumed and summarized by one command.

`run.py --study=NAME` reads `experiments/NAME.py`'s `study()` (a `Study`), and for
each member in order: skips it when its summary (docs/findings/<member>.json) is
in and its folder, if still there, holds the same file (by SHA-256); summarizes a
finished folder; resumes an unfinished one; starts a missing one. jaxdt members
train in this process (`loop.train`); torch members run the lab's loop
(`python -m torchref.peer`) in a child process. Then it writes the tables and
PNGs from the committed summaries alone (`report.findings`), so a table can be
regenerated after the run folders are gone. `--study_plan` prints the members,
which are done, and the time left on this host.

A member folder that holds another config, or a file whose checksum does not
match its summary, is refused in one line (exit 2); a resume on another CPU
class is refused by the run itself (`io.hosts`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

from jaxdt import config as config_lib
from jaxdt.io import checkpoints
from jaxdt.io import configdiff
from jaxdt.io import metadata as metadata_lib
from jaxdt.report import findings as findings_lib

FREEZE_PROBES = ("freeze",)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Steps/s assumed for --study_plan before a member of that kind has finished on this
# CPU: round guesses, not measurements (the measured rates per CPU are in BUILD_NOTES §4).
DEFAULT_RATE = {"jax": 1.0, "torch": 0.3}


class StudyError(ValueError):
  """A refused study input or member folder; one line naming it and the fix."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a study: Crucible 1 at full size with these settings."""

  name: str
  framework: str  # "jax" | "torch" (the lab's loop, torchref.peer)
  seed: int = 42
  precision: str = "bf16"
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  data_seed: Optional[int] = None  # jax: the data order apart from the init
  gemm: str = "auto"  # torch: auto | native | f32 (torchref.peer --gemm)
  # torch: a twin of this jaxdt member (its init and its batches; torchref.peer --init_from,
  # --batches_from): same start, same data, only the framework differs.
  twin_of: Optional[str] = None
  # jax: config assignments (`--set path=value`) beyond the fields above, e.g. a model
  # arithmetic setting ("model.layernorm_backward=torch_cpu").
  sets: tuple = ()

  def __post_init__(self):
    if self.framework == "torch" and self.sets:
      raise ValueError(f"member {self.name}: sets are jaxdt config assignments; a torch "
                       "member takes none (declare a jax member)")

  def declared(self) -> dict:
    """The declaration a summary records: its fields, `sets` only when given (summaries
    written before the field existed stay current)."""
    out = dataclasses.asdict(self)
    sets = out.pop("sets")
    return {**out, "sets": list(sets)} if sets else out  # a list, as JSON gives it back


@dataclasses.dataclass(frozen=True)
class Table:
  """A table of the findings: groups of members, each a (label, member names)."""

  name: str
  title: str
  groups: tuple
  figures: tuple = ()  # its columns (report.findings.HEADS' keys); () = the freeze figures
  # A group's label: every other group's figures are checked against that group's min–max
  # ("is jaxdt inside the torch peer's seed range?"); "" = no such check.
  reference: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  members: tuple
  tables: tuple
  steps: int = 2000
  checkpoint_every: int = 250
  # `--set path=value` assignments applied to every member (tests shrink a study with them)
  overrides: tuple = ()
  # Steps at which the dead-set detector (`--detect`) scores each jaxdt member; checkpoints
  # are kept there too (step 0 is the init), so no replay is needed.
  detect_steps: tuple = ()
  # Where torch members run (torchref.peer --device; run.py --study_torch_device): "cpu", or
  # "cuda" on a lent GPU. Part of a torch member's identity and of its command line.
  torch_device: str = "cpu"

  def marks(self) -> tuple:
    every = range(self.checkpoint_every, self.steps, self.checkpoint_every)
    return tuple(sorted(set(every) | {s for s in self.detect_steps if 0 < s <= self.steps}))

  def member(self, name: str) -> Member:
    for m in self.members:
      if m.name == name:
        return m
    raise StudyError(f"study {self.name!r} has no member {name!r}; its members: "
                     f"{', '.join(m.name for m in self.members)}")


def load(name: str) -> Study:
  """The study declared in experiments/<name>.py (`study()`)."""
  import experiments  # pylint: disable=g-import-not-at-top
  if name not in experiments.STUDIES:
    raise StudyError(f"unknown study {name!r}; use --study=one of {list(experiments.STUDIES)}")
  return experiments.load_study(name)


# --- A member's config and command -------------------------------------------------------


def jax_config(study: Study, m: Member, data_dir: Optional[str] = None):
  """The ExperimentConfig of a jaxdt member (Crucible 1 with its settings)."""
  import experiments  # pylint: disable=g-import-not-at-top
  base = experiments.load("crucible1")
  cfg = dataclasses.replace(
      base, seed=m.seed, data_seed=m.data_seed, precision=m.precision,
      optim=dataclasses.replace(base.optim, learning_rate=m.learning_rate,
                                weight_decay=m.weight_decay),
      data=dataclasses.replace(base.data, data_dir=data_dir),
      probes=dataclasses.replace(base.probes, names=FREEZE_PROBES),
      store=dataclasses.replace(base.store, chunk_steps=50))
  for assignment in m.sets + study.overrides:
    cfg = config_lib.override(cfg, assignment)
  return config_lib.with_steps(cfg, study.steps, study.marks())


def command(study: Study, m: Member, folder: str) -> list:
  """The member's own command line (argv without the interpreter)."""
  sets = [a for o in study.overrides for a in ("--set", o)]
  if m.framework == "torch":
    source = os.path.join(os.path.dirname(folder), m.twin_of) if m.twin_of else None
    twin = [f"--init_from={source}", f"--batches_from={source}"] if source else []
    return ["-m", "torchref.peer", f"--output_dir={folder}", f"--seed={m.seed}",
            f"--steps={study.steps}", "--probes=freeze", f"--gemm={m.gemm}",
            f"--checkpoint_every={study.checkpoint_every}"] + twin + sets + (
                [f"--device={study.torch_device}"] if study.torch_device != "cpu" else [])
  args = ["run.py", "--experiment=crucible1", f"--steps={study.steps}", f"--seed={m.seed}",
          "--probes=freeze", "--chunk_steps=50",
          "--set", "store.checkpoint_steps=" + ",".join(map(str, study.marks()))]
  args += [f"--precision={m.precision}"] if m.precision != "bf16" else []
  args += [f"--learning_rate={m.learning_rate:g}"] if m.learning_rate != 1e-3 else []
  args += [f"--weight_decay={m.weight_decay:g}"] if m.weight_decay else []
  args += ["--set", f"data_seed={m.data_seed}"] if m.data_seed is not None else []
  args += [a for o in m.sets for a in ("--set", o)]
  return args + sets + [f"--output_dir={folder}", "--noprogress"]


# --- Where a member stands -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Status:
  member: Member
  folder: str
  state: str  # "done" | "finished" | "partial" | "missing"
  step: int  # steps done (the newest checkpoint of a partial run)
  summary: Optional[dict]


def _trajectory_name() -> str:
  import experiments  # pylint: disable=g-import-not-at-top
  return experiments.load("crucible1").store.trajectory_name


def _check_identity(study: Study, m: Member, folder: str, meta: dict) -> None:
  """Refuses a member folder that holds another run than the member declares."""
  recorded = meta.get("config")
  if not isinstance(recorded, dict):
    raise StudyError(f"member {m.name}: {folder} holds no jaxdt run config; move it away or "
                     "pass another --study_dir")
  if m.framework == "jax":
    wanted = config_lib.to_dict(jax_config(study, m))
    lines = configdiff.config_differences(recorded, wanted, labels=("the folder has",
                                                                    "the study says"))
  else:
    have = (meta.get("framework"), recorded.get("seed"), recorded.get("steps"),
            tuple((recorded.get("probes") or {}).get("names") or ()),
            meta.get("torch_gemm_requested"), meta.get("device", "cpu"))
    want = ("torch", m.seed, study.steps, FREEZE_PROBES, m.gemm, study.torch_device)
    lines = [f"{k}: the folder has {a!r}, the study says {b!r}"
             for k, a, b in zip(("framework", "seed", "steps", "probes", "gemm", "device"), have,
                                want) if a != b]
  if lines:
    raise StudyError(f"member {m.name}: {folder} holds another config ({lines[0]}); move it "
                     "away or pass another --study_dir")


def status(study: Study, study_dir: str, docs_dir: str, m: Member) -> Status:
  """Where member `m` stands (its folder checked against its declaration and summary)."""
  folder = os.path.join(study_dir, m.name)
  summary = findings_lib.read_member(docs_dir, m.name)
  if summary is not None and summary.get("declared") != m.declared():
    summary = None  # the declaration changed since: a stale summary
  if not os.path.isdir(folder) or not os.listdir(folder):
    return Status(m, folder, "done" if summary else "missing", study.steps if summary else 0,
                  summary)
  try:
    meta = metadata_lib.read_metadata(folder)
  except ValueError as e:
    raise StudyError(f"member {m.name}: {e}") from None
  _check_identity(study, m, folder, meta)
  if metadata_lib.is_complete(folder, _trajectory_name()):
    if summary is not None:
      findings_lib.check_checksum(summary, folder, meta)
      return Status(m, folder, "done", study.steps, summary)
    return Status(m, folder, "finished", study.steps, None)
  marks = checkpoints.intact_checkpoints(os.path.join(folder, "checkpoints"))
  return Status(m, folder, "partial", max((s for s, _ in marks), default=0), None)


# --- Running ---------------------------------------------------------------------------------


def _run_jax(study: Study, st: Status, data_dir, log) -> None:
  from jaxdt.training import loop  # pylint: disable=g-import-not-at-top
  cfg = jax_config(study, st.member, data_dir)
  loop.train(cfg, st.folder, resume=st.state == "partial", progress=False, log=log)


def _run_torch(study: Study, st: Status, data_dir, log) -> None:
  source = st.member.twin_of
  if source and not metadata_lib.is_complete(os.path.join(os.path.dirname(st.folder), source),
                                             _trajectory_name()):
    raise StudyError(f"member {st.member.name} is the twin of {source}, which has not finished "
                     f"in {os.path.dirname(st.folder)}; run --study_members={source} first")
  argv = [sys.executable] + command(study, st.member, st.folder)
  argv += [f"--data_dir={data_dir}"] if data_dir else []
  argv += ["--resume"] if st.state == "partial" else []
  log(f"{st.member.name}: {' '.join(argv[1:])}")
  done = subprocess.run(argv, cwd=ROOT, check=False)
  if done.returncode:
    raise StudyError(f"member {st.member.name}: the torch peer exited with status "
                     f"{done.returncode} (its message is above); fix that and rerun --study "
                     "(the member resumes from its newest checkpoint)")


def _run_jax_group(study: Study, group: Sequence[Status], data_dir, log) -> None:
  """Fresh jaxdt members of one structure as one exact sweep Run (`loop.train_members`):
  one process, one compiled program, each member byte-identical to its solo run."""
  from jaxdt.training import loop  # pylint: disable=g-import-not-at-top
  from jaxdt.training import runs  # pylint: disable=g-import-not-at-top
  specs = [runs.MemberSpec(jax_config(study, st.member, data_dir), st.folder, st.member.name,
                           {"study": study.name}) for st in group]
  loop.train_members(specs, runs.Options(progress=False, exact=True), log=log)


def _batches(study: Study, states: Sequence[Status], sweep: bool, data_dir) -> list:
  """The order members run in: one at a time, or with `sweep` the fresh jaxdt members of one
  structure (`sweep.group_key`) together at the first one's place."""
  if not sweep:
    return [[st] for st in states]
  from jaxdt.training import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  key = lambda st: sweep_lib.group_key(jax_config(study, st.member, data_dir))
  out, placed = [], {}
  for st in states:
    if st.member.framework == "jax" and st.state == "missing":
      if key(st) in placed:
        placed[key(st)].append(st)
        continue
      placed[key(st)] = [st]
      out.append(placed[key(st)])
    else:
      out.append([st])
  return out


def _detected(study: Study, m: Member, folder: str, log) -> dict:
  """The detector's scores at the study's detect steps, and the state's bytes per parameter,
  for a finished jaxdt member ({} for torch members or a study without detect steps)."""
  if m.framework != "jax" or not study.detect_steps:
    return {}
  from jaxdt import detection  # pylint: disable=g-import-not-at-top
  steps = tuple(sorted({s for s in study.detect_steps if s <= study.steps} | {study.steps}))
  found = detection.scores(folder, steps, log=lambda line: log(f"{m.name}: {line}"))
  return {"detect": found, "state_bytes_per_param": found[-1]["state_bytes_per_param"],
          "detect_recall_last": found[-1]["recall"]}


def _copy_moved(study: Study, m: Member, folder: str, log) -> dict:
  """Did the dead rows' bf16 copy change between the study's last two checkpoints
  (`detection.copy_motion`)? Read, like the detector's scores, from the weights of a
  study with detect steps; {} for torch members or a study without."""
  if m.framework != "jax" or not study.detect_steps:
    return {}
  from jaxdt import detection  # pylint: disable=g-import-not-at-top
  window = (max((k for k in study.marks() if k < study.steps), default=0), study.steps)
  moved = detection.copy_motion(folder, *window, log=lambda line: log(f"{m.name}: {line}"))
  log(f"{m.name}: bf16 copy moved over steps {window[0]}..{window[1]}: "
      f"{moved.rows_moved:.3f} of the dead rows, {moved.elements_moved:.4f} of their elements")
  return {"copy_window": list(window), "copy_rows_moved": moved.rows_moved,
          "copy_elements_moved": moved.elements_moved}


def _summarize(study: Study, st: Status, docs_dir: str, log) -> None:
  line = " ".join(["python"] + command(study, st.member, st.folder))
  summary = findings_lib.summarize_member(study, st.member, st.folder, line)
  summary.update(_detected(study, st.member, st.folder, log))
  summary.update(_copy_moved(study, st.member, st.folder, log))
  findings_lib.write_member(docs_dir, summary)
  log(f"{st.member.name}: summary written to "
      f"{findings_lib.member_path(docs_dir, st.member.name)}")


def _add_missing(study: Study, st: Status, docs_dir: str, log) -> None:
  """A done member summarized by older code: what its summary lacks is added from its
  folder (the detector's scores and the bf16 copy's motion for a jaxdt member, the per-step
  mean ‖ΔW′‖₂ for any)."""
  if not metadata_lib.is_complete(st.folder, _trajectory_name()):
    return
  summary, added = st.summary, []
  if "dwp_l2_mean" not in summary:
    summary, added = findings_lib.add_dwp_series(summary, st.folder), ["per-step mean ‖ΔW′‖₂"]
  for key, read, what in (("detect", _detected, "detector scores"),
                          ("copy_rows_moved", _copy_moved, "bf16 copy motion")):
    if key not in summary and (got := read(study, st.member, st.folder, log)):
      summary = {**summary, **got}  # {} from a member or study these do not apply to
      added.append(what)
  if added:
    findings_lib.write_member(docs_dir, summary)
    log(f"{st.member.name}: {' and '.join(added)} added to "
        f"{findings_lib.member_path(docs_dir, st.member.name)}")


def run(study: Study, study_dir: str, docs_dir: str, *, only: tuple = (),
        data_dir: Optional[str] = None, sweep: bool = False,
        log: Callable[[str], None] = print) -> list:
  """Runs what is missing of `study` (or of the members `only`), then writes the tables.

  `sweep`: fresh jaxdt members of one structure run together as an exact sweep (each
  member's bytes are its solo run's; `--sweep_mode=fast` would give other bits, so a
  study never vmaps its members).
  """
  chosen = [study.member(n) for n in only] if only else list(study.members)
  states = [status(study, study_dir, docs_dir, m) for m in chosen]  # refuse before any work
  for batch in _batches(study, states, sweep, data_dir):
    st = batch[0]
    if st.state == "done":
      log(f"{st.member.name}: done (summary {findings_lib.member_path(docs_dir, st.member.name)})")
      _add_missing(study, st, docs_dir, log)
      continue
    if len(batch) > 1:
      log(f"{', '.join(b.member.name for b in batch)}: starting as one exact sweep")
      _run_jax_group(study, batch, data_dir, log)
    elif st.state != "finished":
      log(f"{st.member.name}: "
          f"{'resuming from step ' + str(st.step) if st.state == 'partial' else 'starting'}")
      (_run_torch if st.member.framework == "torch" else _run_jax)(study, st, data_dir, log)
    for b in batch:
      _summarize(study, b, docs_dir, log)
  return findings_lib.write_tables(study, docs_dir, log=log)


def plan(study: Study, study_dir: str, docs_dir: str) -> str:
  """--study_plan: every member, its state, and the estimated time left on this host."""
  from jaxdt.numerics import backend  # pylint: disable=g-import-not-at-top
  cpu = backend.cpu_description().get("cpu_model")
  states = [status(study, study_dir, docs_dir, m) for m in study.members]
  rates = findings_lib.measured_rates(docs_dir, cpu)
  lines, left = [f"study {study.name}: {len(study.members)} members, {study.steps} steps each; "
                 f"folders in {os.path.abspath(study_dir)}, summaries in {docs_dir}"], 0.0
  for st in states:
    rate = rates.get(st.member.framework) or DEFAULT_RATE[st.member.framework]
    secs = 0.0 if st.state in ("done", "finished") else (study.steps - st.step) / rate
    left += secs
    what = {"done": "done", "finished": "finished, to summarize", "missing": "not started",
            "partial": f"unfinished at step {st.step}"}[st.state]
    lines.append(f"  {st.member.name:<16} {st.member.framework:<5} {what:<26}"
                 + (f" ~{secs / 60:.0f} min at {rate:.2f} steps/s" if secs else ""))
  n_done = sum(st.state == "done" for st in states)
  source = "measured here" if rates else "assumed (no member finished on this CPU yet)"
  lines.append(f"{n_done}/{len(states)} done; about {left / 3600:.1f} h left on this host "
               f"({cpu}; rates {source})")
  return "\n".join(lines)
