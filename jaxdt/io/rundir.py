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

import dataclasses
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional

from jaxdt.io import checkpoints
from jaxdt.io import configdiff
from jaxdt.io import disk
from jaxdt.io import hosts
from jaxdt.io import locks
from jaxdt.io import metadata as metadata_lib
from jaxdt.io import tensorfile
from jaxdt.io import tensorwriter
from jaxdt.io import untrusted

CHECKPOINT_DIR = "checkpoints"
METADATA_FILE = metadata_lib.METADATA_FILE
# Disk kept free for metadata.json rewrites and checkpoint markers.
METADATA_BUDGET_BYTES = 1 << 20
# --- The folder's state ----------------------------------------------------------


class Folder(NamedTuple):
  """What `inspect` found."""

  kind: str  # "new" | "unfinished" | "finished"
  metadata: Optional[dict]


@dataclasses.dataclass(frozen=True)
class FolderPlan:
  """What a run will write into its folder, decided before the folder is touched."""

  experiment: str  # the config's name (a folder holding another is refused)
  config: Mapping[str, Any]  # `config.to_dict(cfg)`, recorded and checked on resume
  inputs: Mapping[str, Any]  # {metadata key: value} a resume must find unchanged
  specs: Mapping[str, tuple]  # the trajectory's tensors
  file_metadata: Mapping[str, str]  # the trajectory's safetensors metadata
  checkpoint_steps: tuple = ()  # for the disk preflight
  checkpoint_bytes: int = 0
  ram_bytes: int = 0  # host RAM the run needs (preflight)
  host: Optional[Mapping[str, Any]] = None  # this host's arithmetic (`io.hosts`); None: unchecked
  allow_host_change: bool = False  # resume even where the run's host had other arithmetic


class Begun(NamedTuple):
  """Where a run continues: after `step`, from `state` (None: a fresh run from step 0), with
  what its checkpoint recorded beside the state (`extra`: e.g. the wall time so far)."""

  step: int
  state: Any
  extra: Mapping = {}


