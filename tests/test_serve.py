"""launch.serve on HF checkpoint directories with a BPE tokenizer: a full tokenizer config and
chat template, or only tokenizer.json with the eos id in config.json."""
import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
import transformers

from tests.hf_checkpoints import save_tiny_qwen2_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(model_path: str):
  process = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--model_path={model_path}", "--port=0",
       "--max_batch=4", "--max_seq_len=64", "--chunk_steps=4"], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  url = []
  reader = threading.Thread(target=lambda: url.extend(
      line.split()[1] for line in iter(process.stdout.readline, "") if line.startswith("serving")),
      daemon=True)
  reader.start()
  reader.join(timeout=180)
  if not url:
    process.kill()
    raise RuntimeError(f"launch.serve did not start: {process.stderr.read()[-2000:]}")
  return process, url[0]


def _post(url: str, body: dict) -> dict:
  request = urllib.request.Request(url, json.dumps(body).encode(),
                                   {"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=120) as response:
    return json.load(response)


@pytest.mark.slow
@pytest.mark.parametrize("with_special_config", [True, False])
def test_serve_starts_on_a_bpe_checkpoint_and_answers_text(tmp_path, with_special_config):
  config = save_tiny_qwen2_checkpoint(str(tmp_path), with_special_config)
  process, url = _serve(str(tmp_path))
  try:
    out = _post(url + "/generate", {"text": "6 * 7 =", "sampling_params": {
        "temperature": 0, "max_new_tokens": 5, "ignore_eos": True}})
  finally:
    process.kill()
    process.wait()
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(str(tmp_path), "tokenizer.json"))
  assert out["meta_info"]["prompt_tokens"] == len(hf_tok("6 * 7 =").input_ids)
  assert len(out["output_ids"]) == 5
  assert out["text"] == hf_tok.decode(out["output_ids"], skip_special_tokens=True)
  assert config.eos_token_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
