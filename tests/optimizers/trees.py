"""Parameter trees for the optimizer tests: the real model layout at tiny sizes."""
import jax
import numpy as np
from flax import traverse_util

from kimi_jax.model import ModelConfig, init_params, param_logical_specs

# GQA (4 query heads, 2 kv heads) with q/k/v biases: every kind of leaf the model has.
CONFIG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=4, qkv_bias=True)
MUON_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_params(dtype=np.float32):
  params = init_params(CONFIG, jax.random.key(0))
  return jax.tree.map(lambda x: x.astype(dtype), params)


def logical_specs():
  return param_logical_specs(CONFIG)


def is_hidden_kernel(path: tuple) -> bool:
  """Written out independently of `routing`: hidden projection kernels only."""
  return path[-1] == "kernel" and path[-2] in MUON_MODULES


def random_grads(params, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)


def flat(tree) -> dict:
  return traverse_util.flatten_dict(tree)


def small_params(dtype=np.float32):
  """A wide and a tall Muon matrix, an embedding and a norm: cheap to compile."""
  rng = np.random.default_rng(0)
  shapes = {("embed_tokens", "embedding"): (32, 8), ("mlp", "up_proj", "kernel"): (8, 24),
            ("mlp", "down_proj", "kernel"): (24, 8), ("norm", "scale"): (8,)}
  return traverse_util.unflatten_dict(
      {path: (0.1 * rng.normal(size=shape)).astype(dtype) for path, shape in shapes.items()})


def assert_trees_close(actual, expected, rtol: float, floor: float):
  """Leafwise allclose; `floor` * the leaf's largest |entry| is the absolute tolerance, since
  Newton-Schulz round-off scales with the whole matrix, not with each entry."""
  expected_flat = flat(expected)
  for path, value in flat(actual).items():
    np.testing.assert_allclose(value, expected_flat[path], rtol=rtol,
                               atol=floor * np.abs(expected_flat[path]).max(), err_msg=str(path))
