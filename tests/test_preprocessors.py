"""Preprocessors: exact token sequences on fixed seeds, denoiser statistics, detection round
trip and repairs, images, feature converter."""
import functools
import io

import numpy as np
import pytest
import seqio
import tensorflow as tf
from PIL import Image

from pali.data import denoising as dn
from pali.data import detection as det
from pali.data import feature_converter as fc
from pali.data import images as il
from pali.data import preprocessors as pp
from pali.data import robust
from pali.data import vocabulary as V

VOCAB = V.get_vocabulary()
OF = pp.output_features()
L = {"inputs": 32, "targets": 40}
TAIL = [functools.partial(pp.tokenize, output_features=OF),
        functools.partial(pp.finalize, sequence_length=L)]


def ds_of(examples):
  ds = None
  for e in examples:
    d = tf.data.Dataset.from_tensors(e)
    ds = d if ds is None else ds.concatenate(d)
  return ds


def run(fns, examples, seed=3, size=16, n=1):
  ds = ds_of(examples)
  with il.image_config(size, n), seqio.utils.map_seed_manager(seed):
    for f in fns:
      ds = f(ds)
  return list(ds.as_numpy_iterator())


def img(h=16, w=16):
  return np.zeros((h, w, 3), np.uint8)


CAPTION = {"image": img(), "caption": "a red circle above a blue square"}
TEXT = {"image": img(), "text": "Return the current file position."}


# ---- exact sequences --------------------------------------------------------------------
@pytest.mark.parametrize("fn,example,inputs,targets,in_text,out_text", [
    (pp.caption, CAPTION, [279, 269, 917, 259, 332, 1], [269, 381, 345, 724, 265, 391, 376, 1],
     "caption en", "a red circle above a blue square"),
    (pp.split_caption, CAPTION, [279, 269, 917, 259, 332, 265, 1],
     [286, 278, 345, 724, 265, 391, 376, 1], "caption en a", "red circle above a blue square"),
    (pp.ocr, TEXT, [474, 286, 1], [333, 262, 500, 326, 259, 674, 261, 1], "ocr",
     "Return the current file position."),
    (pp.split_ocr, TEXT, [474, 286, 259, 333, 1], [386, 500, 326, 259, 674, 261, 1],
     "ocr Return", "the current file position."),
])
def test_text_tasks_exact(fn, example, inputs, targets, in_text, out_text):
  out = run([fn, pp.prepare_images] + TAIL, [example])[0]
  assert out["inputs"].tolist() == inputs and out["targets"].tolist() == targets
  assert VOCAB.decode(out["inputs"]) == in_text and VOCAB.decode(out["targets"]) == out_text
  assert out["targets_weights"].tolist() == [1.0] * len(targets)
  assert out["images"].shape == (1, 16, 16, 3) and out["image_mask"].tolist() == [1]


def test_vqa_exact():
  q = {"image": img(), "questions": ["how many shapes are there?", "what color is the star?"],
       "answers": ["2", "red"]}
  out = run([pp.vqa, pp.prepare_images] + TAIL, [q])[0]
  assert out["inputs"].tolist() == [334, 260, 324, 299, 259, 332, 259, 283, 288, 319, 273, 284,
                                    267, 1]
  assert out["targets"].tolist() == [304, 1]
  assert VOCAB.decode(out["inputs"]) == "answer en how many shapes are there?"


def test_split_at_random_word_is_uniform_and_complete():
  counts = np.zeros(6)
  text = tf.constant("one two three four five six")
  ds = tf.data.Dataset.range(600).map(
      lambda s: pp.split_at_random_word(text, tf.stack([tf.cast(s, tf.int32), 0])))
  for prefix, rest in ds.as_numpy_iterator():
    p, r = prefix.decode(), rest.decode()
    assert (p + " " + r).strip() == "one two three four five six" and p and r
    counts[len(p.split())] += 1
  assert counts[0] == 0 and np.all(np.abs(counts[1:] / 600 - 0.2) < 0.06)


BOXES = {"image": img(), "boxes": np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.0, 0.9, 1.0]],
                                           np.float32), "labels": ["circle", "star"]}


def _det(**kw):
  return functools.partial(det.detection, sequence_length=L, output_features=OF, flip=False,
                           **kw)


def test_detection_exact():
  out = run([_det(), pp.prepare_images] + TAIL, [BOXES])[0]
  assert VOCAB.decode(out["inputs"]) == "detect circle ; star"
  assert out["inputs"].tolist() == [363, 266, 613, 345, 259, 415, 342, 1]
  assert VOCAB.decode(out["targets"]) == (
      "<loc0102><loc0205><loc0512><loc0614> circle ; <loc0307><loc0000><loc0921><loc1023> star")
  assert out["targets"].tolist() == [1151, 1254, 1561, 1663, 345, 259, 415, 259, 1356, 1049,
                                     1970, 2072, 342, 1]
  assert out["targets_weights"].tolist() == [1.0] * 14


