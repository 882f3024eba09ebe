#!/usr/bin/env bash
# Verify every collective on this node (values, exact bytes, bandwidth) before a long run.
#   NPROC   ranks to start (default: GPUs on this node, else 4 CPU ranks on gloo)
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
nproc=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 4)}
exec .venv/bin/torchrun --standalone --nproc-per-node "$nproc" -m distseq check "$@"
