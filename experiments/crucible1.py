"""Crucible 1 (docs/experiments.md): the full dead-token lifecycle, lr 1e-3, wd 0."""

import dataclasses

from jaxdt.config import (DataConfig, ExperimentConfig, ModelConfig, OptimConfig,
                          ProbeConfig, StoreConfig)


def config() -> ExperimentConfig:
  return ExperimentConfig(
      name="crucible1",
      seed=42,  # RANDOM_SEED
      steps=5000,  # TOTAL_STEPS
      precision="bf16",  # model.to(torch.bfloat16): params, m and v in bf16
      model=ModelConfig(variant="encoder", vocab_size=10000, hidden_dim=64, num_layers=2,
                        num_heads=2, max_seq_len=128, init_std=0.02),
      optim=OptimConfig(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
      data=DataConfig(scheme="chunks", batch_size=128, seq_len=128),
      probes=ProbeConfig(
          names=("W", "delta_W_prime", "centroid", "loss", "last_motion_step",
                 "adam_accounting"),
          rows="dead", motion_threshold=0.1, loss_initial=None),  # loss[0] = NaN
      store=StoreConfig(
          trajectory_name="crucible_1_trajectory.safetensors",
          # The lab saved no checkpoints; ours exist only so --resume can work.
          checkpoint_steps=(1000, 2000, 3000, 4000),
          chunk_steps=100, experiment_title="Crucible 1", series="Crucible",
          notes="First Crucible experiment. Fast lr, no weight decay. Full lifecycle capture."),
  )


def swept(name: str, spec: str, title: str, notes: str) -> ExperimentConfig:
  """Crucible 1 as a sweep over `spec` (run.py --sweep's syntax), under its own name."""
  base = config()
  return dataclasses.replace(
      base, name=name, sweep=spec,
      store=dataclasses.replace(base.store, experiment_title=title, notes=notes))
