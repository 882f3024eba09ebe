#!/usr/bin/env bash
# Train across nodes without SLURM: run on every node, same config and overrides, different NODE_RANK:
#   launch/multinode.sh configs/runs/<name>.yaml [key=value ...]
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's index, 0..NNODES-1; node 0 hosts the rendezvous store (required)
#   MASTER_ADDR     host name or address of node 0, reachable from every node (required)
#   MASTER_PORT     free TCP port on node 0 (default 29500)
#   NPROC_PER_NODE  ranks per node (default: GPUs on this node, else 4 CPU ranks on gloo)
#   RDZV_ID         the run's id, the same on every node; workers see it as TORCHELASTIC_RUN_ID (default distseq)
#   DRY_RUN         1: print the torchrun command instead of running it
# Uses torchrun's static rendezvous (as `python -m distseq.launch slurm` does): node NODE_RANK holds global ranks
# NODE_RANK*NPROC_PER_NODE onwards.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ]; then
    echo "usage: launch/multinode.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
missing=()
for name in NNODES NODE_RANK MASTER_ADDR; do
    [ -n "${!name:-}" ] || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "launch/multinode.sh: set ${missing[*]} (the header of launch/multinode.sh lists the variables)" >&2
    exit 2
fi
if ! [[ $NNODES =~ ^[1-9][0-9]*$ && $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "launch/multinode.sh: need NNODES >= 1 and 0 <= NODE_RANK < NNODES, got NNODES=$NNODES NODE_RANK=$NODE_RANK" >&2
    exit 2
fi
config=$1
shift
[[ $config = /* || $PWD = "$repo" ]] || config=$PWD/$config
cd "$repo"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
    NPROC_PER_NODE=$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 4)
fi
cmd=(.venv/bin/torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
    --rdzv-backend static --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-distseq}"
    -m distseq train --config "$config" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
else
    exec "${cmd[@]}"
fi
