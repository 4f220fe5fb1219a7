"""Master weights: does Fimbulwinter happen with f32 master weights?

Crucible 1 twice: the lab's pure bf16 (params and Adam moments in bf16, every
update rounded to the bf16 lattice) against mixed precision (f32 master
weights and moments, bf16 compute). Two members in two compiled programs (the
precision changes the dtypes); the same init and data order.

    python run.py --experiment=master_weights
"""

from experiments import crucible1

from jaxdt.config import ExperimentConfig


def config() -> ExperimentConfig:
  return crucible1.swept("master_weights", "precision=bf16,mixed",
                         "Crucible 1, bf16 vs mixed",
                         "Sweep: precision bf16 / mixed (f32 master weights).")
