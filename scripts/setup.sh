#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Idempotent.
#   PYTHON=python3.11  which interpreter makes the venv
#   TORCH_SPEC=...     the torch to install when the venv has none (default torch==2.13.0:
#                      the CPU build where a local wheel exists, else PyPI's build for this OS)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# Install torch first, pinned, so that the open range in pyproject.toml never pulls a
# multi-GB build on a machine that already has a suitable one.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
