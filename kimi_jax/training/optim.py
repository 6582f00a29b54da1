"""Optimizer construction from an `optimizer` config block."""
import functools

import optax

from kimi_jax.optimizers.qk_clip import qk_clip
from kimi_jax.training.steps import keep_params

OPTIMIZERS = ("adamw", "muon", "sgd")


def build_optimizer(cfg, schedule=None) -> optax.GradientTransformation:
  """AdamW, Muon (Moonlight scaling, sharing AdamW's lr and weight decay) or momentum SGD,
  after global-norm clipping."""
  lr = cfg.learning_rate if schedule is None else schedule
  if cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.name == "muon":
    from kimi_jax.optimizers.muon import muon
    tx = muon(lr, weight_decay=cfg.weight_decay)
  elif cfg.name == "sgd":
    tx = optax.sgd(lr, momentum=cfg.momentum or None)
  else:
    raise ValueError(f"optimizer.name={cfg.name!r}: expected one of {OPTIMIZERS}")
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip else tx


def build_post_update(cfg):
  """QK-clip (Kimi K2) after every update when `qk_clip_tau` > 0, else the identity."""
  return functools.partial(qk_clip, tau=cfg.qk_clip_tau) if cfg.qk_clip_tau > 0 else keep_params