def test_detection_sequence_augmentation_weights():
  out = run([_det(num_noise_boxes=2), pp.prepare_images] + TAIL, [BOXES])[0]
  text = VOCAB.decode(out["targets"])
  assert text.startswith("<loc0102><loc0205><loc0512><loc0614> circle ; <loc0307><loc0000>"
                         "<loc0921><loc1023> star ; ")
  assert text.count(" noise") == 2
  t, w = out["targets"], out["targets_weights"]
  is_loc = VOCAB.is_loc(t)
  # real objects: every token weight 1; noise boxes: loc tokens 0, label 1; EOS 0.1.
  assert np.all(w[:13] == 1.0)
  assert np.all(w[13:-1][is_loc[13:-1]] == 0.0) and is_loc[13:-1].sum() == 8
  assert np.all(w[13:-1][~is_loc[13:-1]] == 1.0)
  assert t[-1] == 1 and w[-1] == pytest.approx(0.1)


def test_detection_random_order_and_round_trip():
  rng = np.random.default_rng(0)
  lo = rng.uniform(0, 0.5, (5, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.5, (5, 2))], 1).astype(np.float32)
  labels = ["circle", "square", "triangle", "star", "hexagon"]
  ex = {"image": img(), "boxes": boxes, "labels": labels}
  firsts = set()
  for out in run([_det(), pp.prepare_images] + TAIL, [ex] * 8):
    objs = det.parse_detection(VOCAB.decode(out["targets"]))
    assert sorted(l for _, l in objs) == sorted(labels)
    for box, label in objs:
      want = boxes[labels.index(label)]
      assert np.all(np.abs(np.array(box) - want) <= 1.0 / 1023 + 1e-6)
    firsts.add(objs[0][1])
  assert len(firsts) > 1  # the order is drawn afresh for every example


def test_detection_deterministic_orders():
  # dist2ori: by ymin^2 + xmin^2 of the (flipped) box; area: largest first. Same every time.
  boxes = np.array([[0.6, 0.6, 0.9, 0.9], [0.1, 0.5, 0.2, 0.6], [0.0, 0.3, 0.8, 0.9]],
                   np.float32)
  ex = {"image": img(), "boxes": boxes, "labels": ["circle", "square", "star"]}
  for order, want in (("dist2ori", ["star", "square", "circle"]),
                      ("area", ["star", "circle", "square"])):
    outs = run([_det(order=order), pp.prepare_images] + TAIL, [ex] * 4)
    for out in outs:
      assert [l for _, l in det.parse_detection(VOCAB.decode(out["targets"]))] == want
      assert VOCAB.decode(out["inputs"]) == "detect " + " ; ".join(want)
  with pytest.raises(ValueError, match="not one of"):
    run([_det(order="sorted")], [ex])


def test_detection_flip_moves_boxes():
  image = img(8, 8)
  image[:, :2] = 255  # a bright stripe on the left
  boxes = tf.constant([[0.0, 0.0, 1.0, 0.25]])
  fimg, fboxes = il.flip_left_right(tf.constant(image), boxes)
  assert np.all(fimg.numpy()[:, -2:] == 255)
  np.testing.assert_allclose(fboxes.numpy(), [[0.0, 0.75, 1.0, 1.0]])


def test_detection_repairs_boxes_and_keeps_objects_that_fit():
  robust.reset_skip_counts()
  bad = {"image": img(), "labels": ["circle", "star", "square", "triangle", "hexagon"],
         "boxes": np.array([[-0.2, 0.1, 0.5, 1.4],    # clipped to [0, 0.1, 0.5, 1]
                            [0.6, 0.2, 0.4, 0.3],     # ymin > ymax: dropped
                            [0.3, 0.3, 0.3, 0.5],     # empty: dropped
                            [np.nan, 0.1, 0.2, 0.2],  # not finite: dropped
                            [0.1, 0.1, 0.2, 0.2]], np.float32)}
  out = run([_det(), pp.prepare_images] + TAIL, [bad])[0]
  objs = dict((l, b) for b, l in det.parse_detection(VOCAB.decode(out["targets"])))
  assert set(objs) == {"circle", "hexagon"}
  np.testing.assert_allclose(objs["circle"], [0, 0.1, 0.5, 1.0], atol=1 / 1023)
  assert robust.skip_counts()["detection_boxes_dropped"] == 3
  # Too many objects for the target length: keep those that fit, count the rest.
  many = {"image": img(), "labels": ["circle"] * 12,
          "boxes": np.tile(np.array([[0.1, 0.1, 0.4, 0.4]], np.float32), [12, 1])}
  out = run([_det(), pp.prepare_images] + TAIL, [many])[0]
  assert len(out["targets"]) <= L["targets"] and out["targets"][-1] == 1
  kept = len(det.parse_detection(VOCAB.decode(out["targets"])))
  assert 1 <= kept < 12
  assert robust.skip_counts()["detection_objects_dropped"] == 12 - kept
  # No valid object at all: the example is skipped and counted.
  none = {"image": img(), "labels": ["circle"], "boxes": np.array([[0.5, 0.5, 0.2, 0.2]],
                                                                  np.float32)}
  assert run([_det(), pp.prepare_images] + TAIL, [none]) == []
  assert robust.skip_counts()["detection_no_objects"] == 1


