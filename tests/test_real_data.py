"""Real-data paths: TFDS tasks on mock data, the user's TFRecord / JSONL sources, a team's
own task module, and every bad-input rule (each repaired or skipped and counted)."""
import importlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import tasks  # noqa: F401
from pali.data import detection as det
from pali.data import pipeline
from pali.data import robust
from pali.data import user_data
from pali.data import vocabulary as V

VOCAB = V.get_vocabulary()
LENGTHS = {"inputs": 24, "targets": 40}


def all_examples(name, split="train", **kw):
  args = dict(split=split, task_feature_lengths=LENGTHS, batch_size=1, image_size=16,
              max_images=1, shuffle=False, num_epochs=1)
  args.update(kw)
  return list(pipeline.get_dataset(name, **args).as_numpy_iterator())


def text(tokens):
  return VOCAB.decode(tokens)


def image_bytes(fmt="PNG", h=12, w=18, color=(200, 30, 30)):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), color).save(buf, format=fmt)
  return buf.getvalue()


# ---- TFDS -------------------------------------------------------------------------------
def test_tfds_caption_and_text_tasks_on_mock_data():
  with tfds.testing.mock_data(num_examples=4):
    for name, prompt in (("coco_captions", "caption en"), ("coco_captions_split", "caption en")):
      for split in ("train", "validation"):
        exs = all_examples(name, split)
        assert len(exs) == 4
        assert all(text(e["encoder_input_tokens"][0]).startswith(prompt) for e in exs)
        assert exs[0]["image_mask"].tolist() == [[1]]
    exs = all_examples("c4_ul2")
    assert len(exs) == 4
    for e in exs:
      assert VOCAB.id_to_token(e["encoder_input_tokens"][0][0]) in ("[NLU]", "[NLG]", "[S2S]")
      assert e["image_mask"].tolist() == [[0]] and not e["images"].any()


def test_tfds_coco_detection_on_mock_data():
  def as_dataset(self, split, **kwargs):
    del self, kwargs
    n = 3
    def gen():
      for i in range(n):
        yield {"image": np.full((20, 30, 3), 50 * i, np.uint8),
               "objects": {"bbox": np.array([[0.1, 0.1, 0.5, 0.4], [0.2, 0.5, 0.9, 0.9]],
                                            np.float32), "label": np.array([0, 16], np.int64)}}
    return tf.data.Dataset.from_generator(gen, output_signature={
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "objects": {"bbox": tf.TensorSpec([None, 4], tf.float32),
                    "label": tf.TensorSpec([None], tf.int64)}})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    exs = all_examples("coco2017_detection")
  assert len(exs) == 3
  for e in exs:
    prompt = text(e["encoder_input_tokens"][0])
    assert prompt.startswith("detect ") and set(prompt[7:].split(" ; ")) == {"person", "dog"}
    objs = det.parse_detection(text(e["decoder_target_tokens"][0]))
    assert sorted(l for _, l in objs) == ["dog", "person"]


