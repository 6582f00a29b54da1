"""Evaluation through a backend: planted answers give known metrics; the checkpoint comparison
reproduces direct evaluation of each checkpoint and writes its table and plot."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import long_context_arith
from experiments.rl_arith import get_config
from kimi_jax.checkpointing.hf import save_hf
from kimi_jax.data import synthetic
from kimi_jax.data.corpus import corpus_documents
from kimi_jax.data.tasks import build_task
from kimi_jax.eval import compare
from kimi_jax.eval.evaluate import (GradedSamples, evaluate, evaluate_with_config,
                                    sample_and_grade, sample_and_grade_share)
from kimi_jax.eval.lm_loss import heldout_loss_by_position
from kimi_jax.model import init_params
from kimi_jax.model.config import with_execution
from kimi_jax.rollout.backends import EngineBackend, SGLangBackend
from kimi_jax.rollout.engine import RolloutEngine
from kimi_jax.rollout.server import BackgroundServer, RolloutServer
from kimi_jax.sharding.processes import Processes
from kimi_jax.training.setup import build_model_config
from tests.eval.planted_backend import TOKENIZER, PlantedBackend
from tests.rollout.recording_server import RecordingEngine, RecordingRolloutServer
from tests.sharding.thread_job import ThreadJob


@pytest.fixture(scope="module")
def task():
  return build_task(get_config("smoke").task, seed=0)


def test_planted_answers_give_known_metrics(task):
  backend = PlantedBackend()
  prompts = task.heldout[:6]
  result = evaluate(backend, TOKENIZER, task, prompts, max_new_tokens=40, samples=2,
                    temperature=1.0, k=2, seed=10)
  assert [s.seed for s in backend.sampling] == list(range(10, 22))  # one seed per request
  assert all(s.temperature == 1.0 and s.max_new_tokens == 40 for s in backend.sampling)
  # Seeds alternate even/odd within each prompt: exactly one of its two samples is right.
  assert result.pass_at_1 == 0.5 and result.pass_at_k == 1.0
  lengths = [len(synthetic.target_response(synthetic.solve(p.question))) + 1
             for p in prompts] + [len(f"#{int(p.answer) + 1}") + 1 for p in prompts]
  assert result.mean_tokens == pytest.approx(np.mean(lengths))
  assert result.accuracy_per_1k_tokens == pytest.approx(500 / np.mean(lengths))


@pytest.mark.parametrize("count", [2, 3])
def test_shares_of_the_processes_are_the_rows_of_one_process(task, count):
  # 7 prompts x 3 samples: shares of 4 + 3 or 3 + 2 + 2 prompts, starting at odd request rows
  # (12 or 9, 15), so a share seeded from its own row 0 would flip the planted parity.
  prompts, samples = task.heldout[:7], 3
  args = (TOKENIZER, task, prompts, samples, 1.0, 40, 10)
  whole = sample_and_grade(PlantedBackend(), *args)
  joined = GradedSamples.concatenate([
      sample_and_grade_share(PlantedBackend(), *args, Processes(i, count, None))
      for i in range(count)])
  assert joined.prompts_R == whole.prompts_R and joined.responses_R == whole.responses_R
  np.testing.assert_array_equal(joined.correct_R, whole.correct_R)
  np.testing.assert_array_equal(joined.num_tokens_R, whole.num_tokens_R)


@pytest.mark.parametrize("num_prompts, count", [(7, 2), (7, 3), (2, 3)])
def test_processes_sample_only_their_share_and_all_get_the_one_process_result(task, num_prompts,
                                                                              count):
  # Stand-in processes (threads) with their own recording backends; (2, 3): process 2 has no
  # prompt and still takes part in the gather.
  prompts = task.heldout[:num_prompts]
  evaluate_on = lambda backend, processes: evaluate(
      backend, TOKENIZER, task, prompts, max_new_tokens=40, samples=3, temperature=1.0, k=2,
      seed=10, processes=processes)
  one_backend = PlantedBackend()
  one = evaluate_on(one_backend, None)  # the JAX job of this test: one process
  job = ThreadJob(count)
  backends = [PlantedBackend() for _ in range(count)]
  results = job.run(lambda processes: evaluate_on(backends[processes.index], processes))
  assert results == [one] * count  # every field, every float bit
  starts = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(num_prompts), count)])
  for i, backend in enumerate(backends):  # its own prompts, with their one-process seeds
    assert backend.questions == one_backend.questions[starts[i] * 3:starts[i + 1] * 3]
    assert [s.seed for s in backend.sampling] == list(range(10 + starts[i] * 3,
                                                            10 + starts[i + 1] * 3))


class VersionRecordingBackend(SGLangBackend):
  """Records the weight version of every completion it receives."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.versions = []

  def generate(self, requests, sampling, images=None):
    completions = super().generate(requests, sampling, images)
    self.versions += [c.weight_version for c in completions]
    return completions