# ---- UL2 ---------------------------------------------------------------------------------
DENOISER_GOLDEN = {
    "R_3_0.15": (22, [2073] + list(range(4, 23)) + [2175], [2175, 23, 24, 25]),
    "X_3_0.5": (30, [2074, 3, 2175, 5, 6, 7, 2174, 13, 2173] + list(range(15, 24)) +
                [2172, 27, 2171],
                [2175, 4, 2174, 8, 9, 10, 11, 12, 2173, 14, 2172, 24, 25, 26, 2171] +
                list(range(28, 33))),
    "X_64_0.5": (38, [2074] + list(range(3, 18)) + [2175], [2175] + list(range(18, 33))),
    "S": (40, [2075] + list(range(3, 20)), list(range(20, 33))),
}


@pytest.mark.parametrize("name", sorted(DENOISER_GOLDEN))
def test_denoiser_exact(name):
  d = {x.name: x for x in dn.R_DENOISERS + dn.X_DENOISERS + (dn.S_DENOISER,)}[name]
  raw, want_in, want_out = DENOISER_GOLDEN[name]
  assert dn.max_raw_length(20, 20, d) == raw
  i, t = dn.denoise_one(tf.range(3, 33), d, raw, 20, 20, VOCAB, tf.constant([1, 2]))
  assert i.numpy().tolist() == want_in and t.numpy().tolist() == want_out


def test_length_arithmetic_matches_t5():
  # T5: inputs 512 with (3, 0.15) -> 568 raw tokens, 114 targets (EOS included on both).
  noise, spans, lin, lout = dn.span_corruption_lengths(568, 0.15, 3)
  assert (lin + 1, lout + 1) == (512, 114)


@pytest.mark.parametrize("d", dn.R_DENOISERS + dn.X_DENOISERS, ids=lambda d: d.name)
def test_denoiser_statistics(d):
  """Over many sequences: corruption rate and mean span length within 5% of the setting."""
  rng = np.random.default_rng(0)
  noise = spans = total = 0
  max_len = 100 * d.mean_span / d.rate  # stay within 100 spans (one sentinel each)
  for k in range(40):
    length = int(rng.integers(int(0.5 * max_len), int(max_len)))
    m = dn.random_spans_noise_mask(length, d.rate, d.mean_span, tf.constant([k, 11])).numpy()
    assert not m[0] and m[-1]  # starts with non-noise, ends with noise (as T5)
    total += length
    noise += m.sum()
    spans += int((m[1:] & ~m[:-1]).sum())
  assert abs(noise / total / d.rate - 1) < 0.05
  assert abs(noise / spans / d.mean_span - 1) < 0.05


def test_ul2_mixture_rates_and_lengths():
  lengths = {"inputs": 64, "targets": 48}
  docs = [{"targets": np.arange(3, 3 + n, dtype=np.int32)} for n in
          np.random.default_rng(1).integers(2, 300, size=400)]
  ds = tf.data.Dataset.from_generator(lambda: iter(docs), output_signature={
      "targets": tf.TensorSpec([None], tf.int32)})
  with seqio.utils.map_seed_manager(5):
    ds = dn.ul2_denoise(ds, lengths, OF, keep_denoiser_id=True)
    ds = pp.finalize(ds, lengths)
  names = [d.name for d, _ in dn.ul2_denoisers()]
  counts = {"S": 0, "R": 0, "X": 0}
  for x in ds.as_numpy_iterator():
    # finalize drops extra features: check lengths and the mode token.
    assert len(x["inputs"]) <= 64 and len(x["targets"]) <= 48
    assert x["inputs"][-1] == 1 and x["targets"][-1] == 1
    mode = VOCAB.id_to_token(x["inputs"][0])
    counts[{"[S2S]": "S", "[NLU]": "R", "[NLG]": "X"}[mode]] += 1
  n = sum(counts.values())
  assert n == 400 and names[0] == "S"
  assert abs(counts["S"] / n - 0.5) < 0.07
  assert abs(counts["R"] / n - 0.25) < 0.07 and abs(counts["X"] / n - 0.25) < 0.07


