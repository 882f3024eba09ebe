#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with torch and distseq[dev] installed (editable).
#   TORCH_SPEC   the torch requirement(s) to install first (default: torch==2.13.0, the CPU wheel on these
#                machines; on a GPU machine pick the CUDA build you want; distseq supports torch 2.11 - 2.14)
#   PYTHON       the interpreter for the venv (default: python3.11, else python3)
#   VENV         where the environment goes (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
# shellcheck disable=SC2086  # TORCH_SPEC may name several requirements (torch==2.11.0 triton==3.6.0)
"$venv/bin/python" -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
