"""TFDS-backed tasks for users who have the data prepared (`tfds build` or a TFDS data dir;
set TFDS_DATA_DIR or pass data_dir through gin-free env as TFDS does):

- `coco_captions`, `coco_captions_split`: captioning and split captioning on
  `coco_captions` (a random one of the image's captions each time);
- `coco2017_detection`: detection on `coco/2017` (80 class names, crowd boxes kept);
- `c4_ul2`: UL2 denoising on `c4/en` (text only, zero images).

TFDS images are decoded by TFDS (they were validated when the data set was prepared).
"""
import functools

import seqio
import tensorflow as tf

from pali.data import denoising
from pali.data import detection
from pali.data import preprocessors as pp
from pali.data import robust
from tasks.common import TAIL, add_task

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")
assert len(COCO_CLASSES) == 80

COCO_SPLITS = {"train": "train", "validation": "val"}


@seqio.map_over_dataset(num_seeds=1)
@pp.no_autograph
def coco_pick_caption(x, seed):
  captions = x["captions"]["text"]
  i = tf.random.stateless_uniform([], seed, 0, tf.maximum(tf.size(captions), 1), tf.int32)
  caption = tf.cond(tf.size(captions) > 0, lambda: tf.gather(captions, i),
                    lambda: tf.constant(""))
  return {"image": x["image"], "caption": caption}


@seqio.map_over_dataset
@pp.no_autograph
def coco_objects(x):
  label = tf.clip_by_value(tf.cast(x["objects"]["label"], tf.int32), 0, len(COCO_CLASSES) - 1)
  return {"image": x["image"], "boxes": x["objects"]["bbox"],
          "labels": tf.gather(tf.constant(COCO_CLASSES), label)}


_caption_check = functools.partial(robust.validate_text, keys=("caption",))

add_task("coco_captions",
         seqio.TfdsDataSource("coco_captions:1.1.0", splits=COCO_SPLITS),
         [coco_pick_caption, _caption_check, pp.caption, pp.prepare_images, *TAIL])
add_task("coco_captions_split",
         seqio.TfdsDataSource("coco_captions:1.1.0", splits=COCO_SPLITS),
         [coco_pick_caption, _caption_check, pp.split_caption, pp.prepare_images, *TAIL])
add_task("coco2017_detection",
         seqio.TfdsDataSource("coco/2017:1.1.0", splits=("train", "validation")),
         [coco_objects, detection.detection, pp.prepare_images, *TAIL])
add_task("c4_ul2",
         seqio.TfdsDataSource("c4/en:3.1.0", splits=("train", "validation")),
         [functools.partial(pp.rekey, key_map={"targets": "text"}),
          functools.partial(robust.validate_text, keys=("targets",)), pp.tokenize,
          denoising.ul2_denoise, pp.add_empty_images, *TAIL])