def test_ul2_rates_configurable():
  ds = dn.ul2_denoisers(s_rate=0.0, r_rate=1.0, x_rate=0.0)
  assert [d.name for d, _ in ds] == ["R_3_0.15", "R_8_0.15"]
  assert [p for _, p in ds] == [0.5, 0.5]
  with pytest.raises(ValueError):
    dn.ul2_denoisers(0, 0, 0)
  import gin
  gin.parse_config("ul2_denoisers.s_rate = 1.0\nul2_denoisers.x_rate = 0.0\n"
                   "ul2_denoisers.r_rate = 0.0")
  assert [d.name for d, _ in dn.ul2_denoisers()] == ["S"]


# ---- images -------------------------------------------------------------------------------
def _png(h, w, color=(255, 0, 0)):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), color).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(h, w):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), (0, 0, 255)).save(buf, format="JPEG")
  return buf.getvalue()


def test_decode_resize_and_stack():
  stack, mask = il.to_image_stack(tf.constant([_png(10, 20), _jpeg(30, 12)]),
                                  il.ImageConfig(size=8, max_images=3))
  assert stack.shape == (3, 8, 8, 3) and stack.dtype == tf.uint8
  assert mask.numpy().tolist() == [1, 1, 0]
  s = stack.numpy()
  assert np.all(s[0, ..., 0] > 240) and np.all(s[1, ..., 2] > 240) and not s[2].any()
  # More images than max_images: the first ones are kept.
  stack, mask = il.to_image_stack(tf.zeros([4, 8, 8, 3], tf.uint8),
                                  il.ImageConfig(size=8, max_images=2))
  assert stack.shape == (2, 8, 8, 3) and mask.numpy().tolist() == [1, 1]


def test_pad_resize_keeps_aspect_and_adjusts_boxes():
  image = np.zeros((10, 20, 3), np.uint8)
  image[:, :10] = 255  # left half white
  boxes = tf.constant([[0.0, 0.0, 1.0, 0.5]])
  out, b = il.resize(tf.constant(image), 20, "pad", boxes)
  assert out.shape == (20, 20, 3)
  np.testing.assert_allclose(b.numpy(), [[0.25, 0.0, 0.75, 0.5]], atol=1e-6)
  o = out.numpy()
  assert o[:5].max() == 0 and o[15:].max() == 0  # padding above and below
  assert o[6:14, 1:9].min() > 240 and o[6:14, 11:19].max() < 15


# ---- feature converter -------------------------------------------------------------------
def test_feature_converter():
  ex = {"inputs": tf.constant([5, 6, 1]), "targets": tf.constant([7, 8, 1]),
        "targets_weights": tf.constant([1.0, 0.0, 0.1]),
        "images": tf.zeros([2, 4, 4, 3], tf.uint8), "image_mask": tf.constant([1, 0])}
  out = next(fc.PaliFeatureConverter()(tf.data.Dataset.from_tensors(ex),
                                       {"inputs": 5, "targets": 4}).as_numpy_iterator())
  assert out["encoder_input_tokens"].tolist() == [5, 6, 1, 0, 0]
  assert out["decoder_target_tokens"].tolist() == [7, 8, 1, 0]
  assert out["decoder_input_tokens"].tolist() == [0, 7, 8, 1]
  np.testing.assert_allclose(out["decoder_loss_weights"], [1.0, 0.0, 0.1, 0.0])
  assert out["decoder_loss_weights"].dtype == np.float32
  assert out["image_mask"].dtype == np.int32 and out["images"].dtype == np.uint8


def test_spelled_ocr_targets_one_id_per_character_and_decode_to_the_text():
  # 'before' is three SentencePiece pieces; spelled, it is one id per letter.
  assert [VOCAB.id_to_token(i) for i in VOCAB.encode("before")] == ["be", "for", "e"]
  robust.reset_skip_counts()
  spell = functools.partial(pp.spell_targets, output_features=OF)
  (out,) = run([pp.ocr, spell] + TAIL, [{"image": img(), "text": "before set"}])
  pieces = [VOCAB.id_to_token(int(i)) for i in out["targets"][:-1]]
  assert pieces == ["b", "e", "f", "o", "r", "e", "\u2581", "s", "e", "t"]
  assert out["targets"][-1] == 1  # EOS
  assert VOCAB.decode(out["targets"].tolist()) == "before set"
  assert VOCAB.encode_spelled("before set") == out["targets"][:-1].tolist()
  assert "spelled_unknown_chars" not in robust.skip_counts()
  # A character with no single-character piece becomes unk, and is counted.
  (out,) = run([pp.ocr, spell] + TAIL, [{"image": img(), "text": "a~b"}])
  assert out["targets"].tolist() == [VOCAB.encode("a")[0], VOCAB.unk_id,
                                     VOCAB.encode("b")[0], 1]
  assert robust.skip_counts()["spelled_unknown_chars"] == 1
