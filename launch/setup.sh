#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch and distseq[dev] installed (editable).
#   TORCH_SPEC   the torch requirement to install first (default: torch==2.13.0, the CPU wheel on these machines;
#                on a GPU machine pick the CUDA build you want)
#   PYTHON       the interpreter for the venv (default: python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
