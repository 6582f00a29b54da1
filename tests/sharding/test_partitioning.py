"""The sharded LM compiles without XLA's last-resort resharding (replicate, then re-split)."""
import os
import subprocess
import sys

PROGRAM = """
import jax, jax.numpy as jnp
from kimi_jax.model import init_params
from kimi_jax.model.config import ModelConfig
from kimi_jax.model.transformer import apply_lm
from kimi_jax.model.transformer import param_logical_specs
from kimi_jax.sharding.rules import activation_mesh, logical_shardings, make_mesh
from jax.sharding import NamedSharding, PartitionSpec

config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8)
mesh = make_mesh(data=2, fsdp=2, tensor=2, sequence=1)
params = jax.device_put(init_params(config, jax.random.key(0)),
                        logical_shardings(mesh, param_logical_specs(config)))
tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32),
                        NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))

def loss(p, tokens_BxT):
  with activation_mesh(mesh):
    return apply_lm(config, p, tokens_BxT).mean()

jax.jit(jax.grad(loss)).lower(params, tokens).compile()
print("compiled")
"""


def test_train_gradient_on_a_data_fsdp_tensor_mesh_needs_no_full_rematerialization():
  # The fsdp-sharded embedding table used to be looked up directly: its rows came out split
  # over fsdp where the batch wants that axis, and XLA replicated the whole activation.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_COMPILATION_CACHE_DIR": ""}
  result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
  assert "Involuntary full rematerialization" not in result.stderr, result.stderr[-3000:]
