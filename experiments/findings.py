"""The findings study (docs/findings.md): every run the lab's open questions need, declared once.

`python run.py --study=findings` runs each missing member, resumes unfinished ones,
skips finished ones and writes their summaries under docs/findings/; `--study_plan`
lists them with what is done and the time left. Every member is full Crucible 1
size on the embedded default data, 2,000 steps, recording the compact freeze
record (`--probes=freeze`), with checkpoints every 250 steps and at the detector's
steps (100 and 2,000), where each jaxdt member's dead set is also sought from its
weights alone (`run.py --detect`).

Member order is the order they run in: the members that answer the first
question (is jaxdt inside the torch peer's seed range?) come first.
"""

from jaxdt import study as study_lib

M = study_lib.Member
STEPS = 2000
# The detector (`run.py --detect`) is scored at these steps; checkpoints are kept there.
DETECT_STEPS = (0, 100, 500, 1000, 2000)


def study() -> study_lib.Study:
  members = (
      M("jax_bf16_s42", "jax", seed=42),
      M("torch_s42", "torch", seed=42),
      M("jax_bf16_s1", "jax", seed=1),
      # The 2,000-step twin: torch (f32 route) from jax_bf16_s42's init on its batches.
      M("twin_torch_f32_s42", "torch", seed=42, gemm="f32", twin_of="jax_bf16_s42"),
      # jax_bf16_s42 with torch's CPU LayerNorm backward (bf16-rounded saved statistics,
      # bf16 per-thread sums of the weight and bias gradients, 2 threads): does the op the
      # twins found move the freeze?
      M("jax_lncpu_s42", "jax", seed=42, sets=("model.layernorm_backward=torch_cpu",)),
      M("torch_s1", "torch", seed=1),
      M("jax_lncpu_s1", "jax", seed=1, sets=("model.layernorm_backward=torch_cpu",)),
      # Escaping Fimbulwinter (issue 27): the remedies beside bf16 and mixed.
      M("jax_sr_s42", "jax", seed=42, precision="bf16_sr"),
      M("jax_kahan_s42", "jax", seed=42, precision="bf16_kahan"),
      M("jax_sr_s1", "jax", seed=1, precision="bf16_sr"),
      M("jax_kahan_s1", "jax", seed=1, precision="bf16_kahan"),
      M("jax_bf16_s2", "jax", seed=2),
      M("torch_s2", "torch", seed=2),
      M("jax_bf16_s3", "jax", seed=3),
      M("jax_bf16_s4", "jax", seed=4),
      M("jax_mixed_s42", "jax", seed=42, precision="mixed"),
      M("jax_mixed_s1", "jax", seed=1, precision="mixed"),
      M("jax_lr3e-4_s42", "jax", seed=42, learning_rate=3e-4),
      M("jax_lr3e-4_s1", "jax", seed=1, learning_rate=3e-4),
      M("jax_s42_data1", "jax", seed=42, data_seed=1),
      M("jax_s42_data2", "jax", seed=42, data_seed=2),
      M("jax_s42_data3", "jax", seed=42, data_seed=3),
  )
  jax_seeds = ("jax_bf16_s42", "jax_bf16_s1", "jax_bf16_s2", "jax_bf16_s3", "jax_bf16_s4")
  T = study_lib.Table
  # The lr and data-order tables: the tail as well as the wave (session 14).
  tail = ("frozen_50", "frozen_90", "frozen_99", "frozen_100", "global_last_motion",
          "moving_tail", "stillness_runs", "mean_dwp_l2_late", "copy_rows_moved", "loss_500",
          "final_loss")
  tables = (
      T("seed_spread", "Seed spread: jaxdt against the lab's torch loop",
        (("jaxdt bf16", jax_seeds),
         ("jaxdt bf16, torch's CPU LayerNorm backward", ("jax_lncpu_s42", "jax_lncpu_s1")),
         ("torch (the lab's loop)", ("torch_s42", "torch_s1", "torch_s2"))),
        reference="torch (the lab's loop)"),
      T("master_weights", "Master weights: does f32 master weights (mixed) avoid Fimbulwinter?",
        (("bf16", jax_seeds[:2]), ("mixed", ("jax_mixed_s42", "jax_mixed_s1"))),
        figures=("frozen_50", "frozen_90", "frozen_99", "frozen_100", "moving_last",
                 "mean_dwp_l2_late_bf16", "copy_rows_moved", "copy_elements_moved", "loss_500",
                 "final_loss")),
      T("learning_rate", "lr x wd: lr 1e-3 against 3e-4 (wd 0; wd 0.1 is the identity in "
        "pure bf16)", (("lr 1e-3", jax_seeds[:2]), ("lr 3e-4", ("jax_lr3e-4_s42",
                                                                "jax_lr3e-4_s1"))),
        figures=tail),
      T("data_order", "Data order: one init (seed 42) over four data orders, beside the "
        "seed spread", (("init 42, data_seed 42/1/2/3", ("jax_bf16_s42", "jax_s42_data1",
                                                          "jax_s42_data2", "jax_s42_data3")),
                        ("seeds 1-4 (init and order)", jax_seeds[1:])),
        figures=tail),
  )
  tables += (T("twin", "The twin: torch from jaxdt's init on jaxdt's batches, beside both "
                "frameworks' own seeds", (("jaxdt, seed 42", ("jax_bf16_s42",)),
                                          ("jaxdt, seed 42, torch's CPU LayerNorm backward",
                                           ("jax_lncpu_s42",)),
                                          ("torch twin (f32 route)", ("twin_torch_f32_s42",)),
                                          ("torch, own seeds", ("torch_s42", "torch_s1",
                                                                "torch_s2")))),)
  tables += (T("escaping", "Escaping Fimbulwinter: the precision policies on one init and "
                "data (seeds 42 and 1)", (("bf16", jax_seeds[:2]),
                                          ("mixed (f32 master)", ("jax_mixed_s42", "jax_mixed_s1")),
                                          ("bf16_sr", ("jax_sr_s42", "jax_sr_s1")),
                                          ("bf16_kahan", ("jax_kahan_s42", "jax_kahan_s1"))),
                figures=("frozen_50", "frozen_90", "frozen_99", "frozen_100", "moving_last",
                         "mean_dwp_l2_bf16", "mean_dwp_l2_late_bf16", "copy_rows_moved",
                         "copy_elements_moved", "loss_500", "final_loss", "steps_per_s",
                         "state_bytes_per_param", "detect_recall_last")),)
  return study_lib.Study("findings", members, tables, steps=STEPS, checkpoint_every=250,
                         detect_steps=DETECT_STEPS)
