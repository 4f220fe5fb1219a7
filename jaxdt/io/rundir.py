"""The run folder: one object that owns its whole protocol.

Nothing but `RunDir` writes a run folder; readers open results through
`open_result`. Layout of `<run>/`:

  metadata.json              the lab's keys and ours (config, data hashes,
                             backend); written first with "completed": false,
                             rewritten at the end with the checksums
  <trajectory>.partial       rows streamed in place while the run is unfinished
  <trajectory>               the finished file; this name appears only at the
                             commit point
  checkpoints/step_NNNNNN/   arrays.safetensors, then meta.json (the marker)

Invariants (each one is tested, tests/io/rundir_test.py and tests/io/faults_test.py):
  1. One writer. The folder itself is locked (`flock`, exclusive) for the
     run's whole life; a second process is refused with the holder's pid. The
     kernel drops the lock when its process dies, however it dies.
  2. Refuse before touching. Inputs are validated by the caller before a
     RunDir exists; `begin` inspects the folder and refuses another
     experiment's run, a finished run, a changed config, or files it cannot
     account for, before it writes a byte.
  3. Rows before checkpoints. The checkpoint of step s becomes visible (its
     marker is written last, by atomic rename) only after trajectory rows
     0..s are written and fsync'd. The marker records the SHA-256 of those
     rows of every tensor and of the checkpoint's own arrays.
  4. One commit point. `commit` seals the file (fsync, read back, checksums),
     writes metadata.json with "completed": true and the checksums, then
     renames `.partial` to the final name: that rename is the commit. Before
     it the run is unfinished and resumable; after it, finished, and its
     metadata says so. A kill at any instant leaves one or the other.
  5. Resume is a replay. `--resume` accepts only the run's own config (every
     field but the chunk size and the input paths, whose contents are checked
     by hash instead) and restarts from the newest checkpoint whose arrays and
     trajectory prefix match their recorded SHA-256; rows after it are
     rewritten with the same bytes. With no such checkpoint it restarts from
     step 0 and says so.
  6. Unfinished is never a result. `open_result` refuses `.partial` files and
     runs whose metadata says unfinished, and hands back a reader that checks
     every tensor's recorded SHA-256 in the pass the caller makes anyway
     (`reader.verify()` at its end).

`disk.FAULT_HOOK` is called at each named instant between two writes of this
protocol (`disk.fault_point`); the fault-injection tests raise or SIGKILL
there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional

import numpy as np

from jaxdt import config as config_lib
from jaxdt.io import checkpoints
from jaxdt.io import disk
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import tensorfile

CHECKPOINT_DIR = "checkpoints"
METADATA_FILE = metadata_lib.METADATA_FILE
# Disk kept free for metadata.json rewrites and checkpoint markers.
METADATA_BUDGET_BYTES = 1 << 20
# Config fields a resume may change: they change no result (the chunk size) or
# name inputs whose contents are checked by hash instead (the paths).
RESUMABLE_FIELDS = frozenset({
    "store.chunk_steps", "data.data_dir", "data.corpus_path", "data.tokenizer_path",
    "data.dead_mask_path", "init_checkpoint"})


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


# --- Config comparison -----------------------------------------------------------


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _show(v: Any) -> str:
  return json.dumps(v) if not isinstance(v, float) else repr(v)


def config_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any],
                       ignore=RESUMABLE_FIELDS,
                       labels: tuple = ("the run has", "the flags say")) -> list[str]:
  """One line per field where two config dicts (`config.to_dict`) differ.

  Returns:
    e.g. ["optim.learning_rate: the run has 0.0003, the flags say 0.01"].
  """
  a, b = _flatten(recorded), _flatten(wanted)
  defaults = _flatten(config_lib.to_dict(config_lib.ExperimentConfig()))
  lines = []
  for key in list(b) + [k for k in a if k not in b]:
    if key in ignore or a.get(key, KeyError) == b.get(key, KeyError):
      continue
    if key not in a and key in defaults and b[key] == defaults[key]:
      continue  # a field added since the run began, at its default: the same run
    has = _show(a[key]) if key in a else "no such field"
    say = _show(b[key]) if key in b else "no such field"
    lines.append(f"{key}: {labels[0]} {has}, {labels[1]} {say}")
  return lines


# --- The lock --------------------------------------------------------------------


def _lock_holder(fd: int) -> Optional[int]:
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


def _holder_text(fd: int) -> str:
  holder = _lock_holder(fd)
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
    return _holder_text(fd)
  finally:
    os.close(fd)
  return None


def unfinished_advice(folder: str) -> str:
  """What to do with an unfinished run: wait for its writer, or resume it."""
  who = writer_of(folder)
  return (f"it is still running ({who}); wait for it to finish" if who else
          "continue it with --resume first")


# --- The folder's state ----------------------------------------------------------


class Folder(NamedTuple):
  """What `inspect` found."""

  kind: str  # "new" | "unfinished" | "finished"
  metadata: Optional[dict]


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except FileNotFoundError:
    return None
  except (UnicodeDecodeError, ValueError):
    raise disk.StoreError(f"{path} is unreadable (not JSON); this folder's run cannot be "
                           "trusted: choose another --output_dir") from None
  if not isinstance(out, dict):
    raise disk.StoreError(f"{path} is not a JSON object; choose another --output_dir")
  return out


class RunDir:
  """A run folder and its protocol (see the module docstring for the invariants).

  Use as a context manager: the lock is taken on entry and dropped on exit;
  leaving by an exception (a fault, Ctrl-C) closes the trajectory unfinished.

    with RunDir(out_dir, "x.safetensors") as run:
      start, state = run.begin(...)
      run.write_rows(key, row, array) ...; run.checkpoint(step, state) ...
      run.write(key, array); run.commit(metadata)
  """

  def __init__(self, path: str, trajectory_name: str, *,
               log: Callable[[str], None] = print):
    self.path = os.path.abspath(os.fspath(path))
    self.trajectory = os.path.join(self.path, trajectory_name)
    self.partial = self.trajectory + tensorfile.PARTIAL_SUFFIX
    self.ckpt_dir = os.path.join(self.path, CHECKPOINT_DIR)
    self.metadata_path = os.path.join(self.path, METADATA_FILE)
    self.log = log
    self.resume_from: Optional[int] = None  # newest durable checkpoint step
    self._lock_fd: Optional[int] = None
    self._writer: Optional[tensorfile.TrajectoryWriter] = None
    self._created = False  # lock() made the folder: removed again if nothing was written
    self._wrote = False
    self.committed = False  # the run is finished (its final name exists)

  # -- the lock ------------------------------------------------------------------

  def __enter__(self) -> "RunDir":
    self.lock()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def lock(self) -> None:
    """Creates the folder if needed and takes its exclusive lock.

    Raises:
      StoreError: the path is a file or cannot be created, or another
        process holds the lock.
    """
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise disk.StoreError(f"--output_dir {self.path} is a file, not a folder; choose "
                             "another --output_dir")
    try:
      self._created = not os.path.exists(self.path)
      os.makedirs(self.path, exist_ok=True)
      fd = os.open(self.path, os.O_RDONLY)
    except OSError as e:
      raise disk.StoreError(f"cannot create the run folder {self.path} ({e.strerror}); "
                             "choose a writable --output_dir") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      who = _holder_text(fd)
      os.close(fd)
      raise disk.StoreError(f"{self.path} is in use by {who} (another jaxdt run writes "
                             "there); wait for it to end or choose another --output_dir") from None
    self._lock_fd = fd
    if not os.access(self.path, os.W_OK):
      self.close()
      raise disk.StoreError(f"the run folder {self.path} is not writable; choose a writable "
                             "--output_dir")

  def close(self) -> None:
    """Closes the trajectory unfinished (if still open) and drops the lock."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._lock_fd is not None:
      if self._created and not self._wrote:  # refused before any write: leave no trace
        try:
          os.rmdir(self.path)
        except OSError:
          pass
      os.close(self._lock_fd)  # releases the flock
      self._lock_fd = None

  # -- inspection ------------------------------------------------------------------

  def inspect(self, experiment: str) -> Folder:
    """What the folder holds for `experiment`; refuses anything else in one line.

    Raises:
      StoreError: another experiment's run, a lab run, or run files with no
        metadata.json to say whose they are.
    """
    meta = _read_json(self.metadata_path)
    traces = [p for p in (self.trajectory, self.partial) if os.path.exists(p)]
    if checkpoints.checkpoints(self.ckpt_dir):
      traces.append(self.ckpt_dir)
    if meta is None:
      if traces:
        names = ", ".join(os.path.basename(p) for p in traces)
        raise disk.StoreError(f"{self.path} holds run files ({names}) but no {METADATA_FILE}, "
                               "so whose run they are is unknown; choose another --output_dir "
                               "or delete them")
      return Folder("new", None)
    config = meta.get("config")
    if not isinstance(config, dict):
      raise disk.StoreError(f"{self.path} holds a run jaxdt did not write ({METADATA_FILE} has "
                             "no config); choose another --output_dir")
    if config.get("name") != experiment:
      state = "a finished" if meta.get("completed") is True else "an unfinished"
      raise disk.StoreError(f"{self.path} holds {state} {config.get('name')!r} run, not "
                             f"{experiment!r}; choose another --output_dir")
    recorded = (config.get("store") or {}).get("trajectory_name")
    names = {os.path.basename(self.trajectory), recorded} - {None}
    if any(metadata_lib.is_complete(self.path, n) for n in names):  # its own file name, or ours
      return Folder("finished", meta)
    return Folder("unfinished", meta)

  def check_resume(self, metadata: Mapping[str, Any], config: Mapping[str, Any],
                   inputs: Mapping[str, Any]) -> None:
    """Refuses a resume whose config or input files differ from the run's.

    Raises:
      StoreError: the first line says what to do; then one line per field.
    """
    lines = config_differences(metadata.get("config") or {}, config)
    for key, value in inputs.items():
      if key in metadata and metadata[key] != value:
        if key == "gemm_path":  # another host: same config, other GEMM kernels
          lines.append(f"gemm_path: the run has {metadata[key]}, this host {value}; "
                       "force the run's with --gemm_operands")
        else:
          lines.append(f"{key}: the run used other input files ({_show(metadata[key])[:80]}), "
                       f"now {_show(value)[:80]}")
    if lines:
      head = (f"cannot resume {self.path}: {len(lines)} setting(s) differ from the run's; "
              "resume with the run's settings, or choose another --output_dir")
      raise disk.StoreError("\n  ".join([head] + lines))

  # -- the start ---------------------------------------------------------------------

  def _preflight(self, specs, file_metadata, checkpoint_steps, checkpoint_bytes,
                 ram_bytes, resume: bool) -> None:
    total = tensorfile.estimate_bytes(specs, file_metadata)
    have = 0
    if resume:
      for p in (self.partial, self.trajectory):
        if os.path.exists(p):
          have = max(have, os.stat(p).st_blocks * 512)
    done = {s for s, _ in checkpoints.checkpoints(self.ckpt_dir)}
    ckpts = len([s for s in set(checkpoint_steps) if s not in done])
    need = max(0, total - have) + ckpts * checkpoint_bytes + METADATA_BUDGET_BYTES
    disk.preflight(self.path, need, ram_bytes,
                    file_name=f"{os.path.basename(self.trajectory)} and {ckpts} checkpoints")

  def _fresh(self, specs, file_metadata) -> None:
    if os.path.exists(self.trajectory):  # never finished (inspect said so): not a result
      os.remove(self.trajectory)
    self._writer = tensorfile.TrajectoryWriter(self.trajectory, specs, file_metadata)
    disk.fault_point("partial_created")

  def _intact_checkpoint(self, like_state, at_most: Optional[int] = None
                         ) -> Optional[tuple[int, Any]]:
    """(step, state) of the newest checkpoint (at or before `at_most`) whose arrays and
    trajectory prefix verify."""
    for step, path in checkpoints.checkpoints(self.ckpt_dir):
      if at_most is not None and step > at_most:
        continue
      try:
        meta = checkpoints.checkpoint_meta(path)
        state, extra = checkpoints.load_checkpoint(path, like_state)
        covered = (meta.get("covers") or {}).get("trajectory")
        if not isinstance(covered, dict) or int(extra.get("step", -1)) != step:
          raise disk.StoreError(f"checkpoint {path} does not record the trajectory rows it "
                                 "covers (written by an older jaxdt?)")
        for name, d in covered.items():
          if self._writer.rehash_prefix(name, int(d["rows"])) != d["sha256"]:
            raise disk.StoreError(f"{os.path.basename(self.partial)}: rows of {name!r} up to "
                                   f"step {step} do not match checkpoint {path}'s SHA-256")
      except (disk.StoreError, KeyError, TypeError, ValueError) as e:
        reason = str(e).rsplit("; ", 1)[0]  # the tool does the fix itself: try an older one
        self.log(f"skipping checkpoint step {step}: {reason}; trying an older one")
        continue
      return step, state
    return None

  def begin(self, *, experiment: str, config: Mapping[str, Any], inputs: Mapping[str, Any],
            specs: Mapping[str, tuple], file_metadata: Mapping[str, str], metadata: Mapping,
            like_state: Any, resume: bool, checkpoint_steps=(), checkpoint_bytes: int = 0,
            ram_bytes: int = 0) -> tuple[int, Any]:
    """Checks the folder, then opens the trajectory for a fresh run or a resume.

    Args:
      experiment: the config's name (a folder holding another is refused).
      config: `config.to_dict(cfg)`, recorded and checked on resume.
      inputs: {metadata key: value} that a resume must find unchanged (the data
        files' SHA-256, the init checkpoint's).
      specs, file_metadata: the trajectory's tensors and safetensors metadata.
      metadata: metadata.json as written while running (must hold `config`
        and `inputs`; "completed" is set here).
      like_state: the step-0 state (structure, dtypes) to restore into.
      resume: continue an unfinished run.
      checkpoint_steps, checkpoint_bytes: for the disk preflight.
      ram_bytes: host RAM the run needs (preflight).

    Returns:
      (start, state): the step to continue after and its state, or
      (0, None) for a run from step 0 (the caller writes row 0 and the static
      tensors, and checkpoints step 0 if asked).

    Raises:
      StoreError: one line (or one per differing field) saying why and what
        to do; nothing in the folder has changed.
    """
    folder = self.inspect(experiment)
    if folder.kind == "finished":
      if resume:
        raise disk.StoreError(f"{self.path} holds a finished {experiment} run, nothing to "
                               f"resume; see it with --analyze={self.path}, or choose another "
                               "--output_dir")
      raise disk.StoreError(f"{self.path} holds a finished {experiment} run; choose another "
                             f"--output_dir (see it with --analyze={self.path})")
    if folder.kind == "unfinished" and not resume:
      raise disk.StoreError(f"{self.path} holds an unfinished {experiment} run; pass --resume "
                             "to continue it, or choose another --output_dir")
    if folder.kind == "unfinished":
      self.check_resume(folder.metadata, config, inputs)
    self._preflight(specs, file_metadata, checkpoint_steps, checkpoint_bytes, ram_bytes,
                    folder.kind == "unfinished")
    # --- from here on the folder changes -------------------------------------
    self._wrote = True
    for entry in os.listdir(self.path):  # temporaries of a metadata write that was killed
      if entry.startswith(METADATA_FILE + ".tmp"):
        os.remove(os.path.join(self.path, entry))
    metadata_lib.write_metadata(self.path, {**metadata, "completed": False})
    disk.fault_point("metadata_written")
    if folder.kind == "new":
      if resume:
        self.log(f"{self.path} has no run to resume; starting from step 0")
      self._fresh(specs, file_metadata)
      return 0, None
    if os.path.exists(self.trajectory):  # never committed (inspect said so): not a result
      if os.path.exists(self.partial):
        os.remove(self.trajectory)
      else:
        os.replace(self.trajectory, self.partial)
    if not os.path.exists(self.partial):
      self.log(f"{self.path} has no trajectory yet; starting from step 0")
      self._fresh(specs, file_metadata)
      return 0, None
    try:
      self._writer = tensorfile.TrajectoryWriter(self.trajectory, specs, file_metadata, resume=True)
    except disk.StoreError as e:
      reason = str(e).split(": ", 1)[-1].rsplit("; ", 1)[0]
      self.log(f"the unfinished trajectory is unusable ({reason}); restarting from step 0")
      self._fresh(specs, file_metadata)
      return 0, None
    self._layout = (specs, file_metadata)
    found = self._intact_checkpoint(like_state)
    if found is None:
      what = "intact checkpoint" if checkpoints.checkpoints(self.ckpt_dir) else "checkpoint yet"
      self.log(f"no {what} in {self.ckpt_dir}; restarting from step 0")
      self._writer.close()
      self._fresh(specs, file_metadata)
      return 0, None
    self.resume_from = found[0]
    self.log(f"resuming {self.path} from the checkpoint at step {found[0]}")
    return found

  def rewind(self, step: int, like_state) -> tuple[int, Any]:
    """Moves a resumed run back to its newest intact checkpoint at or before `step`.

    A sweep's members continue from one common step; a member that got further
    before the kill steps back (the steps it redoes rewrite the same bytes).

    Returns:
      (start, state), or (0, None) when no such checkpoint is intact (the
      trajectory is started afresh, as `begin` does).
    """
    if self.resume_from is None or self.resume_from <= step:
      raise ValueError(f"rewind({step}) of a run resumed from step {self.resume_from}")
    found = self._intact_checkpoint(like_state, at_most=step)
    if found is None:
      self.log(f"no intact checkpoint at or before step {step} in {self.ckpt_dir}; "
               "restarting from step 0")
      self._writer.close()
      self._fresh(*self._layout)
      self.resume_from = None
      return 0, None
    self.resume_from = found[0]
    self.log(f"{self.path}: stepping back to the checkpoint at step {found[0]} (the sweep "
             "continues all its members from one step)")
    return found

  # -- while running -------------------------------------------------------------

  def write_rows(self, key: str, first_row: int, array) -> None:
    self._writer.write_rows(key, first_row, array)

  def write(self, key: str, array) -> None:
    self._writer.write(key, array)

  def checkpoint(self, step: int, state: Any) -> None:
    """Makes rows so far durable, then saves the state of `step` (marker last)."""
    self._writer.sync()
    disk.fault_point("rows_synced")
    checkpoints.save_checkpoint(self.ckpt_dir, step, state, {"step": step},
                          covers={"trajectory": self._writer.prefix_digests()})
    self.resume_from = step
    disk.fault_point("checkpoint_written")

  def commit(self, metadata: Mapping[str, Any]) -> dict:
    """Seals the trajectory, records its checksums as completed, renames it done.

    Returns:
      metadata.json as written.
    """
    digests = self._writer.seal()
    disk.fault_point("sealed")
    meta = {**metadata, "completed": True, "trajectory_bytes": self._writer.nbytes,
            "trajectory_sha256": digests["file"], "tensor_sha256": digests["tensors"]}
    metadata_lib.write_metadata(self.path, meta)
    disk.fault_point("final_metadata_written")
    self._writer.commit()  # THE commit point
    self._writer = None
    self.committed = True
    disk.fault_point("committed")
    return meta


