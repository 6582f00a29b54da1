"""Curation through the rollout engine on a small model trained here.

The model (experiments/rl_arith.py's tiny Qwen2 shape) is SFT-trained once per module on all
155 level-1 questions of synthetic.py: additions answered directly ("7+5=" -> "#12"),
subtractions with their chain of thought ("9-4=" -> "9-4=5#5"). It has never seen more than one
operation, nor an answer above 18. Curation then has known answers:

  additions    guess stage (4 new tokens: room for "#12" + eos, none for a chain of thought,
               which is >= 7 tokens): answered directly and right            -> guessable
  subtractions the 4-token guess stops mid chain of thought, never right; with room for it
               they are solved (pass rate >= 0.8 > max_pass_rate 0.7)          -> too_easy
  level 4      answers 24..32 the model has never written: pass rate ~0     -> kept, difficulty 10
  MC, T/F, proof questions (letters outside the model's vocabulary)          -> text filters

Measured per-sample accuracy at temperature 1 over 50 samples of every level-1 question, with
three training seeds: subtractions 0.99 on average, >= 0.94 for each (P(<= 7 of 10) at 0.94 is
~2%, at 0.99 ~1e-4); additions answered directly and right >= 0.96 (P(0 of 8) < 1e-11); level 4
never right in 600 samples, neither guessed nor reasoned.
"""
import json
import re

import jax
import pytest

from experiments.rl_arith import get_config
from kimi_jax.data import synthetic
from kimi_jax.data.curation import (GUESSABLE, MULTIPLE_CHOICE, PROOF, TOO_EASY, TRUE_FALSE,
                                    CurationConfig, curate)
from kimi_jax.data.sources import Prompt
from kimi_jax.data.tasks import Task, encode_text
from kimi_jax.data.tokenizer import char_tokenizer
from kimi_jax.model import init_params
from kimi_jax.rollout.backends import EngineBackend
from kimi_jax.rollout.types import Completion, SamplingParams, stop_reason
from kimi_jax.sharding.rules import make_mesh
from kimi_jax.training.curation import curation_generate
from kimi_jax.training.setup import build_model_config
from kimi_jax.training.sft import sft_warmup
from tests.rollout.fakes import FakeBackend

LEVEL1 = [f"{a}{op}{b}=" for a in range(10) for b in range(10) for op in "+-"
          if op == "+" or b <= a]
ADDITIONS = ["2+3=", "4+4=", "7+5=", "9+9=", "0+6=", "8+1="]
SUBTRACTIONS = ["9-4=", "7-3=", "8-5=", "6-2=", "5-5=", "3-0="]
HARD = ["6+9+8-4+5=", "2+7+2+9+5=", "9+7+0+8+6=", "4+6+9+5+8="]
TEXT_FILTERED = {
    "mc": Prompt(question="Which sum is 5?\nA. 2+2\nB. 2+3\nC. 3+3", answer="B", id="mc"),
    "tf": Prompt(question="True or false: 7-4=3", answer="True", id="tf"),
    "proof": Prompt(question="Prove that a+b=b+a for whole numbers a, b.", answer="", id="proof"),
}
CONFIG = CurationConfig(num_samples=10, temperature=1.0, max_new_tokens=40, guess_tries=8,
                        guess_max_new_tokens=4, guess_template="{question}", min_pass_rate=0.0,
                        max_pass_rate=0.7)


def arith(question: str) -> Prompt:
  return Prompt(question=question, answer=synthetic.solve(question).answer, id=question,
                domain=synthetic.DOMAIN)


def warmup_response(prompt: Prompt) -> str:
  problem = synthetic.solve(prompt.question)
  if "+" in prompt.question:
    return synthetic.ANSWER_MARKER + problem.answer
  return synthetic.target_response(problem)


def reward(response: str, answer: str) -> float:
  return float(synthetic.is_correct(response, answer))


class RecordingBackend(FakeBackend):
  """Passes requests through to a backend and keeps them."""

  def __init__(self, backend):
    super().__init__()
    self.backend, self.calls = backend, []

  def generate(self, inputs, sampling, images=None):
    self.calls.append((inputs, sampling))
    return self.backend.generate(inputs, sampling, images)


@pytest.fixture(scope="module")
def tokenizer():
  return char_tokenizer(synthetic.CHARSET)


@pytest.fixture(scope="module")
def run_config():
  config = get_config("smoke")
  config.sft.update(dict(steps=500, batch_size=16))
  config.sft.optimizer.update(dict(warmup_steps=20, learning_rate=3e-3))
  return config


