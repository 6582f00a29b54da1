"""Task references: the demo's mix is unchanged by the verify option, and fractions hold."""
import numpy as np

from experiments.rl_arith import get_config
from kimi_jax.data import synthetic
from kimi_jax.data.tasks import build_task


def references(direct: float, verify: float):
  config = get_config("tiny").task.copy_and_resolve_references()
  config.direct_answer_fraction, config.verify_fraction = direct, verify
  task = build_task(config, seed=0)
  return [(p, task.reference_response(p)) for p in task.train]


def kind(prompt, response) -> str:
  problem = synthetic.solve(prompt.question)
  return {f"#{problem.answer}": "direct", synthetic.target_response(problem): "cot",
          synthetic.target_response(problem, verify=True): "verify"}[response]


def test_fractions_and_independence():
  plain = references(0.5, 0.0)
  checked = references(0.5, 0.7)
  kinds_plain = [kind(p, r) for p, r in plain]
  kinds_checked = [kind(p, r) for p, r in checked]
  assert "verify" not in kinds_plain
  # The direct-answer choice per prompt does not move when verification is switched on.
  assert [k == "direct" for k in kinds_plain] == [k == "direct" for k in kinds_checked]
  n = len(plain)
  direct = np.mean([k == "direct" for k in kinds_plain])
  worked = [k for k in kinds_checked if k != "direct"]
  verified = np.mean([k == "verify" for k in worked])
  # Binomial 4-sigma bands (n = 4000 and about 2000): a false failure about 1 in 15,000.
  assert abs(direct - 0.5) < 4 * np.sqrt(0.25 / n)
  assert abs(verified - 0.7) < 4 * np.sqrt(0.21 / len(worked))
