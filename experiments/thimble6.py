"""Thimble 6 (docs/experiments.md): ground state or still cooling? GPT2, all rows, 6000 steps.

The lab's run is Thimble 1's run for 6000 steps, streamed to HDF5 as float16
(lossy: float16 has 5 exponent bits, so small bf16 values flush or round).
Here the four per-step tensors are streamed as exact bf16 bits (uint16), the
lab's Thimble 7 layout, into one safetensors file; the hyperparameters (HDF5
root attributes in the lab's notebook) are 0-d tensors, and the masks and ids keep the
lab's names. Labels are double-shifted as the lab's were (see thimble1.py).
"""

from jaxdt.config import (DataConfig, ExperimentConfig, ModelConfig, OptimConfig,
                          ProbeConfig, StoreConfig)


def config() -> ExperimentConfig:
  return ExperimentConfig(
      name="thimble6",
      seed=42,  # SEED
      steps=6000,  # NUM_STEPS
      precision="bf16",
      model=ModelConfig(variant="gpt2", vocab_size=10000, hidden_dim=64, num_layers=2,
                        num_heads=2, max_seq_len=128, init_std=0.02),
      optim=OptimConfig(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
      data=DataConfig(scheme="windows", batch_size=128, seq_len=128, double_shift_labels=True),
      probes=ProbeConfig(
          names=("W", "grad_W_bits", "momentum_W_bits", "variance_W_bits", "losses",
                 "live_dead_ids", "lab_scalars"),
          rows="all", loss_initial=None),  # losses[0] = NaN
      store=StoreConfig(
          trajectory_name="thimble_6.safetensors",  # the lab's notebook: thimble_6.h5
          # The lab saved no checkpoints; these exist only so --resume can work.
          checkpoint_steps=(1000, 2000, 3000, 4000, 5000),
          chunk_steps=50,  # 5.1 MB of records per step over all rows
          experiment_title="Thimble 6", series="Thimble",
          notes="Ground state or still cooling? All rows. W, grad_W, momentum_W, variance_W "
                "stored as uint16 (bfloat16 bit pattern), not the lab's float16."),
  )
