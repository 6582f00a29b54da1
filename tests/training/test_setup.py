"""Run set-up: each stage sees only its own sections, and every runner refuses a bad config at
start, before it writes anything, naming the full dotted key."""
import os

import ml_collections
import pytest

from experiments import long2short_arith, rl_arith, vision_arith
from kimi_jax.training import long2short_run, rl, sft_run
from kimi_jax.training.setup import every_or_final, stage_config

RUNNERS = {"rl": (rl, rl_arith.get_config), "sft": (sft_run, rl_arith.get_config),
           "long2short": (long2short_run, lambda v: long2short_arith.get_config("dpo," + v))}


def loose(config):
  """An unlocked copy without ml_collections' type safety (as a config built in Python may be)."""
  return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def test_a_stage_sees_only_its_sections():
  config = rl_arith.get_config("smoke")
  view = stage_config(config, ("seed", "rl"), "probe")
  assert set(view.keys()) == {"seed", "rl"} and view.rl.k == config.rl.k
  with pytest.raises(AttributeError, match="sampler"):
    view.sampler  # noqa: B018 (the access is the test)
  with pytest.raises(ValueError, match=r"probe: the config has no section\(s\) \['corpus2'\]"):
    stage_config(config, ("seed", "corpus2"), "probe")
  assert "long2short" not in rl.SECTIONS and "corpus" not in rl.SECTIONS
  with_images = vision_arith.get_config("smoke")  # an optional section is kept when present
  assert stage_config(with_images, ("seed",), "probe").images == with_images.images


@pytest.mark.parametrize("stage", list(RUNNERS))
@pytest.mark.parametrize("key,value,message", [
    ("eval.k", 5, r"config.eval.k=5: must be an int in \[1, eval.samples\]"),
    ("eval.samples", "4", r"config.eval.samples='4': must be an int >= 1"),
    ("sft.optimizer.name", "lion", r"config.sft.optimizer.name='lion': expected one of"),
    ("sft.optimizer.decay_to", 2.0, r"config.sft.optimizer.decay_to=2.0: must be in \[0, 1\]"),
])
def test_every_runner_names_a_bad_key_before_writing_anything(stage, key, value, message,
                                                              tmp_path):
  runner, get_config = RUNNERS[stage]
  config = loose(get_config("smoke"))
  if stage == "long2short" and key.startswith("sft."):
    key = "long2short." + key  # long2short's own SFT block
    message = message.replace("config.sft", "config.long2short.sft")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    runner.run(config, str(workdir))
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("key,value,message", [
    ("rl.k", 2.5, r"config.rl.k=2.5: must be an int >= 2"),
    ("optimizer.learning_rate", -1.0, r"config.optimizer.learning_rate=-1.0: must be a number > 0"),
    ("checkpoint.every", 0, r"config.checkpoint.every=0: must be an int >= 1"),
])
def test_rl_names_its_own_keys(key, value, message, tmp_path):
  config = loose(rl_arith.get_config("smoke"))
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    rl.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_every_or_final():
  assert [s for s in range(1, 11) if every_or_final(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 4) if every_or_final(s, 5, 3)] == [3]
