"""Checkpoints: a pytree as one safetensors file plus a marker written last.

`step_NNNNNN/arrays.safetensors`, then `meta.json` (the marker: format, step,
the arrays file's SHA-256, the marker's own digest). Readers skip a folder
without an intact marker.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from jaxdt.io import disk
from jaxdt.io import metadata
from jaxdt.io import tensorfile
from jaxdt.io import tensorwriter
from jaxdt.io import untrusted


CHECKPOINT_ARRAYS = "arrays.safetensors"
CHECKPOINT_META = "meta.json"
CHECKPOINT_FORMAT = "jaxdt-checkpoint-1"

_CKPT_DIR = re.compile(r"step_(\d{6,18})")  # longer names are not ours

# --- Checkpoints ------------------------------------------------------------


def _leaf_name(path: Sequence[Any]) -> str:
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def _is_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
  leaves = [(_leaf_name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  names = [n for n, _ in leaves]
  if len(set(names)) != len(names):
    dup = next(n for n in names if names.count(n) > 1)
    raise disk.StoreError(f"two pytree leaves are both named {dup!r}; give them distinct keys")
  return leaves


def _leaf_array(leaf: Any) -> np.ndarray:
  # Typed PRNG keys are stored as their raw key data and re-wrapped on load.
  return np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> str:
  """The directory of the checkpoint after `step`: `ckpt_dir/step_{step:06d}`."""
  return os.path.join(os.fspath(ckpt_dir), f"step_{operator.index(step):06d}")


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, tree: Any,
                    extra: Optional[Mapping[str, Any]] = None,
                    covers: Optional[Mapping[str, Any]] = None) -> str:
  """Saves a pytree: arrays first, then `meta.json` last as the completion marker.

  Every leaf is stored under its key path (`jax.tree_util.keystr`, e.g.
  "['params']['embed']" or ".mu") with its own dtype: bf16 as BF16, so the
  restore is bit-exact. The marker holds the arrays file's SHA-256 (read back
  after its fsync), checked by `load_checkpoint`. Re-saving a step first
  removes its old `meta.json`.

  Args:
    ckpt_dir: the checkpoints directory.
    step: the step the state is after; names the subdirectory.
    tree: a pytree of JAX/numpy arrays and scalars (typed PRNG keys allowed).
    extra: JSON-ready dict saved beside the arrays (data position, probe
      state summaries, config, ...).
    covers: JSON-ready record of what else this checkpoint vouches for (the
      run folder stores the trajectory's prefix digests here).

  Returns:
    The checkpoint directory.
  """
  directory = checkpoint_path(ckpt_dir, step)
  extra = {} if extra is None else dict(extra)
  leaves = [(name, _leaf_array(leaf)) for name, leaf in _named_leaves(tree)]
  meta = {
      "format": CHECKPOINT_FORMAT, "step": operator.index(step), "extra": extra,
      "covers": {} if covers is None else dict(covers),
      "leaves": [{"name": n, "dtype": tensorfile.dtype_code(a.dtype, n), "shape": list(a.shape)}
                 for n, a in leaves]}
  json.dumps(metadata.json_ready(meta), allow_nan=False)  # fail before writing
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, CHECKPOINT_META)
  if os.path.exists(meta_path):  # invalidate first: a crash now leaves no marker
    os.remove(meta_path)
    disk.fsync_dir(directory)
  arrays = os.path.join(directory, CHECKPOINT_ARRAYS)
  writer = tensorwriter.TrajectoryWriter(arrays, {n: (a.dtype, a.shape) for n, a in leaves},
                            {"format": CHECKPOINT_FORMAT, "step": str(step)}, overwrite=True)
  with writer:
    for name, array in leaves:
      writer.write(name, array)
    meta["sha256"] = {CHECKPOINT_ARRAYS: writer.seal()["file"]}
    writer.commit()
  disk.fault_point("checkpoint_arrays_written")
  meta = metadata.json_ready(meta)
  meta["marker_sha256"] = _marker_digest(meta)
  disk.atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
  disk.fault_point("checkpoint_marker_written")
  return directory


def _marker_digest(meta: Mapping[str, Any]) -> str:
  """SHA-256 of a marker's canonical JSON without its own digest."""
  body = {k: v for k, v in meta.items() if k != "marker_sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def intact_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, str]]:
  """[(step, directory)] of the checkpoints that have their `meta.json`, newest first."""
  ckpt_dir = os.fspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    return []
  done = [(int(m.group(1)), os.path.join(ckpt_dir, entry)) for entry in os.listdir(ckpt_dir)
          if (m := _CKPT_DIR.fullmatch(entry))
          and os.path.isfile(os.path.join(ckpt_dir, entry, CHECKPOINT_META))]
  return sorted(done, reverse=True)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[str]:
  """The highest-step checkpoint directory that has its `meta.json`, or None."""
  done = intact_checkpoints(ckpt_dir)
  return done[0][1] if done else None


def checkpoint_meta(path: str | os.PathLike) -> dict:
  """A checkpoint's marker (step, extra, covers, leaves, sha256)."""
  return _read_checkpoint_meta(os.fspath(path))


# The marker's kinds (`untrusted.check`); a marker of other kinds is corrupt.
CHECKPOINT_SCHEMA = {
    "format": str, "step": int, "extra": dict, "extra.step": int, "covers": dict,
    "covers.trajectory": dict, "covers.trajectory.*": dict, "covers.trajectory.*.rows": int,
    "covers.trajectory.*.sha256": str, "leaves": list, "leaves[]": dict, "leaves[].name": str,
    "leaves[].dtype": str, "leaves[].shape": list, "leaves[].shape[]": int, "sha256": dict,
    "sha256.*": str, "marker_sha256": str}


def _read_checkpoint_meta(path: str) -> dict:
  meta_path = os.path.join(path, CHECKPOINT_META)
  if not os.path.lexists(meta_path):
    raise disk.StoreError(f"checkpoint {path} has no {CHECKPOINT_META} (unfinished write); restore "
                     "from latest_checkpoint() instead")
  try:
    meta = untrusted.read_object(meta_path, "restore from an older checkpoint",
                                 schema=CHECKPOINT_SCHEMA, required=("format", "leaves", "extra"))
  except disk.StoreError as e:
    raise disk.StoreError(f"checkpoint {path} has an unreadable {CHECKPOINT_META} (corrupt: "
                          f"{str(e).split('; ')[0]}); restore from an older checkpoint") from None
  if meta.get("format") != CHECKPOINT_FORMAT:
    raise disk.StoreError(f"checkpoint {path} has format {meta.get('format')!r}, expected "
                     f"{CHECKPOINT_FORMAT!r}; restore it with the jaxdt that wrote it")
  if "marker_sha256" in meta and meta["marker_sha256"] != _marker_digest(meta):
    raise disk.StoreError(f"checkpoint {path} is corrupt: {CHECKPOINT_META} does not match its own "
                     "SHA-256; restore from an older checkpoint")
  return meta


def _leaf_dtype_shape(leaf: Any) -> tuple[np.dtype, tuple]:
  """What a leaf is stored as, without touching its values (works on ShapeDtypeStruct)."""
  if _is_key(leaf):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
    return np.dtype(leaf.dtype), tuple(leaf.shape)
  return np.asarray(leaf).dtype, ()  # Python scalar


def _restore_leaf(array: np.ndarray, like: Any) -> Any:
  if _is_key(like):
    if not isinstance(like, jax.Array):
      raise disk.StoreError("a typed PRNG key leaf needs a concrete key in like_tree (its impl is "
                       "read from it); pass jax.random.key(0) there, not a ShapeDtypeStruct")
    return jax.random.wrap_key_data(array, impl=jax.random.key_impl(like))
  if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
    sharding = getattr(like, "sharding", None)
    return jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
  if isinstance(like, np.ndarray):
    return array
  if isinstance(like, np.generic):
    return array[()]
  return type(like)(array.item())  # Python scalars stay Python scalars


def _verified(path: str) -> tuple[dict, str]:
  """(marker, arrays file) of a checkpoint whose arrays match the SHA-256 in its marker."""
  meta = _read_checkpoint_meta(path)
  arrays = os.path.join(path, CHECKPOINT_ARRAYS)
  expected = (meta.get("sha256") or {}).get(CHECKPOINT_ARRAYS)
  if expected is not None:
    try:
      actual = disk.sha256_file(arrays)
    except OSError as e:
      raise disk.StoreError(f"checkpoint {path} cannot be read ({e.strerror}); restore from an "
                       "older checkpoint") from None
    if actual != expected:
      raise disk.StoreError(f"checkpoint {path} is corrupt: {CHECKPOINT_ARRAYS} does not match the "
                       "SHA-256 in its marker; restore from an older checkpoint")
  return meta, arrays


def read_arrays(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
  """{leaf name: numpy array} of `names` in a checkpoint (bf16 leaves as ml_dtypes bf16),
  checked against its marker's SHA-256 as `load_checkpoint` checks it, without a like tree:
  for tools that read other programs' checkpoints (torch peer runs) by leaf name.

  Raises:
    StoreError: no or corrupt marker, arrays not matching it, or a name it lacks.
  """
  path = os.fspath(path)
  meta, arrays = _verified(path)
  saved = {leaf.get("name") for leaf in meta["leaves"]}
  missing = [n for n in names if n not in saved]
  if missing:
    raise disk.StoreError(f"checkpoint {path} has no leaf {missing[0]!r}; pass a checkpoint of "
                          "the program that names it")
  out = {}
  with tensorfile.TrajectoryReader(arrays) as reader:
    for name in names:
      array = reader.read(name)
      out[name] = array.view(tensorfile.BF16) if reader.raw_dtype(name) == "BF16" else array
  return out


def load_checkpoint(path: str | os.PathLike, like_tree: Any) -> tuple[Any, dict]:
  """Restores a checkpoint into the structure of `like_tree`.

  Args:
    path: a checkpoint directory (as `latest_checkpoint` returns).
    like_tree: a pytree with the same structure, leaf names, shapes and dtypes
      (values are ignored; e.g. a freshly initialized state, or jax.eval_shape
      of one). Leaves come back as JAX arrays on the like leaf's sharding,
      numpy arrays, or Python scalars, matching the like leaf.

  Returns:
    (tree, extra): the restored tree, bit-identical to the saved one, and the
    `extra` dict given to `save_checkpoint`.

  Raises:
    StoreError: no meta.json, or names/shapes/dtypes differ (one line naming
      the first difference).
  """
  path = os.fspath(path)
  meta, arrays = _verified(path)
  fix = "restore with the config the checkpoint was saved with"
  like = _named_leaves(like_tree)
  saved = [leaf.get("name") for leaf in meta["leaves"]]
  names = [n for n, _ in like]
  if names != saved:
    missing = [n for n in names if n not in saved]
    unexpected = [n for n in saved if n not in names]
    detail = (f"state leaf {missing[0]!r} is not in it" if missing else
              f"it has leaf {unexpected[0]!r} the state lacks" if unexpected else
              "its leaves are in another order")
    raise disk.StoreError(f"checkpoint {path} does not fit this state: {detail}; {fix}")
  treedef = jax.tree_util.tree_structure(like_tree)
  out = []
  with tensorfile.TrajectoryReader(arrays) as reader:
    for name, leaf in like:
      want_dtype, want_shape = _leaf_dtype_shape(leaf)
      code, shape = reader.raw_dtype(name), reader.shape(name)
      if code != tensorfile.dtype_code(want_dtype, name) or shape != want_shape:
        raise disk.StoreError(f"checkpoint {path} leaf {name!r} is {code}{list(shape)}, the state "
                         f"wants {tensorfile.dtype_code(want_dtype, name)}{list(want_shape)}; {fix}")
      array = reader.read(name)
      out.append(_restore_leaf(array.view(tensorfile.BF16) if code == "BF16" else array, leaf))
  return jax.tree_util.tree_unflatten(treedef, out), meta["extra"]
