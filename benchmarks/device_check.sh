#!/usr/bin/env bash
# The accelerator checks in one prepared script (under 8 minutes on one GPU): run it where a GPU
# is lent, from the repository root, with the embedded default data carried along:
#
#   python run.py --experiment=flannel_data --data_dir=.device_data   # here, once (CPU)
#   bash benchmarks/device_check.sh .device_data [OUT]                # there
#
# It prints, each under its own heading, with the figures BUILD_NOTES records:
#   1. the fast parity subset on the GPU (AdamW bits against torch, subnormal moments included);
#   2. crucible1 at full size for 1,000 steps on the GPU, with steps/s;
#   3. --compare of the GPU's first 200 steps against the CPU's (first differing step, bit
#      fractions, per-step divergence);
#   4. a 64-member seed sweep (fast mode) and its member-steps/s;
#   5. the GPU's arithmetic fingerprint, and the CPU's beside it.
# Nothing in CI depends on it. Python packages are the machine's own (it cannot install);
# their versions are printed first, since they differ from the pins.
set -u
DATA=${1:?usage: device_check.sh DATA_DIR [OUT]}
OUT=${2:-${OUT:-/tmp/device_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
step() { echo; echo "=== $1 ($(date +%T))"; }
ts() { /usr/bin/time -f "wall %e s" "$@"; }

step "host"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
grep -m1 "model name" /proc/cpuinfo; nproc
$PY -c "import jax, jaxlib, numpy, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| numpy', numpy.__version__)"

step "1. parity subset on the GPU (timeout 150 s)"
JAX_PLATFORMS=cuda timeout 150 $PY -m pytest -x -q -p no:cacheprovider \
  tests/parity/optim_parity_test.py -k "bitwise or subnormal_range or lerp" 2>&1 | tail -5

step "2. crucible1, full size, 1000 steps on the GPU (timeout 150 s)"
rm -rf "$OUT/gpu1000"
JAX_PLATFORMS=cuda timeout 150 $PY run.py --experiment=crucible1 --steps=1000 --noprogress \
  --data_dir="$DATA" --output_dir="$OUT/gpu1000" 2>&1 | grep -E "compiled|Final loss|Last motion|error" 
$PY - "$OUT/gpu1000" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1] + "/metadata.json"))
print(f"wall {m['wall_time_s']:.1f} s for {m['steps_completed']} steps (compile included): "
      f"{m['steps_completed'] / m['wall_time_s']:.2f} steps/s; backend {m['backend']} {m['device_kind']}")
EOF

step "3. GPU against CPU, 200 steps (timeout 180 s)"
rm -rf "$OUT/gpu200" "$OUT/cpu200"
JAX_PLATFORMS=cuda timeout 60 $PY run.py --experiment=crucible1 --steps=200 --noprogress \
  --data_dir="$DATA" --output_dir="$OUT/gpu200" > /dev/null 2>&1 &
JAX_PLATFORMS=cpu timeout 170 $PY run.py --experiment=crucible1 --steps=200 --noprogress \
  --data_dir="$DATA" --output_dir="$OUT/cpu200" > /dev/null 2>&1
wait
timeout 60 $PY run.py --compare="$OUT/cpu200,$OUT/gpu200" --analysis_dir="$OUT/compare" 2>&1 \
  | sed -n '1,40p'

step "4. 64-member seed sweep, fast mode, 20 steps (timeout 90 s)"
rm -rf "$OUT/sweep64"
SEEDS=$(seq -s, 1 64)
JAX_PLATFORMS=cuda timeout 90 $PY run.py --experiment=crucible1 --steps=20 --noprogress \
  --sweep="seed=$SEEDS" --sweep_mode=fast --data_dir="$DATA" --output_dir="$OUT/sweep64" \
  --set store.chunk_steps=10 2>&1 | grep -E "compiled|error" | head -3
$PY - "$OUT/sweep64" <<'EOF'
import glob, json, sys
ms = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/m*/metadata.json")]
wall = max(m["wall_time_s"] or 0 for m in ms)
print(f"{len(ms)} members x 20 steps in {wall:.1f} s: {len(ms) * 20 / wall:.1f} member-steps/s "
      "(one process, compile included)")
EOF

step "5. fingerprints"
JAX_PLATFORMS=cuda timeout 60 $PY run.py --fingerprint
JAX_PLATFORMS=cpu timeout 60 $PY run.py --fingerprint