# --- Readers ---------------------------------------------------------------------


def open_result(path: str) -> tuple[tensorfile.TrajectoryReader, dict, list]:
  """Opens a trajectory file as a result: refuses unfinished runs, verifies checksums.

  Args:
    path: a `.safetensors` trajectory (ours or the lab's).

  Returns:
    (reader, metadata, notes): the reader checks the recorded SHA-256 of each
    tensor as it is read (call `reader.verify()` at the end of the pass);
    metadata is the metadata.json beside the file ({} if none); notes say
    what could not be verified.

  Raises:
    StoreError: a `.partial` file, a run whose metadata says unfinished, a
      size other than recorded, a header other than recorded.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  if path.endswith(tensorfile.PARTIAL_SUFFIX):
    raise disk.StoreError(f"{path} is an unfinished trajectory (.partial); "
                           f"{unfinished_advice(folder)}, then pass the finished file")
  meta_path = os.path.join(folder, METADATA_FILE)
  try:
    meta = _read_json(meta_path) or {}
  except disk.StoreError:
    meta = {}
  notes, digests = [], None
  config = meta.get("config")
  ours = isinstance(config, dict)
  name = ((config or {}).get("store") or {}).get("trajectory_name") if ours else None
  if ours and name == os.path.basename(path):
    if meta.get("completed") is not True:
      raise disk.StoreError(f"{path} belongs to an unfinished run ({METADATA_FILE} says "
                             f"completed: false); {unfinished_advice(folder)}")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size is not None and meta.get("trajectory_bytes") != size:
      raise disk.StoreError(f"{path} is {size:,} bytes but its run recorded "
                             f"{meta.get('trajectory_bytes')}; the file is damaged, re-run it "
                             "or restore it from a copy")
    digests = meta.get("tensor_sha256")
    if digests is None:
      notes.append("no SHA-256 recorded (an older jaxdt run): integrity not verified")
  elif ours:
    notes.append(f"{METADATA_FILE} beside it describes {name}, not this file: integrity not "
                 "verified")
  else:
    notes.append("not a jaxdt run (no jaxdt metadata.json): integrity not verified")
  return tensorfile.TrajectoryReader(path, digests=digests), meta, notes


def first_nonfinite(values: np.ndarray, first_step: int = 0) -> Optional[int]:
  """The step of the first non-finite value of a per-step series, or None."""
  bad = ~np.isfinite(np.asarray(values, np.float64))
  return int(np.argmax(bad)) + first_step if bad.any() else None


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