class RunDir:
  """A run folder and its protocol (see the module docstring for the invariants).

  Use as a context manager: the lock is taken on entry and dropped on exit;
  leaving by an exception (a fault, Ctrl-C) closes the trajectory unfinished.

    with RunDir(out_dir, "x.safetensors") as run:
      start, state = run.begin(plan, metadata, like_state, resume)
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
    self._writer: Optional[tensorwriter.TrajectoryWriter] = None
    self._created = False  # lock() made the folder: removed again if nothing was written
    self._wrote = False
    self.committed = False  # the run is finished (its final name exists)
    self.previous_metadata: Optional[dict] = None  # a resumed run's metadata.json, as found
    self.host_changed = False  # a resume allowed onto a host with other arithmetic
    self._plan: Optional[FolderPlan] = None

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
      locks.lock_exclusive(fd, self.path)
    except disk.StoreError:
      os.close(fd)
      raise
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
    meta = metadata_lib.read_json_object(self.metadata_path)
    traces = [p for p in (self.trajectory, self.partial) if os.path.exists(p)]
    if checkpoints.intact_checkpoints(self.ckpt_dir):
      traces.append(self.ckpt_dir)
    if meta is None:
      if traces:
        names = ", ".join(os.path.basename(p) for p in traces)
        raise disk.StoreError(f"{self.path} holds run files ({names}) but no {METADATA_FILE}, "
                               "so whose run they are is unknown; choose another --output_dir "
                               "or delete them")
      others = sorted(e for e in os.listdir(self.path)
                      if not e.startswith(METADATA_FILE + ".tmp"))
      if others:  # the user's: a run among them would replace some (summary.json, PNGs)
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise disk.StoreError(f"{self.path} holds files jaxdt did not write "
                              f"({untrusted.show(others[0], 40)}{more}); choose a new or empty "
                              "--output_dir")
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
    lines = configdiff.config_differences(metadata.get("config") or {}, config)
    for key, value in inputs.items():
      if key in metadata and metadata[key] != value:
        if key == "gemm_path":  # another host: same config, other GEMM kernels
          lines.append(f"gemm_path: the run has {metadata[key]}, this host {value}; "
                       "force the run's with --gemm_operands")
        else:
          lines.append(f"{key}: the run used other input files ({configdiff.show(metadata[key])[:80]}), "
                       f"now {configdiff.show(value)[:80]}")
    if lines:
      head = (f"cannot resume {self.path}: {len(lines)} setting(s) differ from the run's; "
              "resume with the run's settings, or choose another --output_dir")
      raise disk.StoreError("\n  ".join([head] + lines))

  # -- the start ---------------------------------------------------------------------

  def _preflight(self, plan: "FolderPlan", resume: bool) -> None:
    total = tensorfile.estimate_bytes(plan.specs, plan.file_metadata)
    have = 0
    if resume:
      for p in (self.partial, self.trajectory):
        if os.path.exists(p):
          have = max(have, os.stat(p).st_blocks * 512)
    done = {s for s, _ in checkpoints.intact_checkpoints(self.ckpt_dir)}
    ckpts = len([s for s in set(plan.checkpoint_steps) if s not in done])
    need = max(0, total - have) + ckpts * plan.checkpoint_bytes + METADATA_BUDGET_BYTES
    disk.preflight(self.path, need, plan.ram_bytes,
                   file_name=f"{os.path.basename(self.trajectory)} and {ckpts} checkpoints")

  def _fresh(self) -> Begun:
    if os.path.exists(self.trajectory):  # never finished (inspect said so): not a result
      os.remove(self.trajectory)
    self._writer = tensorwriter.TrajectoryWriter(self.trajectory, self._plan.specs,
                                               self._plan.file_metadata)
    disk.fault_point("partial_created")
    self.resume_from = None
    return Begun(0, None)

  def _intact_checkpoint(self, like_state, at_most: Optional[int] = None
                         ) -> Optional[tuple[int, Any]]:
    """(step, state) of the newest checkpoint (at or before `at_most`) whose arrays and
    trajectory prefix verify."""
    for step, path in checkpoints.intact_checkpoints(self.ckpt_dir):
      if at_most is not None and step > at_most:
        continue
      try:
        state, extra = checkpoints.load_checkpoint(path, like_state)
        self._check_covered(step, path, extra)
      except (disk.StoreError, KeyError, TypeError, ValueError) as e:
        reason = str(e).rsplit("; ", 1)[0]  # the tool does the fix itself: try an older one
        self.log(f"skipping checkpoint step {step}: {reason}; trying an older one")
        continue
      return step, state, extra
    return None

  def _check_covered(self, step: int, path: str, extra: Mapping) -> None:
    """Raises unless checkpoint `path` records step `step` and the trajectory rows it covers."""
    meta = checkpoints.checkpoint_meta(path)
    covered = (meta.get("covers") or {}).get("trajectory")
    if not isinstance(covered, dict) or int(extra.get("step", -1)) != step:
      raise disk.StoreError(f"checkpoint {path} does not record the trajectory rows it covers "
                            "(written by an older jaxdt?)")
    for name, d in covered.items():
      shape = tuple(self._plan.specs[name][1]) if name in self._plan.specs else None
      rows = d.get("rows")
      if shape is None or not isinstance(rows, int) or not 0 <= rows <= (shape or (1,))[0]:
        raise disk.StoreError(f"checkpoint {path} covers rows the trajectory does not have")
      if self._writer.rehash_prefix(name, rows) != d.get("sha256"):
        raise disk.StoreError(f"{os.path.basename(self.partial)}: rows of {name!r} up to step "
                              f"{step} do not match checkpoint {path}'s SHA-256")

  def _refuse(self, folder: Folder, plan: "FolderPlan", resume: bool) -> None:
    """The one-line refusals of `begin`, before anything in the folder changes."""
    experiment = plan.experiment
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
      self.check_resume(folder.metadata, plan.config, plan.inputs)
      if plan.host is not None:
        self.host_changed = hosts.check_resume_host(self.path, folder.metadata, plan.host,
                                                    plan.allow_host_change, self.log)

  def begin(self, plan: "FolderPlan", metadata: Mapping, like_state: Any,
            resume: bool) -> Begun:
    """Checks the folder, then opens the trajectory for a fresh run or a resume.

    Args:
      plan: what the run writes (`FolderPlan`).
      metadata: metadata.json as written while running (must hold `config`
        and the plan's inputs; "completed" is set here).
      like_state: the step-0 state (structure, dtypes) to restore into.
      resume: continue an unfinished run.

    Returns:
      Begun(step, state): the step to continue after and its restored state;
      Begun(0, None) for a run from step 0, whose row 0 the caller writes.

    Raises:
      StoreError: one line (or one per differing field) saying why and what
        to do; nothing in the folder has changed.
    """
    folder = self.inspect(plan.experiment)
    self._refuse(folder, plan, resume)
    disk.check_fits(self.partial, "set a shorter store.trajectory_name or --output_dir")
    self._preflight(plan, folder.kind == "unfinished")
    # --- from here on the folder changes -------------------------------------
    self._wrote, self._plan = True, plan
    self.previous_metadata = folder.metadata
    for entry in os.listdir(self.path):  # temporaries of a metadata write that was killed
      if entry.startswith(METADATA_FILE + ".tmp"):
        os.remove(os.path.join(self.path, entry))
    metadata_lib.write_metadata(self.path, {**metadata, "completed": False})
    disk.fault_point("metadata_written")
    if folder.kind == "new":
      if resume:
        self.log(f"{self.path} has no run to resume; starting from step 0")
      return self._fresh()
    return self._reopen(like_state)

  def _reopen(self, like_state) -> Begun:
    """The unfinished trajectory reopened at its newest intact checkpoint (else afresh)."""
    if os.path.exists(self.trajectory):  # never committed (inspect said so): not a result
      if os.path.exists(self.partial):
        os.remove(self.trajectory)
      else:
        os.replace(self.trajectory, self.partial)
    if not os.path.exists(self.partial):
      self.log(f"{self.path} has no trajectory yet; starting from step 0")
      return self._fresh()
    try:
      self._writer = tensorwriter.TrajectoryWriter(self.trajectory, self._plan.specs,
                                                 self._plan.file_metadata, resume=True)
    except disk.StoreError as e:
      reason = str(e).split(": ", 1)[-1].rsplit("; ", 1)[0]
      self.log(f"the unfinished trajectory is unusable ({reason}); restarting from step 0")
      return self._fresh()
    found = self._intact_checkpoint(like_state)
    if found is None:
      what = ("intact checkpoint" if checkpoints.intact_checkpoints(self.ckpt_dir)
              else "checkpoint yet")
      self.log(f"no {what} in {self.ckpt_dir}; restarting from step 0")
      self._writer.close()
      return self._fresh()
    self.resume_from = found[0]
    self.log(f"resuming {self.path} from the checkpoint at step {found[0]}")
    return Begun(*found)

  def rewind(self, step: int, like_state) -> Begun:
    """Moves a resumed run back to its newest intact checkpoint at or before `step`.

    A sweep's members continue from one common step; a member that got further
    before the kill steps back (the steps it redoes rewrite the same bytes).

    Returns:
      Begun(step, state), or Begun(0, None) when no such checkpoint is intact
      (the trajectory is started afresh, as `begin` does).
    """
    if self.resume_from is None or self.resume_from <= step:
      raise ValueError(f"rewind({step}) of a run resumed from step {self.resume_from}")
    found = self._intact_checkpoint(like_state, at_most=step)
    if found is None:
      self.log(f"no intact checkpoint at or before step {step} in {self.ckpt_dir}; "
               "restarting from step 0")
      self._writer.close()
      return self._fresh()
    self.resume_from = found[0]
    self.log(f"{self.path}: stepping back to the checkpoint at step {found[0]} (the sweep "
             "continues all its members from one step)")
    return Begun(*found)

  # -- while running -------------------------------------------------------------

  def write_rows(self, key: str, first_row: int, array) -> None:
    self._writer.write_rows(key, first_row, array)

  def write(self, key: str, array) -> None:
    self._writer.write(key, array)

  def checkpoint(self, step: int, state: Any, extra: Optional[Mapping] = None) -> None:
    """Makes rows so far durable, then saves the state of `step` (marker last), with
    `extra` (JSON) beside it."""
    self._writer.sync()
    disk.fault_point("rows_synced")
    checkpoints.save_checkpoint(self.ckpt_dir, step, state, {**(extra or {}), "step": step},
                          covers={"trajectory": self._writer.prefix_digests()})
    self.resume_from = step
    disk.fault_point("checkpoint_written")

  def rewrite_metadata(self, metadata: Mapping[str, Any]) -> None:
    """Rewrites metadata.json of the running (unfinished) run, atomically."""
    metadata_lib.write_metadata(self.path, {**metadata, "completed": False})

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
    disk.fault_point("commit_renamed")
    self._writer = None
    self.committed = True
    disk.fault_point("committed")
    return meta
