"""RL on prompts with images: the trainer's log-probs of sampled responses (the VLM over the
batch's image fields) equal the rollout engine's, and the vision config runs end to end."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import vision_arith
from kimi_jax.checkpointing.hf import load_hf
from kimi_jax.data import image_prompts
from kimi_jax.data.tasks import TEMPLATE, build_task
from kimi_jax.rollout.backends import EngineBackend
from kimi_jax.rollout.partial import PartialRolloutBuffer, RolloutLimits, collect_groups, new_groups
from kimi_jax.rollout.types import SamplingParams
from kimi_jax.training import rl, rl_data
from kimi_jax.training.steps import masked_token_logprobs
from tests.tiny_vlm import PROCESSING, model, tokenizer

# float32: the engine's cached decode against the trainer's full forward with packed patches.
ATOL = 1e-4


class Rollout:
  def __init__(self, max_batch, max_seq_len):
    self.max_batch, self.max_seq_len = max_batch, max_seq_len


class RL:
  repetition_ngram = repetition_count = 0


class State:
  def __init__(self, params):
    self.params = params


def test_trainer_logprobs_equal_rollout_logprobs_on_images():
  config, params = model()
  task = vision_arith.get_config("smoke").task.copy_and_resolve_references()
  task.num_train, task.num_heldout, task.domains = 3, 1, ("arith_image", "chart", "arith")

  prompts = build_task(task, seed=0).train[::3]  # one prompt per domain
  backend = EngineBackend(config, params, Rollout(16, 96), RL(), tokenizer().eos_ids, "0",
                          PROCESSING)
  encode = lambda p: image_prompts.encode_prompt_with_images(tokenizer(), TEMPLATE, p,
                                                             PROCESSING).ids
  groups = new_groups(prompts, encode, k=2, first_group_id=0, version=0)
  complete, _ = collect_groups(backend, SamplingParams(temperature=1.0), groups,
                               PartialRolloutBuffer(), RolloutLimits(12, 12), 0, seed_base=0)
  assert len(complete) == 3 and [bool(g.images) for g in complete] == [True, True, False]
  batch = rl_data.build_rl_batch(complete, np.zeros(6), 96, tokenizer().pad_id, True)
  row_images = rl_data.RowImages.for_prompts(prompts, config.vision, PROCESSING)
  batch.update(row_images.fields(*row_images.row_inputs(complete), batch["tokens"]))
  logprobs = lambda params, batch: masked_token_logprobs(State(params), batch, config)
  ours = np.asarray(jax.jit(logprobs)(params, batch))
  row = 0
  for group in complete:
    for t in group.trajectories:
      p = len(t.prompt_ids)
      np.testing.assert_allclose(ours[row, p - 1:p - 1 + len(t.response_ids)], t.logprobs,
                                 atol=ATOL, rtol=0)
      row += 1


@pytest.mark.slow
def test_vision_smoke_run_exports_a_vlm_with_per_domain_metrics(tmp_path):
  config = vision_arith.get_config("smoke")
  config.task.domains = ("arith", "arith_image", "chart")
  summary = rl.run(config, str(tmp_path))
  assert {"eval/pass@1_arith", "eval/pass@1_arith_image", "eval/pass@1_chart"} <= set(summary)
  model_config, _ = load_hf(os.path.join(str(tmp_path), "hf"))
  assert model_config.vision is not None
  assert model_config.mrope_section == tuple(config.model.mrope_section)
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "reward" in r] == [1, 2]


def test_partial_rollouts_on_images_never_sample_vision_tokens():
  """Segments of 3 tokens on image prompts, with a policy that would mostly sample image pads:
  the engine never emits a vision token, so every resumed prompt (prompt + response so far) has
  only its own image slots, and the trainer's log-probs over the multi-segment responses equal
  the engine's."""
  config, params = model()
  pad = config.vision.image_token_id
  kernel = params["lm_head"]["kernel"]
  # The image pad's output column times 30: wherever its logit is positive it dominates.
  favoured = dict(params, lm_head={"kernel": kernel.at[:, pad].multiply(30.0)})
  task = vision_arith.get_config("smoke").task.copy_and_resolve_references()
  task.num_train, task.num_heldout, task.domains = 2, 1, ("arith_image", "chart")
  prompts = build_task(task, seed=0).train[::2]
  backend = EngineBackend(config, favoured, Rollout(16, 96), RL(), tokenizer().eos_ids, "0",
                          PROCESSING)
  encode = lambda p: image_prompts.encode_prompt_with_images(tokenizer(), TEMPLATE, p,
                                                             PROCESSING).ids
  buffer, limits = PartialRolloutBuffer(), RolloutLimits(max_response_tokens=9, segment_tokens=3)
  complete = []
  groups = new_groups(prompts, encode, k=2, first_group_id=0, version=0)
  for version in range(3):
    done, _ = collect_groups(backend, SamplingParams(temperature=1.0), groups, buffer, limits,
                             version, seed_base=100 * version)
    complete += done
    groups = []
  assert len(complete) == 2 and not len(buffer)
  vision_ids = set(config.unsampled_token_ids)
  assert len(vision_ids) == 3
  trajectories = [t for g in complete for t in g.trajectories]
  assert max(t.num_segments for t in trajectories) > 1
  assert not vision_ids & {i for t in trajectories for i in t.response_ids}
  batch = rl_data.build_rl_batch(complete, np.zeros(4), 96, tokenizer().pad_id, True)
  row_images = rl_data.RowImages.for_prompts(prompts, config.vision, PROCESSING)
  batch.update(row_images.fields(*row_images.row_inputs(complete), batch["tokens"]))
  logprobs = lambda params, batch: masked_token_logprobs(State(params), batch, config)
  ours = np.asarray(jax.jit(logprobs)(favoured, batch))
  for row, t in enumerate(trajectories):
    p = len(t.prompt_ids)
    np.testing.assert_allclose(ours[row, p - 1:p - 1 + len(t.response_ids)], t.logprobs,
                               atol=ATOL, rtol=0)
