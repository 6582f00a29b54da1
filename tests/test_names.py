"""Every shape-suffix letter used in the package is in the legend of `kimi_jax/__init__.py`."""
import pathlib
import re

import kimi_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIXED = re.compile(r"\b[a-z][a-z0-9_]*?_((?:[A-Z]|\d+)(?:x(?:[A-Z]|\d+))*)\b")  # digits: fixed sizes


def legend() -> set[str]:
  return set(re.findall(r"^  ([A-Z])  ", kimi_jax.__doc__, flags=re.MULTILINE))


def test_legend_lists_each_letter_once():
  letters = re.findall(r"^  ([A-Z])  ", kimi_jax.__doc__, flags=re.MULTILINE)
  assert len(letters) == len(set(letters)) >= 20, letters


def test_every_suffix_letter_is_in_the_legend():
  unknown = {}
  for path in sorted((ROOT / "kimi_jax").rglob("*.py")):
    for match in SUFFIXED.finditer(path.read_text()):
      for letter in {a for a in match.group(1).split("x") if not a.isdigit()} - legend():
        unknown.setdefault(letter, f"{path.relative_to(ROOT)}: {match.group(0)}")
  assert not unknown, unknown


def test_suffix_pattern_reads_names():
  text = "logits_BxTxV = f(max_logits_LxH, positions_3xBxT, ALL_CAPS, x_1, angles_BxTxHalf)"
  found = [m.group(1) for m in SUFFIXED.finditer(text)]
  assert found == ["BxTxV", "LxH", "3xBxT", "1"]
