#!/usr/bin/env bash
# Run one entry point on every worker of a Cloud TPU pod slice (all hosts at once, over ssh).
# Usage: launch/scripts/tpu_pod.sh TPU_NAME ZONE train_rl --config=experiments/rl_arith.py:small \
#            --workdir=gs://BUCKET/runs/exp1
# Every host runs the same command; --multihost makes each call jax.distributed.initialize(),
# which discovers the pod topology from the TPU metadata. DRY_RUN=1 prints the command instead.
set -euo pipefail
TPU_NAME=$1; ZONE=$2; ENTRY=$3; shift 3
REPO_DIR=${REPO_DIR:-'~/kimi_jax'}  # expanded on the workers
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command
     "cd $REPO_DIR && .venv/bin/python -m launch.$ENTRY --multihost $(printf '%q ' "$@")")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
"${cmd[@]}"