def test_processes_share_an_sglang_fleet_and_act_on_it_once(task, tmp_path):
  # Two stand-in processes (threads) evaluate through one of our SGLang-API servers, sync two
  # weight versions and release + resume its memory, as an RL run with the sglang backend
  # does. Each sends only its share of the requests; process 0 alone writes and loads the
  # weights and frees memory, with every process's requests before and after it.
  config = get_config("smoke")
  model_config = build_model_config(config.model, TOKENIZER)
  params = {v: init_params(model_config, jax.random.key(int(v) + 1)) for v in ("0", "1")}
  engine = RecordingEngine(model_config, params["0"], max_batch=config.rollout.max_batch,
                         max_seq_len=config.rollout.max_seq_len,
                         eos_token_ids=(TOKENIZER.eos_id,))
  running = BackgroundServer(RecordingRolloutServer(engine, tokenizer=TOKENIZER))
  prompts, samples = task.heldout[:5], 2
  evaluate_on = lambda backend, processes: evaluate(
      backend, TOKENIZER, task, prompts, max_new_tokens=12, samples=samples, temperature=1.0,
      k=2, seed=10, processes=processes)

  def process(processes):
    backend = VersionRecordingBackend(model_config, TOKENIZER, [running.url],
                                      str(tmp_path / "weights"), processes)
    try:
      results = []
      for version in ("0", "1"):
        backend.sync(params[version], version)
        results.append(evaluate_on(backend, processes))
      backend.release()
      backend.resume()
      return results, backend.versions
    finally:
      backend.close()

  try:
    (results0, versions0), (results1, versions1) = ThreadJob(2).run(process)
  finally:
    running.stop()
  rows = samples * len(prompts)
  # Every completion came from the weights synced before it: 6 + 4 rows per version.
  assert versions0 == ["0"] * 6 + ["1"] * 6 and versions1 == ["0"] * 4 + ["1"] * 4
  assert [e for e in engine.events if e[0] != "generate"] == [
      ("update", "0"), ("update", "1"), ("release",), ("resume",)]
  update1 = engine.events.index(("update", "1"))
  seeds = lambda events: sorted(e[1] for e in events if e[0] == "generate")
  assert seeds(engine.events[:update1]) == list(range(10, 10 + rows))  # each request once
  assert seeds(engine.events[update1:]) == list(range(10, 10 + rows))
  assert sorted(os.listdir(tmp_path / "weights")) == ["v1"]
  for version, result0, result1 in zip(("0", "1"), results0, results1):
    engine_backend = EngineBackend(model_config, params[version], config.rollout, config.rl,
                                   TOKENIZER.eos_ids, version)
    assert result0 == result1 == evaluate_on(engine_backend, None)


def test_bad_eval_settings_are_refused(task):
  with pytest.raises(ValueError, match="k=3"):
    evaluate(PlantedBackend(), TOKENIZER, task, task.heldout[:2], 40, samples=2,
             temperature=1.0, k=3)
  with pytest.raises(ValueError, match="temperature 0.0"):
    evaluate(PlantedBackend(), TOKENIZER, task, task.heldout[:2], 40, samples=2, k=1)


