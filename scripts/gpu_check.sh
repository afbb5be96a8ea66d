#!/usr/bin/env bash
# The GPU checks of the GPU path and of models beyond one rank, on one CUDA device, as one run.
#
#   bash scripts/gpu_check.sh [core|bench|offload|all]     (default: core + bench, ~7 minutes on an H200)
#
# core:    the CUDA tests (GPU-vs-CPU parity of the first 5 losses, no host sync in step(), offload to
#          pinned host memory, meta construction, device-agnostic checkpoints, initialize() placement),
#          `zerotrain train` on the GPU with its utilisation sampled, the DeepSpeed example on cuda
# bench:   bench/gpu.py (plain PyTorch, FSDP2, zerotrain stages 0-3; micro-batch 8 and 1)
# offload: bench/offload_gpu.py (largest GPT with and without offload, offload's cost at 1.3B)
# Logs and results go to $OUT (default /tmp/gpu_check). On a machine whose python3 lacks pydantic,
# carry wheels in .whl (bash ../shared/tools/offline-gpu-wheels.sh) and they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
what=${1:-default}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, zerotrain; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

core() {
  python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu 2>&1 | tee "$OUT/cuda_tests.log"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/train_util.csv" &
  smi=$!
  python3 -m zerotrain.cli train --runs-dir /tmp/gpu_runs --run-name gpu --steps 300 --fresh 2>&1 \
    | tee "$OUT/train.log" | tail -40
  kill $smi
  python3 - "$OUT/train_util.csv" <<'PY' | tee "$OUT/train_util.txt"
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))[1:]
util = [int(r[1].strip().split()[0]) for r in rows if len(r) > 2]
mem = [int(r[2].strip().split()[0]) for r in rows if len(r) > 2]
print(f"GPU utilisation during zerotrain train: max {max(util, default=0)} %, mean {sum(util) / max(len(util), 1):.0f} %;"
      f" memory used max {max(mem, default=0)} MiB over {len(util)} samples")
PY
  printf '{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}}' > /tmp/ds.json
  python3 - <<'PY' 2>&1 | tee "$OUT/deepspeed_example.log"
import sys, torch, zerotrain
sys.path.insert(0, "examples")
import deepspeed_train
seen, initialize = {}, zerotrain.initialize
def spy(*args, **kwargs):
    out = initialize(*args, **kwargs)
    seen["device"] = out[0].device
    seen["params"] = {str(p.device) for p in out[0].module.parameters()}
    return out
zerotrain.initialize = spy
losses = deepspeed_train.main(["--deepspeed_config", "/tmp/ds.json", "--steps", "4"])
print("DeepSpeed example: engine.device", seen["device"], "parameters on", seen["params"], "losses", losses)
assert seen["device"].type == "cuda" and seen["params"] == {str(seen["device"])}
PY
}

case "$what" in
  core) core ;;
  bench) python3 bench/gpu.py --out "$OUT/gpu" 2>&1 | tee "$OUT/bench_gpu.log" ;;
  offload) python3 bench/offload_gpu.py --out "$OUT/offload_gpu" 2>&1 | tee "$OUT/offload_gpu.log" ;;
  all) core; python3 bench/gpu.py --out "$OUT/gpu" 2>&1 | tee "$OUT/bench_gpu.log"
       python3 bench/offload_gpu.py --out "$OUT/offload_gpu" 2>&1 | tee "$OUT/offload_gpu.log" ;;
  *) core; python3 bench/gpu.py --out "$OUT/gpu" 2>&1 | tee "$OUT/bench_gpu.log" ;;
esac
