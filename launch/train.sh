#!/usr/bin/env bash
# Train on this node: launch/train.sh configs/runs/<name>.yaml [key=value ...]
#   NPROC     ranks to start (default: GPUs on this node, else 4 CPU ranks on gloo)
#   DRY_RUN   1: print the torchrun command instead of running it
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ]; then
    echo "usage: launch/train.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
config=$1
shift
# A relative config is relative to where the caller stands; the job itself runs from the repository root.
[[ $config = /* || $PWD = "$repo" ]] || config=$PWD/$config
cd "$repo"
if [ -z "${NPROC:-}" ]; then
    gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
    NPROC=$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 4)
fi
cmd=(.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m distseq train --config "$config" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
else
    exec "${cmd[@]}"
fi
