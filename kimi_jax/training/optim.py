"""Optimizers from an `optimizer` config block; every stage (RL, SFT, DPO, reward model) builds
its optimizer and its post-update here, from a block with the same fields:

  name           adamw | muon | sgd
  learning_rate  peak learning rate
  weight_decay, b1, b2, momentum   AdamW's (Muon shares lr and weight decay), SGD's momentum
  grad_clip      global-norm clipping before the optimizer (0: off)
  qk_clip_tau    QK-clip (Kimi K2) after every update (0: off)
  warmup_steps, decay_to   linear warm-up from 0, then cosine decay to decay_to * learning_rate
                 over the stage's steps; 0 and 1.0 keep the learning rate constant
"""
import functools

import optax

from kimi_jax.optimizers.qk_clip import qk_clip
from kimi_jax.training.steps import keep_params

OPTIMIZERS = ("adamw", "muon", "sgd")


def learning_rate(cfg, total_steps: int | None, key: str = "optimizer"):
  """The constant learning rate, or the warm-up + cosine schedule over `total_steps`."""
  if cfg.warmup_steps == 0 and cfg.decay_to == 1.0:
    return cfg.learning_rate
  if total_steps is None:
    raise ValueError(f"config.{key}.warmup_steps={cfg.warmup_steps}, config.{key}.decay_to="
                     f"{cfg.decay_to}: this stage resets its optimizer, so it needs a constant "
                     "learning rate (warmup_steps=0, decay_to=1.0)")
  # max(): a stage of zero steps (only re-exporting, e.g. under a new RoPE theta) still builds.
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                            max(total_steps, cfg.warmup_steps + 1),
                                            cfg.learning_rate * cfg.decay_to)


def build_optimizer(cfg, total_steps: int | None = None,
                    key: str = "optimizer") -> optax.GradientTransformation:
  """AdamW, Muon (Moonlight scaling, sharing AdamW's lr and weight decay) or momentum SGD,
  after global-norm clipping, for the block `config.<key>` of a stage of `total_steps`."""
  lr = learning_rate(cfg, total_steps, key)
  if cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.name == "muon":
    from kimi_jax.optimizers.muon import muon
    tx = muon(lr, weight_decay=cfg.weight_decay)
  elif cfg.name == "sgd":
    tx = optax.sgd(lr, momentum=cfg.momentum or None)
  else:
    raise ValueError(f"config.{key}.name={cfg.name!r}: expected one of {OPTIMIZERS}")
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip else tx


def optimizer_checks(cfg, key: str):
  """(dotted key, ok, why) checks of the optimizer block `config.<key>`."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  yield (f"{key}.name", cfg.name in OPTIMIZERS, f"expected one of {OPTIMIZERS}")
  yield (f"{key}.learning_rate", number(cfg.learning_rate) and cfg.learning_rate > 0,
         "must be a number > 0")
  yield (f"{key}.weight_decay", number(cfg.weight_decay) and cfg.weight_decay >= 0, "must be >= 0")
  yield (f"{key}.grad_clip", number(cfg.grad_clip) and cfg.grad_clip >= 0, "must be >= 0 (0: off)")
  yield (f"{key}.qk_clip_tau", number(cfg.qk_clip_tau) and cfg.qk_clip_tau >= 0,
         "must be >= 0 (0: off)")
  yield (f"{key}.warmup_steps", isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= 0,
         "must be an int >= 0")
  yield (f"{key}.decay_to", number(cfg.decay_to) and 0 <= cfg.decay_to <= 1, "must be in [0, 1]")


def build_post_update(cfg):
  """QK-clip (Kimi K2) after every update when `qk_clip_tau` > 0, else the identity."""
  return functools.partial(qk_clip, tau=cfg.qk_clip_tau) if cfg.qk_clip_tau > 0 else keep_params
