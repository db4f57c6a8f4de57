"""Task features -> the model's batch features (no packing; pad to fixed lengths).

Input (per example, from the tasks): `inputs`, `targets` int32 [<= L], `targets_weights`
float32 (one per target), `images` uint8 [N, S, S, 3], `image_mask` int32 [N].
Output (per example; `pali.data.pipeline` batches them):
  images                uint8   [N, S, S, 3]
  image_mask            int32   [N]
  encoder_input_tokens  int32   [L_in]   inputs, 0-padded
  decoder_input_tokens  int32   [L_out]  targets shifted right, 0 first
  decoder_target_tokens int32   [L_out]  targets, 0-padded
  decoder_loss_weights  float32 [L_out]  targets_weights, 0 on padding

seqio's EncDecFeatureConverter drops images (or cannot pack with them), hence our own. It
has the call signature of a seqio feature converter (`converter(ds, task_feature_lengths)`,
`get_model_feature_lengths`, `pack`) so that seqio's Evaluator can use it.
"""
from typing import Mapping

import tensorflow as tf

MODEL_FEATURES = ("images", "image_mask", "encoder_input_tokens", "decoder_input_tokens",
                  "decoder_target_tokens", "decoder_loss_weights")


def _pad(x, length, dtype):
  x = tf.cast(x[:length], dtype)
  x = tf.pad(x, [[0, length - tf.shape(x)[0]]])
  return tf.ensure_shape(x, [length])


def convert_example(x: Mapping[str, tf.Tensor], input_length: int, target_length: int):
  targets = _pad(x["targets"], target_length, tf.int32)
  if "targets_weights" in x:
    weights = _pad(x["targets_weights"], target_length, tf.float32)
  else:
    weights = tf.ones([target_length], tf.float32)
  weights = weights * tf.cast(targets != 0, tf.float32)
  return {
      "images": tf.cast(x["images"], tf.uint8),
      "image_mask": tf.cast(x["image_mask"], tf.int32),
      "encoder_input_tokens": _pad(x["inputs"], input_length, tf.int32),
      "decoder_input_tokens": tf.concat([[0], targets[:-1]], axis=0),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": weights,
  }


class PaliFeatureConverter:
  """Pads (never packs) task features to the model's features; see the module docstring."""

  pack = False

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    missing = {"inputs", "targets", "images", "image_mask"} - set(ds.element_spec)
    if missing:
      raise ValueError(f"PaliFeatureConverter: the dataset lacks features {sorted(missing)} "
                       f"(has {sorted(ds.element_spec)}); every task must end with "
                       "pali.data.preprocessors.finalize")
    lin, lout = int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"])
    fn = tf.autograph.experimental.do_not_convert(lambda x: convert_example(x, lin, lout))
    return ds.map(fn,
                  num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    return {"encoder_input_tokens": task_feature_lengths["inputs"],
            "decoder_input_tokens": task_feature_lengths["targets"],
            "decoder_target_tokens": task_feature_lengths["targets"],
            "decoder_loss_weights": task_feature_lengths["targets"]}
