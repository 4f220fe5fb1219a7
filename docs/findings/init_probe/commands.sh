#!/bin/bash
# which of a seed's draws carries the 50% milestone gap (jaxdt 393 vs torch 441 at seed 42)?
. /work/venv/bin/activate
cd /work/twins_tree
P="python -m torchref.peer --seed=42 --steps=470 --probes=freeze --gemm=native --checkpoint_every=0"
J=/work/runs/findings/jax_bf16_s42
echo "=== jaxinit (jaxdt's init, torch's DataLoader order) $(date)"
$P --output_dir=/work/runs/probe2x2/jaxinit_s42 --init_from=$J 2>&1 | grep -v Warn
echo "=== jaxorder (torch's init, jaxdt's batch order) $(date)"
$P --output_dir=/work/runs/probe2x2/jaxorder_s42 --batches_from=$J 2>&1 | grep -v Warn
echo "=== done $(date)"
