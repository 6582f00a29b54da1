"""launch.serve on HF checkpoint directories with a BPE tokenizer: a full tokenizer config and
chat template, or only tokenizer.json with the eos id in config.json."""
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
import transformers

from tests.hf_checkpoints import save_tiny_qwen2_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(model_path: str, max_seq_len: int = 64):
  """Start `launch.serve` on `model_path`; (process, url) once it prints "serving <url>"."""
  stderr = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and stall the server
  process = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--model_path={model_path}", "--port=0",
       "--max_batch=4", f"--max_seq_len={max_seq_len}", "--chunk_steps=4"], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=stderr, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  url = []
  reader = threading.Thread(target=lambda: url.extend(
      line.split()[1] for line in iter(process.stdout.readline, "") if line.startswith("serving")),
      daemon=True)
  reader.start()
  deadline = time.monotonic() + 180  # start-up on a loaded 2-core machine
  while not url and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  if not url:
    process.kill()
    stderr.seek(0)
    raise RuntimeError(f"launch.serve did not start: {stderr.read()[-2000:]}")
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


def _call(url: str, path: str, body: dict | None = None, method: str = "POST"):
  """(status, JSON body or text) without raising on 4xx."""
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"},
                                   method=method)
  try:
    response = urllib.request.urlopen(request, timeout=120)
  except urllib.error.HTTPError as error:
    response = error
  with response:
    text = response.read().decode()
    is_json = response.headers.get_content_type() == "application/json"
    return response.status, json.loads(text) if is_json else text


@pytest.mark.slow
def test_every_sglang_and_openai_call_of_the_rl_frameworks_works_on_launch_serve(tmp_path):
  """Issue 16's calls 1-7 against `python -m launch.serve` on a BPE checkpoint with a chat
  template (their exact numerics are tested in-process in tests/rollout)."""
  import openai

  from kimi_jax.rollout.sglang_client import SGLangClient
  from tests.rollout.test_server_client import request_fixture

  save_tiny_qwen2_checkpoint(str(tmp_path))
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  process, url = _serve(str(tmp_path))
  try:
    info = _call(url, "/get_server_info", method="GET")[1]  # 1. slime's external-engine check
    expected = request_fixture("slime_external_engine_check.json")["expected"]
    assert {k: info[k] for k in expected} == expected and info["model_path"] == str(tmp_path)
    frontend = request_fixture("sglang_frontend.json")["body"]  # 2. sampling params
    frontend["sampling_params"].update(stop=["####"], repetition_penalty=1.2,
                                       frequency_penalty=0.5, min_new_tokens=2,
                                       custom_params={"x": 1})
    status, answer = _call(url, "/generate", frontend)
    assert status == 200 and len(answer["output_ids"]) >= 2 and "text" in answer
    assert _call(url, "/generate", {"text": "a", "sampling_params": {"regex": "a+"}})[0] == 400
    assert _call(url, "/release_memory_occupation", {"tags": ["kv_cache", "weights"]}) == (200, None)
    assert _call(url, "/generate", {"text": "a"})[0] == 400  # 3. released until resumed
    assert _call(url, "/resume_memory_occupation", {}) == (200, None)
    status, scored = _call(url, "/generate", {  # 4. input and top log-probs
        "text": "6 * 7 =", "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
        "token_ids_logprob": [5, 6], "return_text_in_logprobs": True,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    meta = scored["meta_info"]
    assert status == 200 and len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert len(meta["output_top_logprobs"]) == len(scored["output_ids"])
    assert meta["output_token_logprobs"][0][2] == hf_tok.decode([scored["output_ids"][0]])
    status, batch = _call(url, "/generate", {  # 5. rid expansion, n copies, text
        "text": ["1 +", "2 +"], "rid": "job", "sampling_params": {"max_new_tokens": 2}})
    assert [a["meta_info"]["id"] for a in batch] == ["job_0", "job_1"]
    assert all(isinstance(a["text"], str) for a in batch)
    copies = _call(url, "/generate", {"text": "1 +", "sampling_params": {"max_new_tokens": 2,
                                                                          "n": 3}})[1]
    assert len({a["meta_info"]["id"] for a in copies}) == 3
    assert _call(url, "/pause_generation", {"mode": "in_place"})[0] == 200
    assert _call(url, "/flush_cache", {})[0] == 200
    assert _call(url, "/continue_generation", {})[0] == 200
    assert _call(url, "/health_generate", method="GET")[0] == 200

    async def load():  # 6. the client's load on /v1/loads
      async with SGLangClient([url]) as client:
        return await client.load(url)
    assert asyncio.run(load()) == 0
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)  # 7. OpenAI
    messages = [{"role": "user", "content": "6 * 7 ="}]
    reply = client.chat.completions.create(model=str(tmp_path), messages=messages, max_tokens=4,
                                           temperature=0, logprobs=True)
    template_ids = hf_tok(hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=False),
                          add_special_tokens=False).input_ids
    assert reply.usage.prompt_tokens == len(template_ids)
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [str(tmp_path)]
    client.close()
  finally:
    process.kill()
    process.wait()
