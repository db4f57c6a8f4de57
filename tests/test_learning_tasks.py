"""The learning-benchmark task variants (tasks/learning.py): scenes of 1-3 shapes, single
large dictionary words, counting questions only; their batches have the model's features."""
import re
import string

import numpy as np
import pytest

import tasks  # noqa: F401 (registers the tasks)
from pali.data import pipeline
from pali.data import synthetic_scenes as sc
from pali.data import synthetic_text as st
from tasks import learning


def test_few_shape_scenes_have_one_to_three_objects():
  counts = set()
  for i in range(60):
    e = sc.example("train", i, 32, max_shapes=learning.LEARN_MAX_SHAPES)
    n = len(e["labels"])
    assert 1 <= n <= 3 and e["boxes"].shape == (n, 4)
    counts.add(n)
  assert counts == {1, 2, 3}
  # The default keeps the usual 1-4-shape scenes.
  assert sc.scene_spec("train", 5) == sc.scene_spec("train", 5, max_shapes=sc.MAX_SHAPES)


def test_word_examples_are_single_dictionary_words_and_disjoint_splits():
  words = st.dictionary_words()
  assert len(words) == 500 and all(w.isalpha() and w.islower() for w in words)
  train = [st.word_spec("train", i) for i in range(100)]
  val = [st.word_spec("validation", i) for i in range(100)]
  key = lambda s: repr((s["lines"], s["font_frac"], s["bg"], s["x"], s["y"]))
  assert not {key(s) for s in train} & {key(s) for s in val}
  for i in range(10):
    e = st.word_example("validation", i, 64)
    assert e["text"] in words and len(e["text"].split()) == 1
    assert e["image"].shape == (64, 64, 3) and e["image"].std() > 5  # the word is drawn


def test_letter_examples_are_single_letters_larger_than_words():
  letters = [st.letter_spec("train", i) for i in range(200)]
  assert {s["lines"][0] for s in letters} == set(string.ascii_lowercase)
  assert min(s["font_frac"] for s in letters) >= 0.3 > max(
      st.word_spec("train", i)["font_frac"] for i in range(50))
  key = lambda s: repr((s["lines"], s["font_frac"], s["bg"], s["x"], s["y"]))
  assert not {key(s) for s in letters} & {key(st.letter_spec("validation", i))
                                          for i in range(100)}
  e = st.letter_example("validation", 3, 64)
  assert len(e["text"]) == 1 and e["image"].shape == (64, 64, 3) and e["image"].std() > 5


def _batch(task, n=8):
  ds = pipeline.get_dataset(task, split="validation", batch_size=n, image_size=32, shuffle=False,
                            task_feature_lengths={"inputs": 24, "targets": 32})
  b = next(iter(ds.as_numpy_iterator()))
  assert b["images"].shape == (n, 1, 32, 32, 3) and b["decoder_target_tokens"].shape == (n, 32)
  assert np.all(b["decoder_loss_weights"].sum(1) > 0)
  vocab = pipeline._lookup(task).output_features["targets"].vocabulary  # noqa: SLF001
  dec = lambda ids: vocab.decode([int(t) for t in ids if t > 1])
  return [dec(x) for x in b["encoder_input_tokens"]], [dec(x) for x in b["decoder_target_tokens"]]


@pytest.mark.parametrize("task", ["learn_shapes_detection", "learn_shapes_detection_ordered",
                                  "learn_word_ocr", "learn_word_ocr_spelled", "learn_letter_ocr",
                                  "learn_counting_vqa", "pali_synthetic_learn_v2",
                                  "pali_synthetic_learn_v3", "pali_synthetic_learn_v4",
                                  "pali_synthetic_learn_v5", "pali_synthetic_learn_v6",
                                  "pali_synthetic_learn_v7",
                                  "learn_ocr_letters_and_words",
                                  "learn_shapes_caption_ordered"])
def test_learning_task_batches(task):
  prompts, targets = _batch(task)
  if task.startswith("learn_shapes_detection"):
    assert all(p.startswith("detect ") for p in prompts)
    assert all(1 <= t.count("<loc") // 4 <= 3 and t.count("<loc") % 4 == 0 for t in targets)
    # Validation boxes are exact, not snapped to the 64 training levels.
    grid = {round(k * 1023 / 63) for k in range(64)}
    bins = [int(b) for t in targets for b in re.findall(r"<loc(\d{4})>", t)]
    assert any(b not in grid for b in bins)
    if task.endswith("_ordered"):  # dist2ori: the top-left corners get further from (0, 0)
      for t in targets:
        corners = [(int(y), int(x)) for y, x, _, _ in re.findall(
            r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>", t)]
        dist = [y * y + x * x for y, x in corners]
        assert dist == sorted(dist), t
  elif task.startswith("learn_word_ocr"):
    assert all(t in st.dictionary_words() for t in targets)
  elif task == "learn_letter_ocr":
    assert all(len(t) == 1 and t in string.ascii_lowercase for t in targets)
  elif task == "learn_shapes_caption_ordered":
    assert all(p == "caption en" for p in prompts)
    assert all(re.match(r"an? \w+ \w+", t) for t in targets), targets
  elif task == "learn_counting_vqa":
    assert all("how many" in p for p in prompts) and all(t.isdigit() for t in targets)


def test_ordered_captions_name_objects_nearest_the_top_left_first():
  for i in range(30):
    spec = sc.scene_spec("train", i)
    ordered = sc.in_dist2ori_order(spec)
    assert sorted(map(id, ordered["objects"])) == sorted(map(id, spec["objects"]))
    dist = [o["box"][0] ** 2 + o["box"][1] ** 2 for o in ordered["objects"]]
    assert dist == sorted(dist)
    names = [f"{o['color']} {o['shape']}" for o in ordered["objects"]]
    text = sc.caption(ordered)
    assert [text.index(n) for n in names] == sorted(text.index(n) for n in names) or (
        len(set(names)) < len(names)), text  # repeated names: positions are ambiguous
    assert text.split(" ", 1)[1].startswith(names[0])


def test_training_boxes_are_snapped_validation_boxes_exact():
  boxes = np.array([[0.1234, 0.5, 0.7777, 0.999]], np.float32)
  snapped = learning.snap(boxes, 64)
  assert np.allclose(snapped * 63, np.round(snapped * 63), atol=1e-4)
  assert np.abs(snapped - boxes).max() <= 0.5 / 63 + 1e-6
  # Flipping keeps a snapped coordinate on the grid.
  assert np.allclose((1 - snapped) * 63, np.round((1 - snapped) * 63), atol=1e-4)


def test_learn_cpu_config_builds_and_trains(tmp_path):
  """The learning benchmark's gin file as it is: its mixture, its model (three-conv stem,
  4-layer decoder, sin-cos <loc> rows), its optimizer (the ViT's learning-rate factor must
  match parameters) and soft <loc> targets take real steps; only the size is cut."""
  import flax.linen as nn

  from launch import launch_utils
  from pali.models import pali as pali_model
  from pali.training import trainer

  launch_utils.parse_gin(["gin_configs/runs/learn_cpu.gin"], [
      f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
      "train.eval_every = 0", "train.final_eval = False", "train.checkpoint_every = 2"])
  result = trainer.train()
  assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
  params = nn.meta.unbox(result.state.params)
  assert params["vit"]["stem_conv_2"]["kernel"].shape == (3, 3, 64, 128)
  assert "layers_3" in params["decoder"]
  cfg = pali_model.build_model_for_image_size(64).config
  assert cfg.loc_init == "sincos" and cfg.t5.num_heads == 4
