"""Evaluate several HF checkpoints on one prompt set and place them side by side.

Writes `workdir/eval.json` (every metric per checkpoint), `workdir/eval_table.md` (the table
printed at the end) and `workdir/eval.png` (accuracy against tokens, and per-level bars). With a
corpus configured, also `lm_loss.json`, `lm_loss_table.md` and `lm_loss.png`: held-out loss per
position bucket (e.g. the long-context stages side by side).
"""
import json
import os

from tqdm import tqdm

from kimi_jax.checkpointing.hf import load_hf
from kimi_jax.data.corpus import corpus_documents
from kimi_jax.data.tokenizer import load_tokenizer
from kimi_jax.eval.evaluate import evaluate_with_config
from kimi_jax.eval.lm_loss import corpus_loss_by_position
from kimi_jax.eval.summary import EvalResult
from kimi_jax.metrics.plots import plot_checkpoint_comparison, plot_series
from kimi_jax.model.config import with_execution
from kimi_jax.rollout.backends import build_backend
from kimi_jax.sharding.processes import this_job
from kimi_jax.data.tasks import build_task


def parse_checkpoints(spec: str) -> dict[str, str]:
  """'name=path,name=path' (a bare path is named by its directory) -> {name: path}."""
  checkpoints = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, _, path = item.rpartition("=")
    name = name or os.path.basename(os.path.normpath(path))
    if name in checkpoints:
      raise ValueError(f"--checkpoints: name {name!r} appears twice in {spec!r}")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"--checkpoints: {name}={path} is not a directory")
    checkpoints[name] = path
  if not checkpoints:
    raise ValueError("--checkpoints is empty: give name=path[,name=path...]")
  return checkpoints


def load_checkpoint(config, path: str):
  """(model config run as `config.model` says, params, tokenizer) of the HF directory `path`."""
  model_config, params = load_hf(path)
  return with_execution(model_config, config.model), params, load_tokenizer(path)


def evaluate_checkpoint(config, task, path: str, workdir: str) -> EvalResult:
  """Load the HF checkpoint at `path` (with its tokenizer) into a rollout backend and grade it."""
  model_config, params, tokenizer = load_checkpoint(config, path)
  backend = build_backend(config, model_config, tokenizer, params, os.path.basename(path),
                          workdir)
  try:
    return evaluate_with_config(backend, tokenizer, task, task.heldout, config.eval)
  finally:
    backend.close()


def markdown_table(results: dict[str, EvalResult]) -> str:
  some = next(iter(results.values()))
  levels = sorted(some.by_difficulty)
  pass_k = [f"pass@{some.k}"] if some.k > 1 else []
  header = (["checkpoint", "pass@1"] + pass_k + ["mean tokens", "acc / 1k tokens"]
            + [f"L{lvl} pass@1 (tokens)" for lvl in levels])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, r in results.items():
    cells = ([name, f"{r.pass_at_1:.3f}"] + ([f"{r.pass_at_k:.3f}"] if pass_k else [])
             + [f"{r.mean_tokens:.1f}", f"{r.accuracy_per_1k_tokens:.1f}"])
    cells += [f"{r.by_difficulty[lvl]:.3f} ({r.tokens_by_difficulty[lvl]:.1f})" for lvl in levels]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def lm_losses(config, checkpoints: dict[str, str]) -> dict[str, dict[str, float]]:
  """Held-out loss per position bucket of every checkpoint on the config's corpus."""
  _, heldout = corpus_documents(config.corpus, config.task, config.seed)
  edges = tuple(config.corpus.position_edges)
  losses = {}
  for name, path in checkpoints.items():
    model_config, params, tokenizer = load_checkpoint(config, path)
    losses[name] = corpus_loss_by_position(model_config, params, tokenizer, heldout, edges)
  return losses


def write_lm_losses(losses: dict[str, dict[str, float]], workdir: str) -> str:
  """lm_loss.json, lm_loss_table.md and lm_loss.png (loss against position bucket)."""
  buckets = list(next(iter(losses.values())))
  lines = ["| checkpoint | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 1)]
  lines += [f"| {name} | " + " | ".join(f"{row[b]:.3f}" for b in buckets) + " |"
            for name, row in losses.items()]
  table = "\n".join(lines)
  with open(os.path.join(workdir, "lm_loss.json"), "w") as f:
    json.dump(losses, f, indent=2)
  with open(os.path.join(workdir, "lm_loss_table.md"), "w") as f:
    f.write(table + "\n")
  upper_edges = [int(b.rsplit("-", 1)[1]) for b in buckets]
  plot_series({name: (upper_edges, [row[b] for b in buckets]) for name, row in losses.items()},
              os.path.join(workdir, "lm_loss.png"), xlabel="position bucket (upper edge)",
              ylabel="held-out loss", title="held-out loss by position")
  return table


def run(config, workdir: str, checkpoints: dict[str, str]) -> dict[str, EvalResult]:
  """Evaluate every checkpoint on the config task's held-out set; write table, JSON, plot.
  With a corpus configured (`config.corpus.source`), also compare held-out LM loss by position.
  Every process of a job evaluates its share of the prompts; process 0 alone writes."""
  os.makedirs(workdir, exist_ok=True)
  task = build_task(config.task, config.get("data"), seed=config.seed)
  results = {name: evaluate_checkpoint(config, task, path, workdir)
             for name, path in tqdm(checkpoints.items(), desc="eval", total=len(checkpoints))}
  losses = lm_losses(config, checkpoints) if config.corpus.source else None
  if this_job().is_main:
    write_results(config, results, checkpoints, workdir)
    if losses is not None:
      tqdm.write(write_lm_losses(losses, workdir))
  return results


def write_results(config, results: dict[str, EvalResult], checkpoints: dict[str, str],
                  workdir: str) -> None:
  """eval.json, eval_table.md and eval.png of the checkpoints' results."""
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump({name: {"checkpoint": checkpoints[name], **r.as_dict("eval")}
               for name, r in results.items()}, f, indent=2)
  table = markdown_table(results)
  with open(os.path.join(workdir, "eval_table.md"), "w") as f:
    f.write(table + "\n")
  plot_checkpoint_comparison(
      {name: {"pass@1": r.pass_at_1, "mean_tokens": r.mean_tokens,
              "pass@1_by_level": r.by_difficulty, "tokens_by_level": r.tokens_by_difficulty}
       for name, r in results.items()},
      os.path.join(workdir, "eval.png"), title=f"held-out {config.task.name} "
      f"({config.eval.samples} sample(s) at T={config.eval.temperature})")
  tqdm.write(table)
