"""Master weights: does Fimbulwinter happen with f32 master weights?

Crucible 1 twice: the lab's pure bf16 (params and Adam moments in bf16, every
update rounded to the bf16 lattice) against mixed precision (f32 master
weights and moments, bf16 compute). Two members in two compiled programs (the
precision changes the dtypes); the same init and data order.

    python run.py --experiment=master_weights
"""

import dataclasses

from experiments import crucible1

from jaxdt.config import ExperimentConfig


def config() -> ExperimentConfig:
  base = crucible1.config()
  return dataclasses.replace(
      base, name="master_weights", sweep="precision=bf16,mixed",
      store=dataclasses.replace(base.store, experiment_title="Crucible 1, bf16 vs mixed",
                                notes="Sweep: precision bf16 / mixed (f32 master weights)."))
