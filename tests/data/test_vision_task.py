"""The vision task: domains mixed as configured, references right, held-out never trained on."""
import ml_collections
import numpy as np
import pytest

from kimi_jax.data import images, rendered, synthetic
from kimi_jax.data.tasks import build_task


def task_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name="vision", reward="arith", domains=("arith", "arith_image", "chart"), levels=(1, 2, 3),
      max_operand=9, chart_levels=(1, 2), num_bars=4, chart_max_value=9, chart_unit=5,
      num_train=200, num_heldout=32, direct_answer_fraction=0.5))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def task():
  return build_task(task_config(), seed=0)


def test_domains_and_sizes(task):
  for prompts, n in ((task.train, 200), (task.heldout, 32)):
    domains = [p.domain for p in prompts]
    assert {d: domains.count(d) for d in set(domains)} == {"arith": n, "arith_image": n,
                                                           "chart": n}
  assert task.has_images and not build_task(task_config(domains=("arith",)), seed=0).has_images
  assert task.reward_by_domain == {"arith": "arith", "arith_image": "arith", "chart": "arith"}
  assert len({p.id for p in task.train + task.heldout}) == len(task.train + task.heldout)
  assert all(bool(p.images) == (p.domain != "arith") for p in task.train)


def test_references_are_right_and_mix_direct_answers(task):
  direct = 0
  for prompt in task.train:
    reference = task.reference_response(prompt)
    assert synthetic.is_correct(reference, prompt.answer)
    direct += reference == f"#{prompt.answer}"
  fraction = direct / len(task.train)
  assert abs(fraction - 0.5) < 4 * np.sqrt(0.25 / len(task.train))  # binomial 4 sigma


def test_heldout_images_never_in_training(task):
  train_images = {p.images for p in task.train if p.images}
  assert not any(p.images in train_images for p in task.heldout)


def test_deterministic_and_seeded():
  first = build_task(task_config(num_train=20, num_heldout=4), seed=1)
  again = build_task(task_config(num_train=20, num_heldout=4), seed=1)
  other = build_task(task_config(num_train=20, num_heldout=4), seed=2)
  assert first.train == again.train and first.train != other.train
  references = lambda t: [t.reference_response(p) for p in t.train]
  assert references(first) == references(again)


def test_rendered_domain_alone_shares_no_problem_with_text_domain():
  task = build_task(task_config(domains=("arith", "arith_image"), direct_answer_fraction=0.0),
                    seed=0)
  text = {p.question for p in task.train if p.domain == "arith"}
  drawn = {task.reference_response(p) for p in task.train if p.domain == "arith_image"}
  worked = {synthetic.target_response(synthetic.solve(q)) for q in text}
  assert len(drawn & worked) < len(drawn) // 4  # separate draws, overlap only by chance


@pytest.mark.parametrize("overrides, message", [
    (dict(domains=("arith", "pictures")), "task.domains"),
    (dict(domains=()), "task.domains"),
    (dict(direct_answer_fraction=1.5), "task.direct_answer_fraction"),
])
def test_bad_config_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    build_task(task_config(**overrides), seed=0)


def test_chart_layout_from_config():
  task = build_task(task_config(domains=("chart",), chart_max_value=4, chart_unit=7,
                                num_train=10, num_heldout=2), seed=0)
  layout = rendered.ChartLayout(max_value=4, unit=7)
  for prompt in task.train:
    image = np.asarray(images.decode_image(prompt.images[0]))
    assert image.shape == (layout.plot_height + rendered.ROW, 4 * rendered.ROW, 3)