def test_parse_checkpoints(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  assert compare.parse_checkpoints(f"long={tmp_path}/a, {tmp_path}/b") == {
      "long": f"{tmp_path}/a", "b": f"{tmp_path}/b"}
  with pytest.raises(ValueError, match="appears twice"):
    compare.parse_checkpoints(f"x={tmp_path}/a,x={tmp_path}/b")
  with pytest.raises(FileNotFoundError, match="missing"):
    compare.parse_checkpoints(f"y={tmp_path}/missing")
  with pytest.raises(ValueError, match="empty"):
    compare.parse_checkpoints(" , ")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Two random-init HF checkpoints of the smoke model: {name: (directory, init seed)}."""
  root = tmp_path_factory.mktemp("checkpoints")
  model_config = build_model_config(get_config("smoke").model, TOKENIZER)
  out = {}
  for name, seed in (("one", 1), ("two", 2)):
    save_hf(str(root / name), model_config, init_params(model_config, jax.random.key(seed)),
            tokenizer=TOKENIZER)
    out[name] = (str(root / name), seed)
  return out


@pytest.fixture(scope="module")
def engine_comparison(checkpoints, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval")
  results = compare.run(get_config("smoke"), str(workdir),
                        {name: path for name, (path, _) in checkpoints.items()})
  return results, workdir


@pytest.mark.slow
def test_comparison_equals_direct_evaluation(engine_comparison, checkpoints, task):
  results, workdir = engine_comparison
  config = get_config("smoke")
  model_config = build_model_config(config.model, TOKENIZER)
  written = json.loads((workdir / "eval.json").read_text())
  for name, (_, seed) in checkpoints.items():
    backend = EngineBackend(model_config, init_params(model_config, jax.random.key(seed)),
                            config.rollout, config.rl, TOKENIZER.eos_ids, name)
    direct = evaluate_with_config(backend, TOKENIZER, task, task.heldout, config.eval)
    assert results[name] == direct
    assert written[name]["eval/mean_tokens"] == direct.mean_tokens
  table = (workdir / "eval_table.md").read_text().splitlines()
  assert len(table) == 4 and table[2].startswith("| one |") and table[3].startswith("| two |")
  assert (workdir / "eval.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_process_other_than_0_evaluates_and_writes_nothing(engine_comparison, checkpoints,
                                                              tmp_path, monkeypatch):
  """compare.run as process 1 of a job (its writer check; the evaluation itself runs as this
  one-process job): the same results, and no file (eval.json, table, plot) left to process 0."""
  monkeypatch.setattr(compare, "this_job", lambda: Processes(1, 2, lambda obj: [obj, obj]))
  results = compare.run(get_config("smoke"), str(tmp_path / "run"),
                        {"one": checkpoints["one"][0]})
  assert results["one"] == engine_comparison[0]["one"]
  assert os.listdir(tmp_path / "run") == []


@pytest.mark.slow
def test_comparison_through_the_sglang_client_equals_the_engine(engine_comparison, checkpoints,
                                                                 tmp_path):
  """Same evaluation with samples from our SGLang-API server over loopback HTTP, weights pushed
  as safetensors + /update_weights_from_disk for each checkpoint."""
  config = get_config("smoke")
  model_config = build_model_config(config.model, TOKENIZER)
  engine = RolloutEngine(model_config, init_params(model_config, jax.random.key(0)),
                         max_batch=config.rollout.max_batch, max_seq_len=config.rollout.max_seq_len,
                         eos_token_ids=(TOKENIZER.eos_id,),
                         repetition_ngram=config.rl.repetition_ngram,  # as EngineBackend
                         repetition_count=config.rl.repetition_count)
  server = BackgroundServer(RolloutServer(engine, tokenizer=TOKENIZER))
  try:
    with config.unlocked():
      config.rollout.backend, config.rollout.urls = "sglang", (server.url,)
    results = compare.run(config, str(tmp_path),
                          {name: path for name, (path, _) in checkpoints.items()})
  finally:
    server.stop()
  assert results == engine_comparison[0]


@pytest.mark.slow
def test_corpus_comparison_adds_loss_by_position(checkpoints, tmp_path):
  """With a corpus configured, each checkpoint's held-out loss by position is written, equal
  to evaluating its own weights on the config's held-out documents."""
  config = long_context_arith.get_config("stage2,smoke")
  compare.run(config, str(tmp_path), {name: path for name, (path, _) in checkpoints.items()})
  written = json.loads((tmp_path / "lm_loss.json").read_text())
  _, heldout = corpus_documents(config.corpus, config.task, config.seed)
  edges = tuple(config.corpus.position_edges)
  model_config = with_execution(build_model_config(get_config("smoke").model, TOKENIZER),
                                config.model)
  for name, (_, seed) in checkpoints.items():
    direct = heldout_loss_by_position(model_config, init_params(model_config, jax.random.key(seed)),
                                      [TOKENIZER.encode(d) for d in heldout], TOKENIZER.eos_id,
                                      TOKENIZER.pad_id, edges[-1], edges)
    assert written[name] == pytest.approx(direct, rel=1e-6)  # same computation, JSON round trip
    assert set(direct) == {"loss_pos0-64", "loss_pos64-256", "loss_pos256-1024"}
  assert (tmp_path / "lm_loss.png").exists()
  assert (tmp_path / "lm_loss_table.md").read_text().count("\n") == 4
