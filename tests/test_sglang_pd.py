"""launch/scripts/sglang_pd.sh in dry-run mode: the prefill, decode and router commands of a
Mooncake prefill-decode deployment, and the rollout.urls that points the RL loop at the router.
The flag names are SGLang's (python/sglang/srt/server_args.py, sglang_router launch_router)."""
import os
import shlex
import subprocess

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                      "scripts", "sglang_pd.sh")


def dry_run(**env):
  result = subprocess.run(["bash", SCRIPT], env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30)
  return result


def flag(argv, name):
  return argv[argv.index(name) + 1]


def test_commands_start_prefill_decode_and_router_over_mooncake():
  result = dry_run(MODEL_PATH="/ckpt/hf v3", PREFILL_GPUS="2", DECODE_GPUS="4", HOST="10.0.0.5",
                   IB_DEVICE="mlx5_0", ROUTER_PORT="9000")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  prefill, decode, router = (shlex.split(line) for line in lines[:3])
  for server, mode, port in ((prefill, "prefill", "30000"), (decode, "decode", "30001")):
    assert server[:3] == ["python", "-m", "sglang.launch_server"]
    assert flag(server, "--model-path") == "/ckpt/hf v3"  # quoted through the shell
    assert flag(server, "--disaggregation-mode") == mode
    assert flag(server, "--disaggregation-transfer-backend") == "mooncake"
    assert flag(server, "--disaggregation-ib-device") == "mlx5_0"
    assert flag(server, "--port") == port and flag(server, "--host") == "10.0.0.5"
  assert (flag(prefill, "--tp-size"), flag(prefill, "--base-gpu-id")) == ("2", "0")
  assert (flag(decode, "--tp-size"), flag(decode, "--base-gpu-id")) == ("4", "2"), \
      "decode GPUs follow the prefill GPUs"
  bootstrap = flag(prefill, "--disaggregation-bootstrap-port")
  assert router[:4] == ["python", "-m", "sglang_router.launch_router", "--pd-disaggregation"]
  assert router[router.index("--prefill") + 1:router.index("--prefill") + 3] == [
      "http://10.0.0.5:30000", bootstrap]
  assert flag(router, "--decode") == "http://10.0.0.5:30001" and flag(router, "--port") == "9000"
  assert lines[3] == "rollout.urls=('http://10.0.0.5:9000',)"


def test_model_path_is_required():
  result = dry_run()
  assert result.returncode != 0 and "set MODEL_PATH" in result.stderr
