"""Thimble 9 (docs/experiments.md): long-haul Fimbulwinter hunt, TinyLM, 10,000 steps.

Thimble 8's training exactly (lr 3e-4, wd 0.1, seed 42), recording only the
dead rows' W (uint16 bits) and the loss (loss[0] = 0.0), checkpoints every
1000 steps. `verification()` is the lab's VERIFICATION_MODE: 1000 steps,
checkpoints [0, 100, 500, 1000], W and loss compared bit for bit with the first
1001 rows of a Thimble 8 file (`run.py --verification --verify_against=...`).
"""

import dataclasses

from experiments import thimble8

from jaxdt.config import ExperimentConfig, ProbeConfig
from jaxdt.verify import Verification


def config() -> ExperimentConfig:
  base = thimble8.config()  # "MUST match Thimble 8 exactly"
  return dataclasses.replace(
      base, name="thimble9", steps=10000,
      probes=ProbeConfig(names=("W", "loss"), rows="dead", loss_initial=0.0),
      store=dataclasses.replace(
          base.store, trajectory_name="thimble_9_trajectory.safetensors",
          checkpoint_steps=tuple(range(0, 10001, 1000)),
          experiment_title="Thimble 9",
          notes="Dead tokens only. W stored as uint16 (bfloat16 bit pattern). "
                "Stripped-down for long run."))


def verification() -> Verification:
  return Verification(steps=1000, checkpoint_steps=(0, 100, 500, 1000), keys=("W", "loss"),
                      title="Thimble 9", reference_title="Thimble 8")
