"""Image preprocessing in tf.data ops: decode, resize (plain or pad-to-square with boxes
adjusted), horizontal flip (boxes too), stack up to N images with an image mask. uint8 out.

The stage's image size and image count are not known when tasks are registered (at import),
so preprocessors read them from `current()` while the dataset graph is built;
`pali.data.pipeline.get_dataset` sets them with `image_config(...)`.
"""
import contextlib
import dataclasses
import threading
from typing import Optional

import tensorflow as tf

RESIZE_METHODS = ("resize", "pad")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  size: int = 224
  max_images: int = 1
  resize_method: str = "resize"  # 'resize' (stretch to square) | 'pad' (keep aspect, pad)

  def __post_init__(self):
    if self.size <= 0 or self.max_images < 0:
      raise ValueError(f"image size must be > 0 and max_images >= 0, got {self}")
    if self.resize_method not in RESIZE_METHODS:
      raise ValueError(f"resize_method must be one of {RESIZE_METHODS}, got "
                       f"{self.resize_method!r}")


_STATE = threading.local()


def current() -> ImageConfig:
  """The image configuration in force (default: 224 px, one image, plain resize)."""
  return getattr(_STATE, "config", None) or ImageConfig()


@contextlib.contextmanager
def image_config(size: int, max_images: int, resize_method: Optional[str] = None):
  """Sets the image size / count that preprocessors read while a dataset is being built."""
  prev = getattr(_STATE, "config", None)
  _STATE.config = ImageConfig(size=int(size), max_images=int(max_images),
                              resize_method=resize_method or current().resize_method)
  try:
    yield _STATE.config
  finally:
    _STATE.config = prev


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] (first frame). Raises on corrupt bytes: use
  `pali.data.robust` for untrusted input."""
  img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  img.set_shape([None, None, 3])
  return img


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, size: int, method: str = "resize", boxes: Optional[tf.Tensor] = None):
  """uint8 [h, w, 3] -> uint8 [size, size, 3]; boxes (normalised ymin, xmin, ymax, xmax)
  are adjusted for 'pad' (the image is scaled to fit and centred on a black square).
  Returns (image, boxes)."""
  image = tf.convert_to_tensor(image)
  static = image.shape.as_list()
  if static[0] == size and static[1] == size:
    return image, boxes
  if method == "resize":
    out = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                          antialias=True)
    return _to_uint8(out), boxes
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  scale = size / tf.maximum(h, w)
  nh = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, size)
  nw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, size)
  scaled = tf.image.resize(tf.cast(image, tf.float32), tf.stack([nh, nw]), method="bilinear",
                           antialias=True)
  oy, ox = (size - nh) // 2, (size - nw) // 2
  out = tf.pad(scaled, [[oy, size - nh - oy], [ox, size - nw - ox], [0, 0]])
  out = tf.ensure_shape(_to_uint8(out), [size, size, 3])
  if boxes is not None:
    fy, fx = tf.cast(nh, tf.float32) / size, tf.cast(nw, tf.float32) / size
    oyf, oxf = tf.cast(oy, tf.float32) / size, tf.cast(ox, tf.float32) / size
    boxes = tf.stack([boxes[:, 0] * fy + oyf, boxes[:, 1] * fx + oxf,
                      boxes[:, 2] * fy + oyf, boxes[:, 3] * fx + oxf], axis=1)
  return out, boxes


def flip_left_right(image: tf.Tensor, boxes: Optional[tf.Tensor] = None):
  image = tf.reverse(image, axis=[1])
  if boxes is not None:
    boxes = tf.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], axis=1)
  return image, boxes


def random_flip(image, boxes, seed, prob: float = 0.5):
  """Flips image and boxes with probability `prob` (stateless, from `seed`)."""
  do = tf.random.stateless_uniform([], seed) < prob
  fimg, fboxes = flip_left_right(image, boxes)
  return tf.cond(do, lambda: fimg, lambda: image), tf.cond(do, lambda: fboxes, lambda: boxes)


def to_image_stack(images: tf.Tensor, config: Optional[ImageConfig] = None):
  """[n, h, w, 3] uint8 (or [h, w, 3], or encoded strings [n] / scalar) ->
  (images uint8 [N, S, S, 3], image_mask int32 [N]) with N = config.max_images: the first N
  images are kept, missing ones are zeros with mask 0."""
  config = config or current()
  size, n_max = config.size, config.max_images
  images = tf.convert_to_tensor(images)
  if images.dtype == tf.string:
    if images.shape.rank == 0:
      images = tf.reshape(images, [1])
    images = images[:n_max]
    out = tf.map_fn(lambda b: resize(decode(b), size, config.resize_method)[0], images,
                    fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
  else:
    if images.shape.rank == 3:
      images = images[None]
    images = images[:n_max]
    if images.shape[1] == size and images.shape[2] == size:
      out = images
    else:
      out = tf.map_fn(lambda im: resize(im, size, config.resize_method)[0], images,
                      fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
  n = tf.shape(out)[0]
  out = tf.pad(out, [[0, n_max - n], [0, 0], [0, 0], [0, 0]])
  out = tf.ensure_shape(tf.cast(out, tf.uint8), [n_max, size, size, 3])
  mask = tf.cast(tf.range(n_max) < n, tf.int32)
  return out, mask


def empty_images(config: Optional[ImageConfig] = None):
  config = config or current()
  return (tf.zeros([config.max_images, config.size, config.size, 3], tf.uint8),
          tf.zeros([config.max_images], tf.int32))
