"""Sources for a user's own image-text records, and a one-call task registration.

Two formats, one schema. Every record has an image and any of these fields:
  text      the caption / the text in the image (OCR)
  question, answer                      (VQA)
  boxes     [n, 4] or flat [4n], normalised ymin, xmin, ymax, xmax; labels [n]   (detection)

- TFRecord files of tf.train.Example: `image` (bytes: JPEG/PNG/...), `text`, `question`,
  `answer` (bytes), `boxes` (float list, flat), `labels` (bytes list).
  `tfrecord_source({'train': 'gs://bucket/train-*.tfrecord', 'validation': ...})`
  (sharded by file across hosts when there are at least as many files as hosts).
- JSONL plus an image folder: one JSON object a line, `{"image": "relative/path.jpg",
  "text": ..., "question": ..., "answer": ..., "boxes": [[y0, x0, y1, x1], ...],
  "labels": [...]}`. `jsonl_source({'train': 'train.jsonl'}, image_dir='images/')`.
  Lines that are not JSON objects ('bad_json_line') and records whose image file is missing
  ('missing_image_file') are skipped and counted when the file is read.

`register_image_text_task(name, source, kind)` registers a seqio Task for kind 'caption',
'split_caption', 'ocr', 'split_ocr', 'vqa' or 'detection' with the bad-input rules of
`pali.data.robust` (undecodable images, empty or non-UTF-8 text, malformed boxes are
skipped and counted; boxes are clipped and degenerate ones dropped).
"""
import functools
import json
import os
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from pali.data import detection as det
from pali.data import preprocessors as pp
from pali.data import robust

KINDS = ("caption", "split_caption", "ocr", "split_ocr", "vqa", "detection")


def tfrecord_source(split_to_filepattern: Mapping[str, str]) -> seqio.DataSource:
  features = {
      "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "text": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "question": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "answer": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "boxes": tf.io.RaggedFeature(tf.float32),
      "labels": tf.io.RaggedFeature(tf.string),
  }
  return seqio.TFExampleDataSource(dict(split_to_filepattern), feature_description=features)


def _read_jsonl(path: str, image_dir: str):
  records = {"image_path": [], "text": [], "question": [], "answer": [], "boxes": [],
             "labels": []}
  bad = missing = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    for raw in f:
      if not raw.strip():
        continue
      try:
        r = json.loads(raw)
        if not isinstance(r, dict) or not isinstance(r.get("image"), str):
          raise ValueError("not a record with an image path")
        boxes = [[float(v) for v in b] for b in r.get("boxes", [])]
        labels = [str(l) for l in r.get("labels", [])]
      except (ValueError, TypeError):
        bad += 1
        continue
      image_path = os.path.join(image_dir, r["image"])
      if not tf.io.gfile.exists(image_path):
        missing += 1
        continue
      records["image_path"].append(image_path)
      for k in ("text", "question", "answer"):
        v = r.get(k, "")
        records[k].append(v if isinstance(v, str) else str(v))
      records["boxes"].append([v for b in boxes for v in b])
      records["labels"].append(labels)
  if bad:
    robust._add("bad_json_line", bad)
  if missing:
    robust._add("missing_image_file", missing)
  return records


def jsonl_source(split_to_jsonl: Mapping[str, str], image_dir: str) -> seqio.DataSource:
  def dataset_fn(split, shuffle_files, seed=None):
    r = _read_jsonl(split_to_jsonl[split], image_dir)
    ds = tf.data.Dataset.from_tensor_slices({
        "image_path": tf.constant(r["image_path"], tf.string),
        "text": tf.constant(r["text"], tf.string),
        "question": tf.constant(r["question"], tf.string),
        "answer": tf.constant(r["answer"], tf.string),
        "boxes": tf.ragged.constant(r["boxes"], dtype=tf.float32, ragged_rank=1),
        "labels": tf.ragged.constant(r["labels"], dtype=tf.string, ragged_rank=1),
    })
    if shuffle_files:
      ds = ds.shuffle(max(1, len(r["text"])), seed=seed)
    return ds.map(pp.no_autograph(lambda x: {**x, "image": tf.io.read_file(x.pop("image_path"))}))

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(split_to_jsonl))


@pp.no_autograph
def _dense(x):
  return {k: (v.to_tensor() if isinstance(v, tf.RaggedTensor) else v) for k, v in x.items()}


def image_text_preprocessors(kind: str, *, num_noise_boxes: int = 0, flip: bool = True):
  """The preprocessors for a record source of the schema above."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  head = [seqio.map_over_dataset(_dense)]
  if kind in ("caption", "split_caption", "ocr", "split_ocr"):
    head.append(functools.partial(robust.validate_text, keys=("text",)))
  elif kind == "vqa":
    head.append(functools.partial(robust.validate_text, keys=("question", "answer")))
  else:
    head.append(robust.boxes_or_skip)
    head.append(functools.partial(robust.validate_text, keys=("labels",)))
  head.append(robust.decode_images_or_skip)
  body = {
      "caption": functools.partial(pp.caption, text_key="text"),
      "split_caption": functools.partial(pp.split_caption, text_key="text"),
      "ocr": pp.ocr, "split_ocr": pp.split_ocr,
      "vqa": functools.partial(pp.vqa, question_key="question", answer_key="answer"),
      "detection": functools.partial(det.detection, num_noise_boxes=num_noise_boxes,
                                     flip=flip),
  }[kind]
  return [*head, body, pp.prepare_images, pp.tokenize, pp.finalize]


def register_image_text_task(name: str, source: seqio.DataSource, kind: str,
                             metric_fns=(), postprocess_fn=None,
                             shuffle_buffer_size: Optional[int] = 1000, **kwargs):
  """Registers (once) a Task of `kind` over a user's records; returns it."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return seqio.TaskRegistry.add(
      name, source=source, output_features=pp.output_features(),
      preprocessors=image_text_preprocessors(kind, **kwargs), postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns), shuffle_buffer_size=shuffle_buffer_size)