@pytest.fixture(scope="module")
def trained_backend(tokenizer, run_config, tmp_path_factory):
  """The in-process engine serving the warmed-up model (~15-25 s of training on 2 cores)."""
  domain = synthetic.DOMAIN
  task = Task(charset=synthetic.CHARSET, train=[arith(q) for q in LEVEL1], heldout=[],
              reference_response=warmup_response, reward_by_domain={domain: "arith"},
              template_by_domain={domain: "{question}"}, weight_by_domain={domain: 1.0})
  model_config = build_model_config(run_config.model, tokenizer)
  params = sft_warmup(run_config, task, tokenizer, model_config, make_mesh(**run_config.mesh),
                      str(tmp_path_factory.mktemp("sft")))
  return EngineBackend(model_config, params, run_config.rollout, run_config.rl, tokenizer.eos_ids,
                       version="sft")


@pytest.mark.slow
def test_known_easy_prompts_removed_and_reported(trained_backend, tokenizer, tmp_path):
  prompts = [TEXT_FILTERED["mc"], *map(arith, ADDITIONS), TEXT_FILTERED["tf"],
             *map(arith, SUBTRACTIONS), TEXT_FILTERED["proof"], *map(arith, HARD)]
  recorder = RecordingBackend(trained_backend)
  kept, report = curate(prompts, curation_generate(recorder, tokenizer, lambda t: encode_text(tokenizer, t)), reward,
                        CONFIG)

  assert {r.id: r.reason for r in report.removed} == {
      "mc": MULTIPLE_CHOICE, "tf": TRUE_FALSE, "proof": PROOF,
      **dict.fromkeys(ADDITIONS, GUESSABLE), **dict.fromkeys(SUBTRACTIONS, TOO_EASY)}
  assert [p.id for p in kept] == HARD
  assert all(report.pass_rates[q] >= 0.8 for q in SUBTRACTIONS), report.pass_rates
  assert all(report.pass_rates[q] <= 0.1 for q in HARD), report.pass_rates
  assert all(p.difficulty >= 9 for p in kept), kept

  # Only arithmetic reached the model, encoded as in SFT: all of it for 8 short guesses, then
  # what the guess stage let through for 10 full samples; every request had its own seed.
  (guess_ids, guess_sampling), (pass_ids, pass_sampling) = recorder.calls
  assert guess_ids == [encode_text(tokenizer, q)
                       for q in ADDITIONS + SUBTRACTIONS + HARD for _ in range(8)]
  assert pass_ids == [encode_text(tokenizer, q)
                      for q in SUBTRACTIONS + HARD for _ in range(10)]
  settings = lambda sampling: {(s.temperature, s.max_new_tokens, s.stop_token_ids)
                               for s in sampling}
  eos = (tokenizer.eos_id,)
  assert settings(guess_sampling) == {(1.0, 4, eos)}
  assert settings(pass_sampling) == {(1.0, 40, eos)}
  seeds = [s.seed for s in guess_sampling + pass_sampling]
  assert len(set(seeds)) == len(seeds)

  report.write(str(tmp_path / "report.json"))
  written = json.loads((tmp_path / "report.json").read_text())
  assert written["num_kept"] == len(HARD)
  assert written["removed_by_reason"] == {MULTIPLE_CHOICE: 1, TRUE_FALSE: 1, PROOF: 1,
                                          GUESSABLE: len(ADDITIONS), TOO_EASY: len(SUBTRACTIONS)}
  details = {r["id"]: r["detail"] for r in written["removed"]}
  assert details["mc"] == "option labels ['A', 'B', 'C'] in the question"
  assert details["tf"] == "question says 'True or false'"
  assert details["proof"] == "question says 'Prove'"
  for q in ADDITIONS:
    assert re.fullmatch(r"[1-8] of 8 answers without chain of thought were correct", details[q])
  for q in SUBTRACTIONS:
    assert re.fullmatch(r"pass rate (0\.[89]0|1\.00) > 0\.7", details[q])


@pytest.mark.slow
def test_greedy_completions_stop_at_eos(trained_backend, tokenizer):
  generate = curation_generate(trained_backend, tokenizer, lambda t: encode_text(tokenizer, t))
  assert generate(["9-4=", "7+5="], 2, 0.0, 40) == [["9-4=5#5"] * 2, ["#12"] * 2]


def test_samples_are_distinct_draws_and_greedy_repeats(tokenizer, run_config):
  """An untrained model: near-uniform next-token distributions, so independent samples rarely
  coincide (measured 0.4-0.8% of pairs, mostly two empty samples). A seed shared by the n
  samples would give n copies; ">= 3 distinct of 4" fails for < 1% of seeds (three empties)."""
  model_config = build_model_config(run_config.model, tokenizer)
  backend = EngineBackend(model_config, init_params(model_config, jax.random.key(0)),
                          run_config.rollout, run_config.rl, tokenizer.eos_ids, version="init")
  generate = curation_generate(backend, tokenizer, lambda t: encode_text(tokenizer, t), seed=0)
  questions = ["1+2=", "3-1="]

  sampled = generate(questions, 4, 1.0, 12)
  assert all(len(set(samples)) >= 3 for samples in sampled), sampled

  greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
  direct = backend.generate([encode_text(tokenizer, q) for q in questions], [greedy] * 2)
  assert generate(questions, 3, 0.0, 12) == [[tokenizer.decode(c.output_ids)] * 3 for c in direct]


