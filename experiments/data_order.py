"""Data order: would another data order reach the same endpoint?

Crucible 1 from one init (seed 42) over four data orders (data_seed 42, 1, 2,
3; data_seed 42 is the solo Crucible 1 run, bit for bit). One compiled
program: the data key is traced data.

    python run.py --experiment=data_order
"""

from experiments import crucible1

from jaxdt.config import ExperimentConfig


def config() -> ExperimentConfig:
  return crucible1.swept("data_order", "data_seed=42,1,2,3",
                         "Crucible 1, four data orders",
                         "Sweep: one init, data_seed 42/1/2/3.")
