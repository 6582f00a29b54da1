"""/generate with SGLang's `image_data` on a tiny VLM checkpoint directory, over real HTTP.

The server is built from the directory as launch.serve builds it (HF weights, tokenizer with
vision tokens, preprocessor_config.json); answers equal the engine fed the same prompt through
`encode_prompt_with_images` (greedy, so token for token), whichever form the image takes (base64,
data URL, file path) and whether the ids carry one image pad per image or runs already expanded;
log-probs are compared too, since greedy tokens of a random model can ignore the image.
"""
import asyncio

import numpy as np
import openai
import pytest

from kimi_jax.checkpointing.hf import load_hf, save_hf
from kimi_jax.data import image_prompts, images, rendered
from kimi_jax.rollout.engine import RolloutEngine, SamplingParams
from kimi_jax.rollout.server import BackgroundServer, RolloutServer
from tests.rollout.test_server_client import http
from tests.tiny_vlm import PROCESSING, TEMPLATE, encoded, model, tokenizer
from tests.test_serve import _post, _serve

CHART = rendered.render_chart((3, 8, 1, 5), rendered.ChartLayout())
STRIP = rendered.render_text("7+5-3=", 6)
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
LOGPROB_ATOL = 1e-5  # the same engine programs on both sides; only batching differs


def save_vlm_checkpoint(path: str) -> None:
  config, params = model()
  save_hf(path, config, params, tokenizer=tokenizer())
  images.save_image_processing(path, PROCESSING)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vlm"))
  save_vlm_checkpoint(path)
  config, params = load_hf(path)
  engine = RolloutEngine(config, params, max_batch=8, max_seq_len=96, chunk_steps=4)
  background = BackgroundServer(RolloutServer(
      engine, tokenizer=tokenizer(), model_path=path,
      image_processing=images.load_image_processing(path)))
  yield background.url, path
  background.stop()


def expected_output(question, pictures):
  """(output ids, their log-probs) of the engine on the encoded prompt."""
  config, params = model()
  inputs = encoded(question, pictures)
  engine = RolloutEngine(config, params, max_batch=4, max_seq_len=96)
  (completion,) = engine.generate([inputs.ids], SamplingParams(**GREEDY), images=[inputs.images])
  return completion.output_ids, completion.logprobs


def answered(answer):
  """(output ids, log-probs) of a /generate answer."""
  return answer["output_ids"], [lp for lp, _, _ in answer["meta_info"]["output_token_logprobs"]]


def assert_same_sample(answer, expected):
  ids, logprobs = answered(answer)
  assert ids == expected[0]
  np.testing.assert_allclose(logprobs, expected[1], atol=LOGPROB_ATOL, rtol=0)


def placeholder_text(question: str, count: int) -> str:
  """The prompt as text, as `encoded` tokenizes it: bos, one placeholder per image, question."""
  bos = tokenizer().hf.id_to_token(tokenizer().bos_id)
  return bos + image_prompts.IMAGE_PLACEHOLDER * count + question


def test_generate_with_image_data_in_every_form(served, tmp_path):
  url, _ = served
  path = str(tmp_path / "chart.png")
  CHART.save(path)
  encoded_chart = rendered.png_base64(CHART)
  expected = expected_output("A+C=", [CHART])
  for image in (encoded_chart, f"data:image/png;base64,{encoded_chart}", path, [encoded_chart]):
    body = {"text": placeholder_text("A+C=", 1), "image_data": image, "sampling_params": GREEDY,
            "return_logprob": True}
    status, answer = asyncio.run(http("POST", url, "/generate", body))
    assert status == 200, answer
    assert_same_sample(answer, expected)
    assert answer["meta_info"]["prompt_tokens"] == len(encoded("A+C=", [CHART]).ids)
  other = expected_output("A+C=", [STRIP])  # the log-probs depend on the image
  assert np.abs(np.subtract(other[1], expected[1])).max() > 100 * LOGPROB_ATOL
  ids = encoded("A+C=", [CHART]).ids  # input_ids with the pads already expanded
  status, answer = asyncio.run(http("POST", url, "/generate", {
      "input_ids": ids, "image_data": encoded_chart, "sampling_params": GREEDY,
      "return_logprob": True}))
  assert status == 200
  assert_same_sample(answer, expected)


def test_batch_with_one_entry_per_prompt(served):
  url, _ = served
  questions = ["B=", rendered.ARITH_INSTRUCTION, "1+2="]
  pictures = [[CHART, STRIP], [STRIP], []]
  body = {"text": [placeholder_text(q, len(p)) for q, p in zip(questions, pictures)],
          "image_data": [[rendered.png_base64(x) for x in p] or None for p in pictures],
          "sampling_params": GREEDY, "return_logprob": True}
  status, answers = asyncio.run(http("POST", url, "/generate", body))
  assert status == 200, answers
  for answer, question, picture in zip(answers, questions, pictures):
    assert_same_sample(answer, expected_output(question, picture))


@pytest.mark.parametrize("body, message", [
    ({"text": placeholder_text("B=", 2), "image_data": "AAAA"}, "prompt 0: "),
    ({"text": placeholder_text("B=", 1), "image_data": [rendered.png_base64(STRIP)] * 2},
     "1 image placeholders in the prompt for 2 images"),
    ({"text": "B=", "image_data": "http://example.com/a.png"}, "does not fetch image URLs"),
    ({"text": ["B=", "A="], "image_data": ["x"]}, "one entry per prompt"),
])
def test_bad_image_data_is_a_400_naming_it(served, body, message):
  url, _ = served
  status, answer = asyncio.run(http("POST", url, "/generate", body))
  assert status == 400 and message in answer["error"]["message"]


def test_openai_chat_with_an_image_url(served):
  url, _ = served
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  data_url = f"data:image/png;base64,{rendered.png_base64(CHART)}"
  reply = client.chat.completions.create(
      model="vlm", max_tokens=5, temperature=0, logprobs=True,
      messages=[{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": data_url}},
          {"type": "text", "text": "A+C="}]}])
  expected_ids, expected_logprobs = expected_output("A+C=", [CHART])
  choice = reply.choices[0]
  assert choice.message.content == tokenizer().decode(expected_ids)
  np.testing.assert_allclose([t.logprob for t in choice.logprobs.content], expected_logprobs,
                             atol=LOGPROB_ATOL, rtol=0)
  assert reply.usage.prompt_tokens == len(encoded("A+C=", [CHART]).ids)
  with pytest.raises(openai.BadRequestError, match="does not fetch image URLs"):
    client.chat.completions.create(model="vlm", max_tokens=1, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])


def test_model_info_reports_image_understanding(served):
  url, _ = served
  status, info = asyncio.run(http("GET", url, "/model_info"))
  assert status == 200 and info["has_image_understanding"] is True


@pytest.mark.slow
def test_launch_serve_answers_image_data(tmp_path):
  save_vlm_checkpoint(str(tmp_path))
  process, url = _serve(str(tmp_path))
  try:
    answer = _post(url + "/generate", {"text": placeholder_text("A+C=", 1),
                                       "image_data": rendered.png_base64(CHART),
                                       "sampling_params": GREEDY})
  finally:
    process.kill()
    process.wait()
  assert answer["output_ids"] == expected_output("A+C=", [CHART])[0]