def test_backend_answer_count_is_checked(tokenizer):
  class OneAnswer(FakeBackend):
    def generate(self, inputs, sampling, images=None):
      return [Completion(inputs[0], [tokenizer.eos_id], [0.0], stop_reason(tokenizer.eos_id))]

  generate = curation_generate(OneAnswer(), tokenizer, lambda t: encode_text(tokenizer, t))
  with pytest.raises(RuntimeError, match="backend returned 1 completions for 6 requests"):
    generate(["1+2=", "3-1="], 3, 1.0, 4)


def test_curation_stage_writes_difficulty_and_generates_code_tests(monkeypatch, tmp_path):
  """launch.curate's stage on a tiny BPE checkpoint with planted answers: a guessable prompt and
  a multiple-choice one are removed; the rest get difficulty = failed samples out of 4; a code
  row with a generator and two agreeing solutions gets generated tests."""
  from experiments import code_rl, math_rl
  from kimi_jax.training import curation
  from tests.hf_checkpoints import save_tiny_qwen2_checkpoint
  from tests.planted_backend import PlantedBackend

  checkpoint = str(tmp_path / "ckpt")
  save_tiny_qwen2_checkpoint(checkpoint)
  rows = [{"question": "Tom has 3 apples and buys 4.", "answer": "#### 7"},     # guessable
          {"question": "Sam has 2 pens and buys 2.", "answer": "#### 4"},       # 2 of 4 right
          {"question": "Ann has 9 cats; 3 leave.", "answer": "#### 6"},         # never right
          {"question": "Which of the following is 5? (A) 4 (B) 5", "answer": "#### 5"}]
  source = tmp_path / "raw.jsonl"
  source.write_text("".join(json.dumps(r) + "\n" for r in rows))

  def responses(prompt: str):
    if "Tom" in prompt:
      return ["\\boxed{7}"]
    if "Give only the final answer" in prompt:
      return ["\\boxed{0}"]
    return ["\\boxed{4}", "\\boxed{1}"] if "Sam" in prompt else ["\\boxed{5}"]

  monkeypatch.setattr(curation, "build_backend", lambda config, model_config, tokenizer, *_:
                      PlantedBackend(tokenizer, responses))
  config = math_rl.get_config("smoke").copy_and_resolve_references()
  config.init.checkpoint = checkpoint
  config.curation.update(max_new_tokens=16, guess_max_new_tokens=16)  # planted answers fit
  output = str(tmp_path / "curated.jsonl")
  report = curation.curate_file(config, str(source), output)
  curated = [json.loads(line) for line in open(output)]
  assert [(r["question"][:3], r["difficulty"]) for r in curated] == [("Sam", 2), ("Ann", 4)]
  assert curated[0]["answer"] == "#### 4"  # every original field kept
  assert report.counts() == {GUESSABLE: 1, MULTIPLE_CHOICE: 1}
  assert json.load(open(output + ".report.json"))["num_kept"] == 2

  code_rows = [{"question": "Print a+b.", "generator": "s = int(input())\nprint(s, 2 * s)",
                "solutions": ["print(sum(map(int, input().split())))",
                              "a, b = map(int, input().split())\nprint(a + b)"]}]
  code_source = tmp_path / "code.jsonl"
  code_source.write_text(json.dumps(code_rows[0]) + "\n")
  program = "```python\nprint(sum(map(int, input().split())))\n```"
  monkeypatch.setattr(curation, "build_backend", lambda config, model_config, tokenizer, *_:
                      PlantedBackend(tokenizer, lambda prompt: [
                          "no idea" if "Give only" in prompt else program, "wrong"]))
  code_config = code_rl.get_config("smoke").copy_and_resolve_references()
  code_config.init.checkpoint = checkpoint
  code_config.curation.update(max_new_tokens=64, guess_max_new_tokens=16)
  code_output = str(tmp_path / "code_curated.jsonl")
  curation.curate_file(code_config, str(code_source), code_output)
  (curated_code,) = [json.loads(line) for line in open(code_output)]
  assert curated_code["tests"] == [{"input": f"{s} {2 * s}\n", "output": f"{3 * s}\n"}
                                   for s in range(4)]
  assert curated_code["difficulty"] == 2  # the planted program passes on 2 of 4 samples
