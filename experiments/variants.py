"""Variant arguments, big_vision style: `--config=experiments/x.py:a,b` applies variant `a`,
then `b`, to the base config (where both set a field, the later one wins)."""
from typing import Callable

import ml_collections

Variant = Callable[[ml_collections.ConfigDict], None]


def parse(arg: str, variants: dict[str, Variant]) -> list[str]:
  """The variant names of `arg` ("a,b"), each checked against `variants`."""
  names = [name.strip() for name in arg.split(",") if name.strip()]
  unknown = [name for name in names if name not in variants]
  if unknown or not names:
    raise ValueError(f"unknown config variant(s) {unknown or [arg]} in {arg!r}: combine any of "
                     f"{list(variants)} with commas, e.g. {list(variants)[0]},smoke")
  return names


def apply(config: ml_collections.ConfigDict, arg: str,
          variants: dict[str, Variant]) -> ml_collections.ConfigDict:
  """`config` with the variants of `arg` applied in order, then locked."""
  for name in parse(arg, variants):
    variants[name](config)
  config.lock()
  return config
