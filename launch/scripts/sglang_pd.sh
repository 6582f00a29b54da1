#!/usr/bin/env bash
# Prefill-decode disaggregated SGLang on one GPU node: a prefill server and a decode server that
# hand KV caches over through the Mooncake transfer engine (RDMA), behind sglang_router in PD
# mode. The RL loop then talks to the router only:
#   --config.rollout.backend=sglang --config.rollout.urls="('http://HOST:ROUTER_PORT',)"
# Weight updates (/update_weights_from_disk) and release/resume go to each server directly; the
# router forwards /generate (prefill to one, decode to the other, one request id).
#
# Usage: MODEL_PATH=/ckpt/hf launch/scripts/sglang_pd.sh
#   PREFILL_GPUS / DECODE_GPUS (default 1 / 1): GPUs per server (tensor parallel size), decode
#   after prefill on the node; IB_DEVICE: RDMA NIC for Mooncake (e.g. mlx5_0; unset: auto);
#   HOST, PREFILL_PORT, DECODE_PORT, BOOTSTRAP_PORT, ROUTER_PORT; DRY_RUN=1 prints the three
#   commands (one per line) instead of starting them.
set -euo pipefail
: "${MODEL_PATH:?set MODEL_PATH to an HF checkpoint directory}"
PREFILL_GPUS=${PREFILL_GPUS:-1}
DECODE_GPUS=${DECODE_GPUS:-1}
HOST=${HOST:-127.0.0.1}
PREFILL_PORT=${PREFILL_PORT:-30000}
DECODE_PORT=${DECODE_PORT:-30001}
BOOTSTRAP_PORT=${BOOTSTRAP_PORT:-8998}
ROUTER_PORT=${ROUTER_PORT:-8000}
IB=()
if [[ -n "${IB_DEVICE:-}" ]]; then IB=(--disaggregation-ib-device "$IB_DEVICE"); fi

COMMON=(--model-path "$MODEL_PATH" --host "$HOST" --disaggregation-transfer-backend mooncake
        "${IB[@]}")
PREFILL=(python -m sglang.launch_server "${COMMON[@]}" --disaggregation-mode prefill
         --port "$PREFILL_PORT" --disaggregation-bootstrap-port "$BOOTSTRAP_PORT"
         --tp-size "$PREFILL_GPUS" --base-gpu-id 0)
DECODE=(python -m sglang.launch_server "${COMMON[@]}" --disaggregation-mode decode
        --port "$DECODE_PORT" --tp-size "$DECODE_GPUS" --base-gpu-id "$PREFILL_GPUS")
ROUTER=(python -m sglang_router.launch_router --pd-disaggregation
        --prefill "http://$HOST:$PREFILL_PORT" "$BOOTSTRAP_PORT"
        --decode "http://$HOST:$DECODE_PORT" --host "$HOST" --port "$ROUTER_PORT")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for cmd in PREFILL DECODE ROUTER; do
    declare -n argv=$cmd
    printf '%q ' "${argv[@]}"; echo
  done
  echo "rollout.urls=('http://$HOST:$ROUTER_PORT',)"
  exit 0
fi

"${PREFILL[@]}" & PREFILL_PID=$!
"${DECODE[@]}" & DECODE_PID=$!
trap 'kill $PREFILL_PID $DECODE_PID 2>/dev/null' EXIT
for port in "$PREFILL_PORT" "$DECODE_PORT"; do  # the router needs both servers up
  until curl -sf "http://$HOST:$port/health" >/dev/null; do sleep 5; done
done
"${ROUTER[@]}"