# ---- the user's own records ---------------------------------------------------------------
def _example(**fields):
  f = {}
  for k, v in fields.items():
    if k == "boxes":
      f[k] = tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(v).tolist()))
    elif k == "labels":
      f[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[l.encode() for l in v]))
    else:
      v = v.encode() if isinstance(v, str) else v
      f[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
  return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def _write(path, examples):
  with tf.io.TFRecordWriter(str(path)) as w:
    for e in examples:
      w.write(e)
  return str(path)


def test_tfrecord_captions_with_bad_input(tmp_path):
  jpeg = image_bytes("JPEG", 32, 32)
  records = [
      _example(image=image_bytes(), text="a good caption"),
      _example(image=b"not an image at all", text="corrupt bytes"),
      _example(image=jpeg[: len(jpeg) // 2], text="truncated jpeg"),
      _example(image=b"", text="zero-sized image"),
      _example(image=image_bytes(), text="   "),
      _example(image=image_bytes(), text=b"\xff\xfe not utf-8"),
      _example(image=jpeg, text="another good one"),
  ]
  path = _write(tmp_path / "caps.tfrecord", records)
  user_data.register_image_text_task(
      "test_user_captions", user_data.tfrecord_source({"train": path}), kind="caption")
  robust.reset_skip_counts()
  exs = all_examples("test_user_captions")
  assert [text(e["decoder_target_tokens"][0]) for e in exs] == ["a good caption",
                                                                 "another good one"]
  assert all(e["images"].shape == (1, 1, 16, 16, 3) for e in exs)
  assert exs[0]["images"][0, 0, 8, 8].tolist() == [200, 30, 30]
  assert pipeline.skip_counts() == {"bad_image": 3, "empty_text": 1, "text_not_utf8": 1}


def test_tfrecord_detection_bad_boxes(tmp_path):
  records = [
      # outside [0, 1]: clipped; min > max: dropped.
      _example(image=image_bytes(), boxes=[[-0.1, 0.2, 0.5, 1.3], [0.6, 0.1, 0.2, 0.3]],
               labels=["cat", "dog"]),
      # 5 floats: not boxes; labels that do not match the boxes.
      _example(image=image_bytes(), boxes=[0.1, 0.2, 0.3, 0.4, 0.5], labels=["cat"]),
      _example(image=image_bytes(), boxes=[[0.1, 0.2, 0.3, 0.4]], labels=["cat", "dog"]),
      # more objects than the target length holds: the first ones (in random order) kept.
      _example(image=image_bytes(), boxes=[[0.1, 0.1, 0.2, 0.2]] * 10, labels=["cat"] * 10),
  ]
  path = _write(tmp_path / "det.tfrecord", records)
  user_data.register_image_text_task(
      "test_user_detection", user_data.tfrecord_source({"train": path}), kind="detection",
      flip=False)
  robust.reset_skip_counts()
  exs = all_examples("test_user_detection")
  assert len(exs) == 2
  objs = det.parse_detection(text(exs[0]["decoder_target_tokens"][0]))
  assert [l for _, l in objs] == ["cat"]
  np.testing.assert_allclose(objs[0][0], [0.0, 0.2, 0.5, 1.0], atol=1 / 1023)
  assert text(exs[0]["encoder_input_tokens"][0]) == "detect cat"
  kept = det.parse_detection(text(exs[1]["decoder_target_tokens"][0]))
  assert 1 <= len(kept) < 10 and exs[1]["decoder_target_tokens"][0][-1] in (0, 1)
  counts = pipeline.skip_counts()
  assert counts["bad_boxes"] == 2 and counts["detection_boxes_dropped"] == 1
  assert counts["detection_objects_dropped"] == 10 - len(kept)


def test_tfrecord_vqa_and_sharding(tmp_path):
  paths = [
      _write(tmp_path / f"vqa-{i}.tfrecord",
             [_example(image=image_bytes(), question=f"what is {i}-{j}?", answer=f"{i}{j}")
              for j in range(2)]) for i in range(2)]
  user_data.register_image_text_task(
      "test_user_vqa", user_data.tfrecord_source({"train": str(tmp_path / "vqa-*.tfrecord")}),
      kind="vqa")
  exs = all_examples("test_user_vqa")
  assert sorted(text(e["decoder_target_tokens"][0]) for e in exs) == ["00", "01", "10", "11"]
  assert all(text(e["encoder_input_tokens"][0]).startswith("answer en what is") for e in exs)
  shard = [all_examples("test_user_vqa", shard_id=i, num_shards=2) for i in range(2)]
  got = sorted(text(e["decoder_target_tokens"][0]) for s in shard for e in s)
  assert got == ["00", "01", "10", "11"] and all(len(s) == 2 for s in shard)


def test_jsonl_with_image_folder(tmp_path):
  (tmp_path / "img").mkdir()
  for name in ("a.png", "b.jpg"):
    (tmp_path / "img" / name).write_bytes(image_bytes("PNG" if name.endswith("png") else "JPEG"))
  lines = [json.dumps({"image": "a.png", "text": "hello world"}), "{not json",
           json.dumps({"image": "missing.png", "text": "gone"}),
           json.dumps({"image": "b.jpg", "text": "second line of text"}), ""]
  (tmp_path / "train.jsonl").write_text("\n".join(lines))
  user_data.register_image_text_task(
      "test_user_ocr", user_data.jsonl_source({"train": str(tmp_path / "train.jsonl")},
                                              image_dir=str(tmp_path / "img")), kind="ocr")
  robust.reset_skip_counts()
  exs = all_examples("test_user_ocr")
  assert [text(e["decoder_target_tokens"][0]) for e in exs] == ["hello world",
                                                                 "second line of text"]
  assert text(exs[0]["encoder_input_tokens"][0]) == "ocr"
  assert pipeline.skip_counts() == {"bad_json_line": 1, "missing_image_file": 1}


def test_unknown_kind_is_reported():
  with pytest.raises(ValueError, match="kind must be one of"):
    user_data.image_text_preprocessors("captioning")


# ---- a team's own module ------------------------------------------------------------------
def test_custom_task_module_builds_a_batch():
  mod = importlib.import_module("tests.custom_task_module")
  ds = pipeline.get_dataset(mod.TASK_NAME, split="train", task_feature_lengths=LENGTHS,
                            batch_size=2, image_size=16, max_images=1, shuffle=True, seed=0)
  b = next(ds.as_numpy_iterator())
  assert b["images"].shape == (2, 1, 16, 16, 3) and b["encoder_input_tokens"].shape == (2, 24)
  assert {text(t) for t in b["decoder_target_tokens"]} <= set(mod.CAPTIONS)
