"""Vision tasks: the question only in the picture, answers right by construction, bar heights."""
import re

import numpy as np
import pytest

from kimi_jax.data import images, rendered, synthetic
from kimi_jax.data.tokenizer import char_tokenizer

LEVELS = (1, 2, 3, 4)
LAYOUT = rendered.ChartLayout(max_value=9, unit=5)


def pixels(prompt) -> np.ndarray:
  (source,) = prompt.images
  return np.asarray(images.decode_image(source))


def cells(strip: np.ndarray) -> list[np.ndarray]:
  return [strip[:, i * rendered.CELL:(i + 1) * rendered.CELL] for i in range(strip.shape[1] //
                                                                          rendered.CELL)]


@pytest.fixture(scope="module")
def arith_split():
  return rendered.arith_image_split(300, 64, LEVELS, seed=3, max_operand=9)


@pytest.fixture(scope="module")
def chart_split():
  return rendered.chart_split(300, 64, (1, 2, 3), seed=3, num_bars=4, layout=LAYOUT)


def test_arith_question_only_in_the_picture(arith_split):
  train, heldout = arith_split
  glyph = {c: cells(np.asarray(rendered.render_text(c, 1)))[0] for c in "0123456789+-="}
  blank = cells(np.asarray(rendered.render_text("", 1)))[0]
  assert len({g.tobytes() for g in glyph.values()} | {blank.tobytes()}) == 14  # all distinct
  for prompt, problem in train + heldout:
    assert prompt.question == rendered.ARITH_INSTRUCTION
    assert problem.question not in prompt.question
    assert not re.search(r"[\d+\-=]", prompt.question)  # no digit or operator in the text
    strip = pixels(prompt)
    # The picture is the question, one glyph per cell, then blank cells.
    drawn = cells(strip)
    expected = [glyph[c] for c in problem.question]
    expected += [blank] * (len(drawn) - len(expected))
    np.testing.assert_array_equal(np.stack(drawn), np.stack(expected))


def test_arith_answers_by_construction(arith_split):
  train, heldout = arith_split
  for prompt, problem in train + heldout:
    operands = [int(x) for x in re.findall(r"\d+", problem.question)]
    signs = [1] + [1 if op == "+" else -1 for op in re.findall(r"[+-]", problem.question)]
    assert prompt.answer == str(sum(s * x for s, x in zip(signs, operands))) == problem.answer
    assert prompt.difficulty == len(operands) - 1
    assert synthetic.is_correct(synthetic.target_response(problem), prompt.answer)
  assert not {p.question for _, p in train} & {p.question for _, p in heldout}
  assert len({p.question for _, p in heldout}) == len(heldout)
  assert {p.domain for p, _ in train} == {rendered.ARITH_IMAGE_DOMAIN}
  assert len({p.id for p, _ in train + heldout}) == len(train + heldout)


def test_charts_answers_by_construction(chart_split):
  train, heldout = chart_split
  for prompt, chart in train + heldout:
    asked_labels = prompt.question.rstrip("=").split("+")
    values = dict(zip(rendered.LABELS, chart.values))
    assert prompt.answer == str(sum(values[label] for label in asked_labels))
    assert prompt.difficulty == len(asked_labels) == len(set(asked_labels))
    response = chart.response()
    assert synthetic.is_correct(response, prompt.answer)
    for label in asked_labels:  # the response reads every asked bar's value
      assert f"{label}={values[label]}" in response
  assert not {c for _, c in train} & {c for _, c in heldout}
  assert {p.difficulty for p, _ in train} == {1, 2, 3}


def test_chart_bar_heights_proportional_to_values(chart_split):
  train, _ = chart_split
  for prompt, chart in train[:100]:
    image = pixels(prompt)
    is_bar = np.all(image == rendered.BAR_COLOR, axis=-1)
    columns = np.nonzero(is_bar.any(axis=0))[0]
    heights = []
    for i, value in enumerate(chart.values):
      column = is_bar[:, i * rendered.ROW:(i + 1) * rendered.ROW]
      rows = np.nonzero(column.any(axis=1))[0]
      heights.append(len(rows))
      if value:  # one solid rectangle standing on the plot's floor
        assert rows[-1] == LAYOUT.plot_height - 1 and rows[-1] - rows[0] + 1 == len(rows)
        assert column.sum() == len(rows) * rendered.BAR_WIDTH
    np.testing.assert_array_equal(heights, np.array(chart.values) * LAYOUT.unit)
    assert len(columns) == rendered.BAR_WIDTH * sum(v > 0 for v in chart.values)


def test_images_keep_every_pixel_through_preprocessing(arith_split, chart_split):
  processing = images.ImageProcessing()
  for prompt, _ in arith_split[1][:5] + chart_split[1][:5]:
    height, width = pixels(prompt).shape[:2]
    assert images.smart_resize(height, width, processing) == (height, width)
  short = rendered.render_text("1+2=", rendered.question_cells((1,), 9))
  assert images.smart_resize(short.height, short.width, processing) == (short.height, short.width)


def test_deterministic_by_seed():
  first = rendered.arith_image_split(20, 8, LEVELS, seed=5, max_operand=9)
  again = rendered.arith_image_split(20, 8, LEVELS, seed=5, max_operand=9)
  other = rendered.arith_image_split(20, 8, LEVELS, seed=6, max_operand=9)
  assert first == again and first != other
  charts = rendered.chart_split(20, 8, (1, 2), seed=5, num_bars=3, layout=LAYOUT)
  assert charts == rendered.chart_split(20, 8, (1, 2), seed=5, num_bars=3, layout=LAYOUT)


def test_charset_covers_prompts_and_responses(arith_split, chart_split):
  tokenizer = char_tokenizer(rendered.charset())
  texts = [p.question for p, _ in arith_split[0] + chart_split[0]]
  texts += [synthetic.target_response(problem) for _, problem in arith_split[0]]
  texts += [chart.response() for _, chart in chart_split[0]]
  for text in texts:
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.hf.token_to_id("<unk>") not in tokenizer.encode(text)


def test_bad_arguments():
  with pytest.raises(ValueError, match="holds 3"):
    rendered.render_text("1+2=", 3)
  with pytest.raises(ValueError, match="outside 0..9"):
    rendered.render_chart((1, 10), LAYOUT)
  with pytest.raises(ValueError, match="num_asked"):
    rendered.make_chart_question(np.random.default_rng(0), num_bars=2, num_asked=3, max_value=9)


def test_one_image_token_per_character_and_blank_pixels_enter_as_zeros():
  processing = images.ImageProcessing()
  for cells_wide in (4, 8, 9):
    strip = images.preprocess([rendered.render_text("7+5-3=1"[:cells_wide], cells_wide)],
                              processing)
    assert images.num_image_tokens(strip.image_grid_thw[0], processing.merge_size) == cells_wide
  blank = images.preprocess([rendered.render_text("", 8)], processing).pixel_values
  # The canvas is the CLIP mean rounded to 8 bits: at most half a level / std from zero.
  assert np.abs(blank).max() <= 0.5 / 255 / min(images.CLIP_STD) + 1e-6
  inked = images.preprocess([rendered.render_text("8", 4)], processing).pixel_values
  assert np.abs(inked).max() > 1.0
