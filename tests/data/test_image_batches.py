"""Training batches with images: token log-probs of the batch-major image fields equal apply_vlm
on each row alone (over the vocabulary without the vision tokens, which the policy never emits),
and SFT image batches hold one example per row."""
import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.data import image_batches, image_prompts, rendered
from kimi_jax.data.epochs import epoch_order
from kimi_jax.data.packing import Example
from kimi_jax.sharding.processes import Processes
from kimi_jax.model import apply_vlm
from kimi_jax.model.logprobs import token_logprobs
from tests.data.read_recorder import ReadRecorder
from tests.tiny_vlm import encoded, model, tokenizer

# float32; a batch row's patches sit beside padding patches, apply_vlm's do not.
ATOL = 1e-4


def rows():
  chart = rendered.render_chart((3, 8, 1, 5), rendered.ChartLayout())
  return [encoded("A+C=", [chart]),
          encoded("B=", [rendered.render_text("12", 4), chart]),
          encoded("1+2=", [])]


def test_token_logprobs_of_image_fields_equal_apply_vlm_per_row():
  config, params = model()
  prompts = rows()
  rng = np.random.default_rng(0)
  width = 40
  tokens = np.zeros((len(prompts), width + 1), np.int32)
  for i, p in enumerate(prompts):  # prompt, then random text tokens as a "response"
    tokens[i, :len(p.ids)] = p.ids
    tokens[i, len(p.ids):] = rng.integers(4, 20, width + 1 - len(p.ids))
  per_row = image_batches.padded_patches([len(p.images.pixel_values) for p in prompts], 4)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
  batch.update(image_batches.image_fields(
      config.vision, batch["tokens"], [p.images if len(p.images.image_grid_thw) else None
                                       for p in prompts], per_row))
  ours = np.asarray(jax.jit(token_logprobs, static_argnums=0)(config, params, batch))
  vision_ids = list(image_prompts.vision_token_ids(tokenizer()))
  for i, p in enumerate(prompts):
    logits = np.array(apply_vlm(config, params, batch["tokens"][i:i + 1], p.images.pixel_values,
                                p.images.image_grid_thw)[0], np.float32)
    logits[:, vision_ids] = -np.inf
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    expected = np.take_along_axis(np.asarray(logp), batch["targets"][i][:, None], axis=-1)[:, 0]
    vision = np.isin(batch["targets"][i], vision_ids)  # prompt image pads: no probability
    np.testing.assert_allclose(ours[i][~vision], expected[~vision], atol=ATOL, rtol=0)
    assert vision.sum() > 0 or not len(p.images.image_grid_thw)
    assert np.all(np.exp(ours[i][vision]) == 0.0) and np.isfinite(ours[i]).all()
  # frame ids count each row's images from 0 (a row's fields depend on that row alone)
  assert batch["frame_ids"][0].max() == 0 and batch["frame_ids"][1].max() == 1
  assert (batch["frame_ids"][2] == -1).all()  # the text row has only padding patches


def test_sft_image_batches_one_example_per_row():
  config, _ = model()
  prompts = rows()
  examples = [Example(np.array(p.ids + [5, 6, 2], np.int32),
                      np.array([False] * len(p.ids) + [True] * 3)) for p in prompts]
  images_of = lambda i: prompts[i].images if len(prompts[i].images.image_grid_thw) else None
  batches = image_batches.ImageExampleBatches(examples, images_of, config.vision, batch_size=2,
                                              seq_len=32, patches_per_row=64, pad_id=0, seed=0)
  seen = []
  for _ in range(3):  # 6 rows: every example twice (two epochs)
    batch = next(batches)
    assert batch["tokens"].shape == (2, 32) and batch["pixel_values"].shape == (2, 64, 1176)
    for row in range(2):
      length = int((batch["tokens"][row] != 0).sum())  # the example, eos included
      index = next(i for i, e in enumerate(examples) if len(e) == length
                   and (batch["tokens"][row, :length] == e.tokens).all())
      seen.append(index)
      np.testing.assert_array_equal(batch["targets"][row, :length - 1], examples[index].tokens[1:])
      np.testing.assert_array_equal(batch["loss_mask"][row, :length - 1],
                                    examples[index].trained[1:])
      assert batch["loss_mask"][row, length - 1:].sum() == 0
  assert sorted(seen) == [0, 0, 1, 1, 2, 2]


def test_each_process_builds_only_its_rows_of_the_one_process_batch():
  # 6 examples (3 prompts, two responses each), batches of 4 rows over 2 processes: a process
  # preprocesses only the images of its own rows' examples and reads no other example.
  config, _ = model()
  prompts = rows()
  examples = [Example(np.array(p.ids + response, np.int32),
                      np.array([False] * len(p.ids) + [True] * len(response)))
              for response in ([5, 6, 2], [7, 2]) for p in prompts]
  image_sets = [p.images if len(p.images.image_grid_thw) else None for p in prompts] * 2
  make = lambda examples, images_of, processes: image_batches.ImageExampleBatches(
      examples, images_of, config.vision, batch_size=4, seq_len=32, patches_per_row=64,
      pad_id=0, seed=1, processes=processes)
  whole = make(examples, image_sets.__getitem__, Processes(0, 1, None))
  example_reads = [ReadRecorder(examples) for _ in range(2)]
  image_reads = [ReadRecorder(image_sets) for _ in range(2)]
  halves = [make(example_reads[i], image_reads[i].__getitem__, Processes(i, 2, None))
            for i in range(2)]
  stream = np.concatenate([epoch_order(1, epoch, len(examples)) for epoch in range(3)])
  for step in range(3):  # 12 rows: two epochs
    for recorder in example_reads + image_reads:
      recorder.reads.clear()
    expected, parts = next(whole), [next(it) for it in halves]
    for key in expected:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
    for i in range(2):
      own = stream[step * 4 + 2 * i:step * 4 + 2 * i + 2].tolist()
      assert example_reads[i].reads == own and image_reads[i].reads == own
