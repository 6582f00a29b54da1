"""Muon (Moonlight / KellerJordan scaling) and QK-clip as reusable optax pieces.

- `muon`: newton_schulz, scale_by_muon, scale_by_shape, muon (Muon + AdamW partition).
- `routing`: which leaves Muon orthogonalises, from paths and ranks, user-overridable.
- `qk_clip`: per-head W_q/W_k rescaling after the update (Kimi K2).
- `reset`: fresh optimizer state placed like the previous one (k1.5 resets every iteration).
"""
from kimi_jax.optimizers.muon import muon, newton_schulz, scale_by_muon, scale_by_shape
from kimi_jax.optimizers.qk_clip import qk_clip
from kimi_jax.optimizers.reset import reset_optimizer_state
from kimi_jax.optimizers.routing import route_by_path

__all__ = ["muon", "newton_schulz", "qk_clip", "reset_optimizer_state", "route_by_path",
           "scale_by_muon", "scale_by_shape"]
