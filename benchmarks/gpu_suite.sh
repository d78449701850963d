#!/usr/bin/env bash
# Every GPU row of benchmarks/README.md in one run (about 8 minutes on one H100/H200).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      # default: $OUT, else /tmp/gpu_suite
#
# Writes OUT_DIR/results.jsonl (every JSON line the benchmarks print, each tagged with its
# row) and one log per row. A row that fails or runs past its time limit is recorded as
# {"row": ..., "error": ...} and the suite goes on. Wheels for packages the machine lacks
# (benchmarks/gpu_wheels.sh, run beforehand where pip reaches PyPI) are installed from .whl/
# when that folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_suite}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

row() {  # row NAME LIMIT_S SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" python3 "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep '^{' "$out/$name.log" | sed "s/^{/{\"row\": \"$name\", /" >>"$out/results.jsonl"
  if [ "$rc" -ne 0 ]; then
    echo "{\"row\": \"$name\", \"error\": \"exit $rc\", \"tail\": \"$(tail -c 300 "$out/$name.log" |
      tr -d '"\\' | tr '\n' ' ')\"}" >>"$out/results.jsonl"
  fi
  tail -n 3 "$out/$name.log"
}

B16=(--variant B/16 --head rankseg --resolution 512 --dtype bfloat16 --steps 10 --warmup 3)
row b16_bs8_auto 120 benchmarks/train_step.py "${B16[@]}" --batch 8 --attention auto
row b16_bs8_xla 120 benchmarks/train_step.py "${B16[@]}" --batch 8 --attention xla --skip-forward
row b16_bs32_auto 120 benchmarks/train_step.py "${B16[@]}" --batch 32 --attention auto --skip-forward
row b16_bs64_auto 150 benchmarks/train_step.py "${B16[@]}" --batch 64 --attention auto --skip-forward
row l16_640_bs8 150 benchmarks/train_step.py --variant L/16 --head rankseg --resolution 640 \
  --batch 8 --dtype bfloat16 --attention auto --remat none --steps 5 --warmup 2 --skip-forward
row deeplab_r101_rankseg_bs16 240 benchmarks/train_step.py --config configs/deeplabv3.py \
  --resolution 512 --batch 16 --dtype bfloat16 --steps 5 --warmup 2 --skip-forward
row eval_2000 150 benchmarks/eval.py --variant B/16 --head rankseg --resolution 512 \
  --dtype bfloat16 --images 2000 --window-batch 16
row input_pipeline 90 benchmarks/input_pipeline.py --workers 8,16 --images 512
echo "results: $out/results.jsonl"
