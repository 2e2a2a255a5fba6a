#!/usr/bin/env bash
# The GPU checks of crossmatch, in one go (under 5 minutes on one recent card):
#   1. the card (torch.cuda.get_device_name, nvidia-smi when present);
#   2. SCAN scoring on CUDA against the per-caption reference loop, and the bf16 scoring path's error and
#      speed against fp32 (benchmarks/scan_scoring.py --device cuda);
#   3. one bf16 training epoch of a shapes recipe (SCAN, box regions) under torchrun --nproc_per_node=1,
#      with its steps/s, data-wait share and peak memory (from the run's train.log);
#   4. the mixed-precision tests, which run on CUDA when it is there (train.device=auto).
# Usage: bash benchmarks/gpu_check.sh [WORK_DIR]   (run from the repository root; the venv's python or
# $PYTHON). Without a CUDA device it stops at once with exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
WORK=${1:-$(mktemp -d -t crossmatch_gpu.XXXXXX)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch (make the venv with 'make test', or set PYTHON=...)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device: torch.cuda.is_available() is False (torch $("$PY" -c \
    'import torch; print(torch.__version__ + ", CUDA build " + str(torch.version.cuda))')); nothing checked" >&2
  exit 1
fi

echo "== card ($(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start)"
"$PY" - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name(0)}: {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
      f"{torch.cuda.device_count()} device(s); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv || true

echo "== SCAN scoring on CUDA (fp32 and bf16 GEMM) against the per-caption loop"
"$PY" benchmarks/scan_scoring.py --device cuda --repeats 10 --bf16

echo "== one bf16 training epoch under torchrun --nproc_per_node=1"
DATA="$WORK/shapes"
[ -f "$DATA/dataset.json" ] || "$PY" -m crossmatch data shapes --out "$DATA" --train 5000 --val 500 --test 500
"$TORCHRUN" --standalone --nproc_per_node=1 -m crossmatch train configs/scan_shapes_boxes.yaml \
  --run-dir "$WORK/run" --overwrite data.root="$DATA" data.num_workers=4 train.epochs=1 \
  train.precision=bf16 eval.precision=same train.log_every=10 train.device=cuda >"$WORK/train.out" 2>&1 \
  || { tail -20 "$WORK/train.out"; exit 1; }
grep -E "steps_per_s|peak memory" "$WORK/run/train.log" | tail -3 | sed 's/^.*INFO [a-z.]*: //'

echo "== mixed-precision tests on CUDA"
"$PY" -m pytest -q tests/engine/test_trainer.py -k "mixed_precision" -p no:cacheprovider
"$PY" -m pytest -q tests/data/test_datasets_throughput.py tests/models/test_scan_scoring.py -p no:cacheprovider -x -q 2>&1 | tail -2

echo "== gpu_check done in $(( $(date +%s) - start )) s (work dir $WORK; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg))"
