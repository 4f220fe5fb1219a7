#!/usr/bin/env bash
# The findings study on a lent GPU, in one prepared script: both frameworks natively in bf16
# (jaxdt members on JAX's GPU backend, fresh ones of one structure as exact sweeps; the lab's
# torch loop as `torchref.peer --device=cuda`). Only the members' summaries come back (small
# JSON under OUT/findings_gpu); the run folders stay on the machine (RUNS).
#
#   python run.py --experiment=flannel_data --data_dir=.device_data   # here, once (CPU)
#   bash benchmarks/device_study.sh .device_data [OUT] [SECONDS] [RUNS]  # there
#
# then here, with the summaries brought back:
#   mkdir -p docs/findings_gpu && cp OUT/findings_gpu/*.json docs/findings_gpu/
#   python run.py --study=findings --study_tables --study_docs=docs/findings_gpu
#
# Stages, most wanted first (the fidelity question, then the open questions): jaxdt bf16
# seeds 42/1/2/3/4 (one sweep), the torch loop seeds 42/1/2, then every other member but
# the CPU twin (its f32 GEMM route is a CPU route; on the GPU both frameworks are native).
# The whole script stops after SECONDS (default 500): a member that finished has its summary
# (each is written as it lands); a rerun with the same RUNS resumes the rest, skipping the
# done ones by their checksums. Every row's host column says which GPU gave it.
# Nothing in CI depends on this script. Python packages are the machine's own.
# DEVICE=cpu runs the same plumbing on a CPU (a smoke check of the script, not a study).
set -u
DATA=${1:?usage: device_study.sh DATA_DIR [OUT] [SECONDS] [RUNS]}
OUT=${2:-${OUT:-/tmp/device_study}}
BUDGET=${3:-500}
RUNS=${4:-/tmp/findings_gpu_runs}
PY=${PYTHON:-python3}
DOCS="$OUT/findings_gpu"
mkdir -p "$DOCS" "$RUNS"
DEVICE=${DEVICE:-cuda}
# JAX and torch share the GPU (the torch members are child processes of the study).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
[ "$DEVICE" = cuda ] && export JAX_PLATFORMS=cuda
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stage() {  # stage NAME MEMBERS [FLAGS...]: one study invocation within the time left
  local name=$1 members=$2; shift 2
  local secs; secs=$(left)
  echo; echo "=== $name ($(date +%T), ${secs} s left)"
  if [ "$secs" -le 20 ]; then echo "skipped: out of time"; return; fi
  timeout --signal=INT --kill-after=15 "$secs" $PY run.py --study=findings --study_dir="$RUNS" \
    --study_docs="$DOCS" --study_torch_device="$DEVICE" --data_dir="$DATA" \
    --study_members="$members" "$@" 2>&1 | grep -vE "UserWarning|self.transformer" | tail -25
}

echo "=== host"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
grep -m1 "model name" /proc/cpuinfo; nproc
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"

stage "1. jaxdt bf16, seeds 42/1/2/3/4 (one exact sweep)" \
  jax_bf16_s42,jax_bf16_s1,jax_bf16_s2,jax_bf16_s3,jax_bf16_s4 --study_sweep
stage "2. the lab's torch loop on the GPU, seeds 42/1/2" torch_s42,torch_s1,torch_s2
stage "3. the other members (sweeps where they share a structure)" \
  jax_s42_data1,jax_s42_data2,jax_s42_data3,jax_lr3e-4_s42,jax_lr3e-4_s1,jax_mixed_s42,jax_mixed_s1,jax_sr_s42,jax_sr_s1,jax_kahan_s42,jax_kahan_s1,jax_lncpu_s42,jax_lncpu_s1 \
  --study_sweep

echo; echo "=== summaries in $DOCS ($(ls "$DOCS"/*.json 2>/dev/null | wc -l) members, $(( $(date +%s) - T0 )) s)"
$PY run.py --study=findings --study_tables --study_docs="$DOCS" > /dev/null 2>&1
sed -n '/^### Seed spread/,/^!\[/p' "$DOCS/tables.md" 2>/dev/null | head -40
