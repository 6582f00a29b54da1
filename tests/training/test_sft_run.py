"""The SFT stage: loss falls, the exported checkpoint reloads bit-exactly and serves our eval."""
import os

import jax
import numpy as np
import pytest

from experiments.rl_arith import get_config
from kimi_jax.checkpointing.hf import load_hf
from kimi_jax.metrics.writers import read_jsonl
from kimi_jax.training import sft_run


@pytest.mark.slow
def test_sft_stage_learns_and_exports(tmp_path):
  config = get_config("smoke")
  summary = sft_run.run(config, str(tmp_path))
  final_loss = read_jsonl(str(tmp_path / "sft_metrics.jsonl"))[-1]["sft/loss"]
  loaded_config, params = load_hf(str(tmp_path / "hf"))
  # A random init scores ~ln(V); 20 steps must beat it clearly.
  assert final_loss < np.log(loaded_config.vocab_size) - 0.5
  assert loaded_config.vocab_size % config.model.vocab_multiple == 0
  assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert 0.0 <= summary["sft/pass@1"] <= 1.0 and summary["sft/mean_tokens"] > 0


def test_a_task_longer_than_sft_seq_len_names_the_keys_to_change(tmp_path):
  config = get_config("smoke")
  config.sft.seq_len = 8
  with pytest.raises(ValueError) as info:
    sft_run.run(config, str(tmp_path))
  message = str(info.value)
  assert "config.sft.seq_len=8 is too short for task 'arith'" in message
  assert "needs config.sft.seq_len >= " in message and "max_operand" in message
  assert not os.path.exists(tmp_path / "sft_metrics.jsonl")  # refused before any training
