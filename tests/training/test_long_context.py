"""Long-context stages: stage 2 starts from stage 1's exact weights with RoPE theta raised,
trains on longer windows, and refuses a checkpoint that differs in anything else."""
import jax
import numpy as np
import pytest

from experiments.long_context_arith import get_config
from kimi_jax.checkpointing.hf import CheckpointError, load_hf
from kimi_jax.training import sft_run

pytestmark = pytest.mark.slow


def stage(name: str, checkpoint: str = "", **sft):
  config = get_config(f"{name},smoke")
  with config.unlocked():
    config.sft.update(sft)
    if checkpoint:
      config.init.checkpoint = checkpoint
  return config


def test_rope_theta_stage_starts_from_the_previous_stage(tmp_path):
  sft_run.run(stage("stage1"), str(tmp_path / "lc1"))
  stage1_config, stage1_params = load_hf(str(tmp_path / "lc1" / "hf"))
  # Zero steps: the export is stage 1's weights under the new theta, bit for bit.
  sft_run.run(stage("stage2", str(tmp_path / "lc1" / "hf"), steps=0), str(tmp_path / "lc2_0"))
  same_config, same_params = load_hf(str(tmp_path / "lc2_0" / "hf"))
  assert (stage1_config.rope_theta, same_config.rope_theta) == (1e4, 1e6)
  jax.tree.map(np.testing.assert_array_equal, stage1_params, same_params)
  summary = sft_run.run(stage("stage2", str(tmp_path / "lc1" / "hf")), str(tmp_path / "lc2"))
  # The smoke worksheets are longer than stage 1's 64-token windows: the long bucket exists.
  assert "heldout/loss_pos64-256" in summary and np.isfinite(summary["heldout/loss_pos64-256"])


def test_other_model_differences_are_refused(tmp_path):
  sft_run.run(stage("stage1", steps=0), str(tmp_path / "lc1"))
  config = stage("stage2", str(tmp_path / "lc1" / "hf"), steps=0)
  with config.unlocked():
    config.model.intermediate_size = 96
  with pytest.raises(CheckpointError, match=r"\['intermediate_size'\]"):
    sft_run.run(config, str(tmp_path / "lc2"))
