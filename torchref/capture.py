"""The torch peer's state and rows as numpy, bit for bit: checkpoints and per-step records.

`snapshot`/`restore` turn the loop's whole state (model, AdamW state, the epoch's
RNG state and position, the tracker) into numpy arrays and back; `lab_record` and
`freeze_record` are one step's rows of the lab's keys and of jaxdt's compact
freeze record; `Rows` buffers a chunk of them for the run folder.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from jaxdt.io import rundir


# --- torch <-> numpy, bit for bit ---------------------------------------------------


def to_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def bits(w: torch.Tensor) -> np.ndarray:
  """bf16 rows as their uint16 bit patterns (the lab's `.view(torch.uint16)`)."""
  return w.contiguous().view(torch.int16).numpy().view(np.uint16)


def to_torch(a) -> torch.Tensor:
  a = np.asarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def snapshot(model, optimizer, epoch_rng, position, last_motion_step, elapsed) -> dict:
  """The loop's whole state as numpy arrays (a checkpoint's pytree)."""
  named = list(model.named_parameters())
  state = lambda p, k: optimizer.state[p][k] if p in optimizer.state else None
  return {
      "model": {n: to_numpy(p) for n, p in named},
      "exp_avg": {n: to_numpy(state(p, "exp_avg")) for n, p in named},
      "exp_avg_sq": {n: to_numpy(state(p, "exp_avg_sq")) for n, p in named},
      "adam_step": {n: to_numpy(state(p, "step")) for n, p in named},
      "epoch_rng": to_numpy(epoch_rng), "position": np.asarray(position, np.int64),
      "last_motion_step": to_numpy(last_motion_step),
      "elapsed_s": np.asarray(elapsed, np.float64),
  }


def like_snapshot(model, n_rng: int, n_dead: int) -> dict:
  named = list(model.named_parameters())
  zeros = lambda p: np.zeros(p.shape, ml_dtypes.bfloat16)
  return {"model": {n: zeros(p) for n, p in named}, "exp_avg": {n: zeros(p) for n, p in named},
          "exp_avg_sq": {n: zeros(p) for n, p in named},
          "adam_step": {n: np.zeros((), np.float32) for n, _ in named},
          "epoch_rng": np.zeros(n_rng, np.uint8), "position": np.zeros(3, np.int64),
          "last_motion_step": np.zeros(n_dead, np.int32), "elapsed_s": np.zeros((), np.float64)}


def restore(snap: dict, model, optimizer) -> None:
  with torch.no_grad():
    for n, p in model.named_parameters():
      p.copy_(to_torch(snap["model"][n]))
      optimizer.state[p] = {"step": to_torch(snap["adam_step"][n]),  # on the CPU, as AdamW's
                            "exp_avg": to_torch(snap["exp_avg"][n]).to(p.device),
                            "exp_avg_sq": to_torch(snap["exp_avg_sq"][n]).to(p.device)}


def lab_record(w, dwp, magnitude, threshold) -> dict:
  """The lab's per-step rows: W's bits, ΔW′, the centroid (loss apart)."""
  del magnitude, threshold
  return {"W": bits(w), "delta_W_prime": dwp.numpy(), "centroid": w.float().mean(dim=0).numpy()}


def centroid_norm(w: torch.Tensor) -> np.float32:
  """||mean over the dead rows of W (as f32)||₂."""
  return np.float32(torch.linalg.vector_norm(w.float().mean(dim=0)).item())


def freeze_record(w, dwp, magnitude, threshold) -> dict:
  """The freeze record's per-step rows (loss apart), from the lab's ||ΔW′_i||₂ (`magnitude`).

  As jaxdt's "freeze" probe: a row is frozen unless ||ΔW′_i||₂ ≥ threshold (a NaN
  norm is frozen), so the counts sum to the rows; the mean is over the finite
  norms (0 where none is).
  """
  del dwp
  finite = magnitude[torch.isfinite(magnitude)]
  return {"n_frozen": np.int32((~(magnitude >= threshold)).sum().item()),
          "n_moving": np.int32((magnitude >= threshold).sum().item()),
          "dwp_l2_mean": np.float32(finite.double().mean().item() if finite.numel() else 0.0),
          "centroid_norm": centroid_norm(w)}


class Rows:
  """The capture of a chunk of steps, written to the run folder at its end."""

  def __init__(self, run: rundir.RunDir, series: dict):
    self.run, self.first, self.initial = run, None, series  # key -> has a row 0
    self.buf = {k: [] for k in series}

  def add(self, step, values: dict):
    self.first = step if self.first is None else self.first
    for k, rows in self.buf.items():
      rows.append(values[k])

  def flush(self):
    if self.first is None:
      return
    for k, rows in self.buf.items():
      row = self.first if self.initial[k] else self.first - 1  # e.g. ΔW′: row t-1 = step t
      self.run.write_rows(k, row, np.stack(rows))
      rows.clear()
    self.first = None
