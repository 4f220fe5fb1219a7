"""Thimble 8 (docs/experiments.md): dead rows' full optimizer state, TinyLM, 4000 steps.

lr 3e-4, wd 0.1. Per step over the dead rows: W (uint16 bf16 bits), m, v, g
(f32 copies; g is step t's gradient) and the bf16 loss, with loss[0] = 0.0 (the
lab's `capture_state(..., loss_val=0.0)`). Checkpoints at the lab's steps.
"""

from jaxdt.config import (DataConfig, ExperimentConfig, ModelConfig, OptimConfig,
                          ProbeConfig, StoreConfig)

CHECKPOINT_STEPS = (0, 1, 10, 100, 500, 1000, 2000, 3000, 3500, 4000)


def config() -> ExperimentConfig:
  return ExperimentConfig(
      name="thimble8",
      seed=42,  # RANDOM_SEED
      steps=4000,  # TOTAL_STEPS
      precision="bf16",
      model=ModelConfig(variant="encoder", vocab_size=10000, hidden_dim=64, num_layers=2,
                        num_heads=2, max_seq_len=128, init_std=0.02),
      optim=OptimConfig(learning_rate=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1),
      data=DataConfig(scheme="chunks", batch_size=128, seq_len=128),
      probes=ProbeConfig(names=("W", "m", "v", "g", "loss"), rows="dead", loss_initial=0.0),
      store=StoreConfig(
          trajectory_name="thimble_8_trajectory.safetensors",
          checkpoint_steps=CHECKPOINT_STEPS,
          chunk_steps=100, experiment_title="Thimble 8", series="Thimble",
          notes="Dead tokens only. W stored as uint16 (bfloat16 bit pattern)."),
  )
