"""Evaluation metrics: pass@1, unbiased pass@k, response length, token efficiency."""
import dataclasses
from math import comb

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
  if not 0 < k <= num_samples:
    raise ValueError(f"k={k} must be in [1, num_samples={num_samples}]")
  if num_samples - num_correct < k:
    return 1.0
  return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  pass_at_1: float
  pass_at_k: float
  k: int
  mean_tokens: float
  tokens_per_correct: float
  accuracy_per_1k_tokens: float  # token efficiency
  by_difficulty: dict  # level -> pass@1
  tokens_by_difficulty: dict  # level -> mean response tokens
  by_domain: dict = dataclasses.field(default_factory=dict)  # domain -> pass@1 (if several)

  def as_dict(self, prefix: str = "eval") -> dict:
    out = {f"{prefix}/pass@1": self.pass_at_1, f"{prefix}/pass@{self.k}": self.pass_at_k,
           f"{prefix}/mean_tokens": self.mean_tokens,
           f"{prefix}/acc_per_1k_tokens": self.accuracy_per_1k_tokens}
    out.update({f"{prefix}/pass@1_level{lvl}": acc for lvl, acc in self.by_difficulty.items()})
    out.update({f"{prefix}/mean_tokens_level{lvl}": tokens
                for lvl, tokens in self.tokens_by_difficulty.items()})
    out.update({f"{prefix}/pass@1_{domain}": acc for domain, acc in self.by_domain.items()})
    return out


def summarize(correct_PxN: np.ndarray, lengths_PxN: np.ndarray, k: int,
              difficulty_P: np.ndarray | None = None, domain_P=None) -> EvalResult:
  """Metrics from per-prompt, per-sample correctness and response lengths (tokens); pass@1 per
  domain when `domain_P` names more than one."""
  correct_PxN = np.asarray(correct_PxN, bool)
  n = correct_PxN.shape[1]
  pass1 = float(correct_PxN.mean())
  passk = float(np.mean([pass_at_k(n, int(c), k) for c in correct_PxN.sum(axis=1)]))
  mean_tokens = float(np.mean(lengths_PxN))
  lengths_PxN = np.asarray(lengths_PxN)
  by_level, tokens_by_level = {}, {}
  if difficulty_P is not None:
    difficulty_P = np.asarray(difficulty_P)
    for level in sorted(set(difficulty_P.tolist()) - {None}):  # unlabelled: overall only
      by_level[int(level)] = float(correct_PxN[difficulty_P == level].mean())
      tokens_by_level[int(level)] = float(lengths_PxN[difficulty_P == level].mean())
  by_domain = {}
  if domain_P is not None and len(set(domain_P)) > 1:
    domain_P = np.asarray(domain_P)
    by_domain = {str(d): float(correct_PxN[domain_P == d].mean())
                 for d in sorted(set(domain_P), key=str)}
  return EvalResult(pass1, passk, k, mean_tokens,
                    tokens_per_correct=float(lengths_PxN.sum() / max(correct_PxN.sum(), 1)),
                    accuracy_per_1k_tokens=1000.0 * pass1 / max(mean_tokens, 1e-9),
                    by_difficulty=by_level, tokens_by_difficulty=tokens_by_level,
                    by_domain=by_domain)
