"""Synthetic vision tasks: arithmetic rendered as a picture, and bar-chart reading.

Rendered arithmetic (k1.5's text-rendering data): the question "7+5-3=" of the arithmetic task
is drawn, one character per 28 x 28 cell, on a strip 28 pixels high; the text prompt is only
`ARITH_INSTRUCTION`, so the question exists only as pixels. A cell is one 2x2 merge block of
14-pixel patches: the model gets one image token per character, as the text task's char
tokenizer gives one text token per character. The reference response is the text task's worked
chain ("7+5=12,12-3=9#9").

Charts: `num_bars` bars labelled A, B, ... with integer values in 0..max_value; a bar of value
v is v * `unit` pixels high and `BAR_WIDTH` wide, centred in its 28-pixel column above its
label. The text question names the bars to read ("B=" asks one value, "A+C=" a sum); the
response reads each value, then adds them left to right: "A=3,C=5,3+5=8#8". The difficulty is
the number of bars asked.

Images travel as base64 PNG strings in `Prompt.images`. Canvas sides are multiples of 28
pixels and canvases hold at least 56 * 56 pixels, so Qwen2-VL's default preprocessing keeps
every pixel (no resize).
All randomness comes from the seed; rendering is deterministic.
"""
import base64
import dataclasses
import functools
import io
import string

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from kimi_jax.data import synthetic
from kimi_jax.data.images import CLIP_MEAN
from kimi_jax.data.sources import Prompt

ARITH_IMAGE_DOMAIN = "arith_image"
CHART_DOMAIN = "chart"
ARITH_INSTRUCTION = "Solve the problem in the image."
LABELS = string.ascii_uppercase
ROW = 28  # pixels per merged-patch row (and column)
CELL = ROW  # pixels per character: one merged patch, one LM token
BAR_WIDTH = 14
MIN_STRIP_WIDTH = 56 * 56 // ROW  # a strip of at least 56 * 56 pixels is never upscaled
FONT_SIZE = 24
# The canvas is the preprocessing mean colour, so blank pixels enter the vision tower as zeros
# and only the ink carries signal (a white canvas adds one large constant to every patch).
INK, PAPER = (0, 0, 0), tuple(round(255 * m) for m in CLIP_MEAN)
BAR_COLOR = (40, 80, 200)
_MAX_REDRAWS = 10_000


@functools.cache
def _font() -> PIL.ImageFont.FreeTypeFont:
  return PIL.ImageFont.load_default(size=FONT_SIZE)


