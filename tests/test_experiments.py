"""Every experiment variant builds, passes the run's validation, and fits its own data."""
import jax
import pytest

from experiments import (code_rl, long2short_arith, long_context_arith, math_rl, rl_arith,
                         vision_arith)
from kimi_jax.data.packing import example_from_ids
from kimi_jax.data.tasks import build_task
from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.training.rl import validate_config
from kimi_jax.data.images import run_image_processing
from kimi_jax.training.setup import build_model_config, build_tokenizer

VARIANTS = ([(rl_arith, v) for v in ("tiny", "tiny_nolp", "long_cot", "smoke", "small")]
            + [(long2short_arith, f"{m}{s}") for m in (*long2short_arith.METHODS, "rpo")
               for s in ("", ",smoke")]
            + [(long_context_arith, f"{st}{s}") for st in long_context_arith.STAGES
               for s in ("", ",smoke")])
VISION_VARIANTS = ["tiny", "mixed", "smoke", "pod", "mixed,smoke"]
# Every shipped config that runs RL.
RL_VARIANTS = (VARIANTS + [(vision_arith, v) for v in VISION_VARIANTS]
               + [(m, v) for m in (math_rl, code_rl) for v in ("smoke", "qwen2_5_1_5b", "pod")])


@pytest.mark.parametrize("module,variant", VARIANTS,
                         ids=[f"{m.__name__.split('.')[-1]}:{v}" for m, v in VARIANTS])
def test_variant_is_valid_and_fits_its_data(module, variant):
  config = module.get_config(variant)
  validate_config(config)
  task = build_task(config.task, seed=config.seed)
  tokenizer = char_tokenizer(task.charset)
  build_model_config(config.model, tokenizer)
  longest = max(len(example_from_ids(tokenizer, task.encode_prompt(tokenizer, p),
                                     task.reference_response(p)))
                for p in task.train[:2000])
  assert longest <= config.sft.seq_len + 1, "SFT references must fit a packed row"
  assert longest <= config.rollout.max_seq_len, "prompt + reference must fit the engine"
  assert config.eval.max_new_tokens <= config.rollout.max_seq_len


@pytest.mark.parametrize("variant", VISION_VARIANTS)
def test_vision_variant_is_valid_and_fits_its_data(variant):
  config = vision_arith.get_config(variant)
  validate_config(config)
  config.task.num_train = min(config.task.num_train, 200)  # rendering every image is slow
  task = build_task(config.task, seed=config.seed)
  tokenizer = build_tokenizer(config, task)
  model_config = build_model_config(config.model, tokenizer)
  assert model_config.vision.image_token_id == tokenizer.hf.token_to_id("<|image_pad|>")
  processing = run_image_processing(config)
  lengths = [len(task.prompt_inputs(tokenizer, p, processing).ids)
             + len(tokenizer.encode(task.reference_response(p))) + 1 for p in task.train]
  assert max(lengths) <= config.sft.seq_len + 1, "SFT references must fit a row"
  assert max(lengths) <= config.rollout.max_seq_len, "prompt + reference must fit the engine"
  assert config.eval.max_new_tokens <= config.rollout.max_seq_len


def test_unknown_variants_are_refused():
  for module in (rl_arith, long2short_arith, long_context_arith, vision_arith):
    with pytest.raises(ValueError, match="unknown config variant"):
      module.get_config("nope")


def test_paper_dpo_has_no_chosen_nll_term_and_rpo_is_its_named_variant():
  for size in ("", ",smoke"):
    dpo, rpo = (long2short_arith.get_config(v + size) for v in ("dpo", "rpo"))
    assert dpo.long2short.method == rpo.long2short.method == "dpo"
    assert dpo.long2short.dpo.chosen_nll_weight == 0.0  # k1.5 2.4: plain DPO
    assert rpo.long2short.dpo.chosen_nll_weight == 1.0


@pytest.mark.parametrize("module,variant", RL_VARIANTS,
                         ids=[f"{m.__name__.split('.')[-1]}:{v}" for m, v in RL_VARIANTS])
def test_every_rl_variant_runs_partial_rollouts(module, variant):
  rl = module.get_config(variant).rl
  assert rl.segment_tokens < rl.max_response_tokens  # k1.5 2.6.2: on wherever RL runs
  assert not rl.train_old_segments  # the paper's choice: older segments get no gradient


def test_sgd_learning_rate_times_tau_is_bounded_and_named():
  config = rl_arith.get_config("tiny")
  with config.unlocked():
    config.rl.tau = 10.0  # lr 5e-3 x 10: the tau term overshoots
  with pytest.raises(ValueError, match=r"config.rl.tau=10.0: with SGD, optimizer.learning_rate"):
    validate_config(config)


def test_batch_slices_are_checked_at_start_against_the_process_count(monkeypatch):
  """Before any set-up or SFT warm-up: slices must divide the prompts and minibatches, and the
  processes must own whole slices (0: one slice per process, so 3 processes make 3 slices)."""
  config = rl_arith.get_config("smoke")  # 4 prompts, 2 groups per minibatch, 2 slices
  with config.unlocked():
    config.rl.batch_slices = 4
  with pytest.raises(ValueError, match=r"config.rl.groups_per_minibatch=2: must split into 4"):
    validate_config(config)
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with config.unlocked():
    config.rl.batch_slices = 2
  with pytest.raises(ValueError, match=r"config.rl.batch_slices=2: must be a multiple of the 4"):
    validate_config(config)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with config.unlocked():
    config.rl.batch_slices = 0
  with pytest.raises(ValueError, match=r"config.rl.prompts_per_iteration=4: must split into 3"):
    validate_config(config)


def test_variants_combine_in_order():
  small_smoke, smoke_small = rl_arith.get_config("small,smoke"), rl_arith.get_config("smoke,small")
  assert small_smoke.model.hidden_size == smoke_small.model.hidden_size == 512  # small's
  assert small_smoke.task.num_train == smoke_small.task.num_train == 200  # smoke's
  assert (small_smoke.rl.iterations, smoke_small.rl.iterations) == (3, 200)  # the later one wins
  stage = long_context_arith.get_config("stage2,smoke")
  assert stage.model.rope_theta == 1e6 and stage.sft.steps == 4
  with pytest.raises(ValueError, match=r"unknown config variant\(s\) \['smol'\] in 'small,smol'"):
    rl_arith.get_config("small,smol")
  with pytest.raises(ValueError, match="names no stage"):
    long_context_arith.get_config("smoke")
