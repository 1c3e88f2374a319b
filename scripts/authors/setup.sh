#!/usr/bin/env bash
# Creates .venv-authors with the authors' own package (PyPI codebook-features 0.1.2, the code
# behind the paper) and the old pins it needs. It has our import name, so it lives in a venv of
# its own; only scripts/authors/make_fixtures.py uses it. Idempotent.
#   PYTHON=python3.11  which interpreter makes the venv (the package needs Python < 3.12)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=.venv-authors
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -r scripts/authors/requirements.txt
# transformer-lens 1.7 pulls an old triton that breaks torch 2.13's compiler imports (CPU here).
"$VENV/bin/python" -m pip uninstall -q -y triton || true