def _round_up(pixels: int) -> int:
  return -(-pixels // ROW) * ROW


def _draw_centered(draw: PIL.ImageDraw.ImageDraw, text: str, center_x: float, center_y: float):
  draw.text((center_x, center_y), text, fill=INK, font=_font(), anchor="mm")


def render_text(text: str, cells: int) -> PIL.Image.Image:
  """`text` one character per CELL-pixel cell on a strip 28 high and `cells` cells wide
  (rounded up to a multiple of 28 pixels, at least MIN_STRIP_WIDTH)."""
  if len(text) > cells:
    raise ValueError(f"{text!r} has {len(text)} characters; the strip holds {cells}")
  image = PIL.Image.new("RGB", (max(_round_up(cells * CELL), MIN_STRIP_WIDTH), ROW), PAPER)
  draw = PIL.ImageDraw.Draw(image)
  for i, char in enumerate(text):
    _draw_centered(draw, char, (i + 0.5) * CELL, ROW / 2)
  return image


def png_base64(image: PIL.Image.Image) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def question_cells(levels, max_operand: int) -> int:
  """Characters of the longest question of these levels ("99+99-99=" at level 2, max 99)."""
  return (max(levels) + 1) * len(str(max_operand)) + max(levels) + 1


def arith_image_prompt(problem: synthetic.Problem, prompt_id: str, cells: int) -> Prompt:
  """The problem drawn as a picture; the text is the instruction alone."""
  return Prompt(question=ARITH_INSTRUCTION, answer=problem.answer, id=prompt_id,
                difficulty=problem.difficulty, domain=ARITH_IMAGE_DOMAIN,
                images=(png_base64(render_text(problem.question, cells)),))


@dataclasses.dataclass(frozen=True)
class ChartQuestion:
  values: tuple[int, ...]  # bar values, left to right; bar i is labelled LABELS[i]
  asked: tuple[int, ...]  # indices of the bars the question adds, increasing

  @property
  def question(self) -> str:
    return "+".join(LABELS[i] for i in self.asked) + "="

  @property
  def answer(self) -> str:
    return str(sum(self.values[i] for i in self.asked))

  def response(self) -> str:
    """Each asked value read ("A=3"), then the additions of the arithmetic task's chain."""
    reads = [f"{LABELS[i]}={self.values[i]}" for i in self.asked]
    if len(self.asked) > 1:
      reads.append(synthetic.solve("+".join(str(self.values[i]) for i in self.asked) + "=").cot)
    return f"{synthetic.STEP_SEPARATOR.join(reads)}{synthetic.ANSWER_MARKER}{self.answer}"


@dataclasses.dataclass(frozen=True)
class ChartLayout:
  max_value: int = 9
  unit: int = 5  # pixels per unit of value

  @property
  def plot_height(self) -> int:
    """Pixels above the label row; the tallest bar fits with at least one pixel to spare."""
    return _round_up(self.max_value * self.unit + 1)


def render_chart(values, layout: ChartLayout) -> PIL.Image.Image:
  """Bars of `values` over their labels (see the module docstring for the geometry)."""
  if any(not 0 <= v <= layout.max_value for v in values):
    raise ValueError(f"values {values} outside 0..{layout.max_value}")
  image = PIL.Image.new("RGB", (ROW * len(values), layout.plot_height + ROW), PAPER)
  draw = PIL.ImageDraw.Draw(image)
  for i, value in enumerate(values):
    left = i * ROW + (ROW - BAR_WIDTH) // 2
    if value:
      draw.rectangle((left, layout.plot_height - value * layout.unit, left + BAR_WIDTH - 1,
                      layout.plot_height - 1), fill=BAR_COLOR)
    _draw_centered(draw, LABELS[i], (i + 0.5) * ROW, layout.plot_height + ROW / 2)
  return image


def make_chart_question(rng: np.random.Generator, num_bars: int, num_asked: int,
                        max_value: int) -> ChartQuestion:
  if not (1 <= num_asked <= num_bars and 2 <= num_bars <= len(LABELS)):
    raise ValueError(f"need 1 <= num_asked ({num_asked}) <= num_bars ({num_bars}) and "
                     f"2 <= num_bars <= {len(LABELS)}")
  values = tuple(int(v) for v in rng.integers(0, max_value + 1, num_bars))
  asked = tuple(sorted(int(i) for i in rng.choice(num_bars, num_asked, replace=False)))
  return ChartQuestion(values, asked)


def chart_prompt(chart: ChartQuestion, prompt_id: str, layout: ChartLayout) -> Prompt:
  return Prompt(question=chart.question, answer=chart.answer, id=prompt_id,
                difficulty=len(chart.asked), domain=CHART_DOMAIN,
                images=(png_base64(render_chart(chart.values, layout)),))


def chart_dataset(n: int, levels, seed, num_bars: int, layout: ChartLayout,
                  exclude=frozenset(), distinct: bool = False,
                  id_prefix: str = CHART_DOMAIN) -> list[tuple[Prompt, ChartQuestion]]:
  """`n` chart prompts cycling through `levels` (bars asked); like `synthetic.make_dataset`,
  charts in `exclude` are redrawn and `distinct` keeps the set free of repeats."""
  if not levels:
    raise ValueError("levels is empty")
  rng = np.random.default_rng(seed)
  taken, examples = set(exclude), []
  for i in range(n):
    level = levels[i % len(levels)]
    for _ in range(_MAX_REDRAWS):
      chart = make_chart_question(rng, num_bars, level, layout.max_value)
      if chart not in taken:
        break
    else:
      raise ValueError(f"charts with {level} of {num_bars} bars asked: no new chart after "
                       f"{_MAX_REDRAWS} draws")
    if distinct:
      taken.add(chart)
    examples.append((chart_prompt(chart, f"{id_prefix}-{i}", layout), chart))
  return examples


def chart_split(num_train: int, num_heldout: int, levels, seed: int, num_bars: int,
                layout: ChartLayout):
  """(train, held-out) lists of (prompt, chart); no held-out chart appears in training."""
  heldout_seed, train_seed = np.random.SeedSequence(seed).spawn(2)
  heldout = chart_dataset(num_heldout, levels, heldout_seed, num_bars, layout, distinct=True,
                          id_prefix=f"{CHART_DOMAIN}-heldout")
  train = chart_dataset(num_train, levels, train_seed, num_bars, layout,
                        exclude={chart for _, chart in heldout}, id_prefix=f"{CHART_DOMAIN}-train")
  return train, heldout


def arith_image_split(num_train: int, num_heldout: int, levels, seed: int, max_operand: int):
  """(train, held-out) lists of (prompt, problem): the text task's split, drawn as pictures."""
  cells = question_cells(levels, max_operand)
  def drawn(prompts, kind):
    problems = [synthetic.solve(p.question) for p in prompts]
    return [(arith_image_prompt(problem, f"{ARITH_IMAGE_DOMAIN}-{kind}-{i}", cells), problem)
            for i, problem in enumerate(problems)]
  train, heldout = synthetic.train_heldout_split(num_train, num_heldout, levels, seed,
                                                 max_operand)
  return drawn(train, "train"), drawn(heldout, "heldout")


def charset() -> str:
  """Every character of the vision tasks' prompts and responses, the arithmetic's first."""
  extra = sorted(set(ARITH_INSTRUCTION + LABELS) - set(synthetic.CHARSET))
  return synthetic.CHARSET + "".join(extra)
