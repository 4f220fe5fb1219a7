"""Thimble 1 (docs/experiments.md): Adam accounting validation, GPT2, every row, 1000 steps.

The lab trained HF GPT2LMHeadModel in bf16 on sliding windows (batch 128,
lr 1e-3, wd 0) and kept W, grad_W, momentum_W, variance_W and losses for all
10,000 rows at every step, plus its hyperparameters as scalar tensors.

Labels: the lab passed `labels = window[1:]` to HF GPT2, whose loss shifts
them again, so it trained on the token two ahead (docs/definitions.md §Steps and files). This config
replays that (`double_shift_labels=True`); `--nodouble_shift_labels` gives true
next-token prediction.
"""

from jaxdt.config import (DataConfig, ExperimentConfig, ModelConfig, OptimConfig,
                          ProbeConfig, StoreConfig)


def config() -> ExperimentConfig:
  return ExperimentConfig(
      name="thimble1",
      seed=42,  # SEED
      steps=1000,  # NUM_STEPS
      precision="bf16",  # model.to(torch.bfloat16): params, m and v in bf16
      model=ModelConfig(variant="gpt2", vocab_size=10000, hidden_dim=64, num_layers=2,
                        num_heads=2, max_seq_len=128, init_std=0.02),  # INIT_SCALE
      optim=OptimConfig(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
      data=DataConfig(scheme="windows", batch_size=128, seq_len=128, double_shift_labels=True),
      probes=ProbeConfig(
          # W, grad_W bf16; momentum_W, variance_W f32; losses f32; the scalars.
          names=("W_bf16", "grad_W", "momentum_W", "variance_W", "losses", "lab_scalars"),
          rows="all", loss_initial=None),  # losses[0] = NaN
      store=StoreConfig(
          trajectory_name="thimble_1.safetensors",
          # The lab saved no checkpoints; this one exists only so --resume can work.
          checkpoint_steps=(500,),
          chunk_steps=50,  # 7.7 MB of records per step over all rows
          experiment_title="Thimble 1", series="Thimble",
          notes="Adam accounting validation. All rows. W, grad_W bf16; momentum_W, "
                "variance_W f32 copies of the bf16 Adam state."),
  )
