"""get_dataset: the batch contract, determinism, sharding, mixture rates, errors."""
import collections
import itertools

import numpy as np
import pytest

import tasks  # noqa: F401  (registers everything)
from pali.data import pipeline
from pali.data import vocabulary as V
from tasks import synthetic as synthetic_tasks

VOCAB = V.get_vocabulary()
LENGTHS = {"inputs": 32, "targets": 24}


def batches(name, n, **kw):
  args = dict(split="train", task_feature_lengths=LENGTHS, batch_size=4, image_size=16,
              max_images=2, shuffle=True, seed=7)
  args.update(kw)
  it = pipeline.get_dataset(name, **args).as_numpy_iterator()
  out = list(itertools.islice(it, n))
  del it
  return out


MIXTURE_ARGS = dict(batch_size=32, image_size=8, max_images=2, seed=3)


@pytest.fixture(scope="module")
def mixture_batches():
  """25 batches of 32 from the quickstart mixture (built once: building costs seconds)."""
  return batches("pali_synthetic_pretrain", 25, **MIXTURE_ARGS)


def test_mixture_batch_has_the_model_features(mixture_batches):
  b = mixture_batches[0]
  spec = {k: (v.dtype, v.shape) for k, v in b.items()}
  assert spec == {
      "images": (np.uint8, (32, 2, 8, 8, 3)),
      "image_mask": (np.int32, (32, 2)),
      "encoder_input_tokens": (np.int32, (32, 32)),
      "decoder_input_tokens": (np.int32, (32, 24)),
      "decoder_target_tokens": (np.int32, (32, 24)),
      "decoder_loss_weights": (np.float32, (32, 24)),
  }
  assert np.all(b["decoder_input_tokens"][:, 0] == 0)
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:],
                                b["decoder_target_tokens"][:, :-1])
  assert np.all((b["decoder_loss_weights"] > 0) == (b["decoder_target_tokens"] > 0))
  # One image per image task (the second slot is padding), none for text-only examples.
  assert np.all(b["image_mask"][:, 1] == 0)
  for row, mask, tokens in zip(b["images"], b["image_mask"], b["encoder_input_tokens"]):
    is_text_only = _kind(tokens) == "ul2"
    assert mask[0] == (0 if is_text_only else 1)
    if is_text_only:
      assert not row.any()


def test_same_seed_same_batches_other_seed_other_batches(mixture_batches):
  again = batches("pali_synthetic_pretrain", 3, **MIXTURE_ARGS)
  for x, y in zip(mixture_batches[:3], again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  a = batches("synthetic_shapes_caption", 1, seed=1)[0]
  b = batches("synthetic_shapes_caption", 1, seed=2)[0]
  assert not np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])


def test_shards_split_the_examples():
  kw = dict(shuffle=False, seed=None, batch_size=2, max_images=1)
  full = batches("synthetic_shapes_caption", 2, **kw)
  s0 = batches("synthetic_shapes_caption", 1, shard_id=0, num_shards=2, **kw)[0]
  s1 = batches("synthetic_shapes_caption", 1, shard_id=1, num_shards=2, **kw)[0]
  all_targets = np.concatenate([b["decoder_target_tokens"] for b in full])
  np.testing.assert_array_equal(s0["decoder_target_tokens"], all_targets[0::2])
  np.testing.assert_array_equal(s1["decoder_target_tokens"], all_targets[1::2])


def _kind(tokens):
  text = VOCAB.decode(tokens)
  if text.startswith("caption en"):
    return "caption"
  if text.startswith("ocr"):
    return "ocr"
  for prefix, kind in (("detect", "detection"), ("answer en", "vqa"), ("[", "ul2")):
    if text.startswith(prefix):
      return kind
  return text


def test_mixture_rates(mixture_batches):
  rates = dict(synthetic_tasks.PRETRAIN_RATES)
  want = {"caption": rates["synthetic_shapes_caption"] + rates["synthetic_shapes_split_caption"],
          "ocr": rates["synthetic_text_ocr"] + rates["synthetic_text_split_ocr"],
          "detection": rates["synthetic_shapes_detection"], "vqa": rates["synthetic_shapes_vqa"],
          "ul2": rates["synthetic_stdlib_ul2"]}
  counts = collections.Counter()
  for b in mixture_batches:
    counts.update(_kind(t) for t in b["encoder_input_tokens"])
  n = sum(counts.values())
  assert n == 800 and set(counts) == set(want)
  for k, r in want.items():
    assert abs(counts[k] / n - r) < 0.05, (k, counts[k] / n, r)


def test_image_size_and_validation_split():
  b = batches("synthetic_shapes_detection", 1, split="validation", image_size=24,
              max_images=1, shuffle=False)[0]
  assert b["images"].shape == (4, 1, 24, 24, 3) and b["image_mask"].tolist() == [[1]] * 4
  assert all(VOCAB.decode(t).startswith("detect ") for t in b["encoder_input_tokens"])


def test_errors_speak_to_the_user():
  with pytest.raises(ValueError, match="Unknown task or mixture 'no_such_task'"):
    pipeline.get_dataset("no_such_task", split="train", task_feature_lengths=LENGTHS,
                         batch_size=2, image_size=16)
  with pytest.raises(ValueError, match="exactly 'inputs' and 'targets'"):
    pipeline.get_dataset("synthetic_shapes_caption", split="train",
                         task_feature_lengths={"inputs": 8}, batch_size=2, image_size=16)
  with pytest.raises(ValueError, match="shard_id"):
    pipeline.get_dataset("synthetic_shapes_caption", split="train",
                         task_feature_lengths=LENGTHS, batch_size=2, image_size=16,
                         shard_id=2, num_shards=2)


def test_skip_counts_api():
  counts = pipeline.skip_counts()
  assert isinstance(counts, dict) and all(isinstance(v, int) for v in counts.values())
