#!/usr/bin/env bash
# N JAX processes on this machine forming one job: 8/N fake CPU devices each, gloo collectives,
# coordinator on 127.0.0.1. Waits for all; exits non-zero if any process fails.
# Usage: launch/scripts/local_cluster.sh 2 train_rl --config=experiments/rl_arith.py:smoke \
#            --workdir=runs/mh --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
# Process i's output goes to stdout with an "[i]" prefix. PORT (default 12355) picks the port,
# PYTHON (default .venv/bin/python) the interpreter; DRY_RUN=1 prints the commands instead.
set -euo pipefail
N=$1; ENTRY=$2; shift 2
if (( 8 % N )); then echo "local_cluster.sh: N=$N must divide 8" >&2; exit 2; fi
PORT=${PORT:-12355}
PYTHON=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$((8 / N))
       "$PYTHON" -m "launch.$ENTRY" --coordinator_address="127.0.0.1:$PORT" --num_processes="$N"
       --process_id="$i" "$@")
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; continue; fi
  "${cmd[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
