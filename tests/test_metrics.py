"""Metrics against hand-computed references."""
import numpy as np
import pytest

from pali.evaluation import detection_metrics, metrics


def loc(*vals):
  return "".join(f"<loc{v:04d}>" for v in vals)


# ------------------------------------------------------------------------------------------
# Detection.
# ------------------------------------------------------------------------------------------

CAT_A = loc(0, 0, 300, 300) + " cat"
CAT_B = loc(600, 600, 1000, 1000) + " cat"
DOG = loc(100, 500, 500, 900) + " dog"


def test_parse_detections():
  objs = detection_metrics.parse_detections(f"{CAT_A} ; <loc0001> <loc0002>"
                                            "<loc0003><loc0004> hot dog ;  ")
  assert [l for _, l in objs] == ["cat", "hot dog"]
  np.testing.assert_allclose(objs[0][0], np.array([0, 0, 300, 300]) / 1023)
  # Malformed: three locs, no label, index > 1023, inverted box, garbage.
  bad = (loc(1, 2, 3) + " cat ; " + loc(1, 2, 3, 4) + " ; <loc0001><loc0002><loc0003>"
         "<loc1024> cat ; " + loc(500, 0, 100, 10) + " cat ; cat")
  assert detection_metrics.parse_detections(bad) == []


def test_perfect_detections_give_ap_one():
  targets = [f"{CAT_A} ; {DOG}", CAT_B]
  preds = [f"{DOG} ; {CAT_A}", CAT_B]
  m = metrics.coco_detection_metrics(targets, preds)
  assert m == pytest.approx({"mAP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_one_of_two_found_with_false_positive_ranked_below():
  # One class, 2 ground-truth objects. Ranked detections: TP (score .9) -> precision 1 at
  # recall .5; FP (score .5) -> precision .5 at recall .5. Recall 1 is never reached.
  # COCO's 101-point interpolation: precision 1 at the 51 recall points 0, .01, ..., .50 and
  # 0 at the 50 above: AP = 51/101 at every IoU threshold (the TP box is exact).
  fp = loc(700, 0, 900, 200) + " cat"
  m = metrics.coco_detection_metrics([f"{CAT_A} ; {CAT_B}"], [(f"{CAT_A} ; {fp}", [0.9, 0.5])])
  assert m == pytest.approx({"mAP": 51 / 101, "AP50": 51 / 101, "AP75": 51 / 101})
  # Wrong order (FP .9 first, TP .5): precision .5 at recall .5 -> AP = 0.5 * 51/101.
  m = metrics.coco_detection_metrics([f"{CAT_A} ; {CAT_B}"], [(f"{CAT_A} ; {fp}", [0.5, 0.9])])
  assert m["mAP"] == pytest.approx(0.5 * 51 / 101)


def test_malformed_prediction_counts_as_no_detection():
  # Image 1 predicted exactly, image 2's prediction is malformed (3 locs): 1 of 2 objects
  # found, no false positive -> precision 1 up to recall .5 -> AP = 51/101.
  targets = [CAT_A, CAT_B]
  preds = [CAT_A, loc(600, 600, 1000) + " cat"]
  m = metrics.coco_detection_metrics(targets, preds)
  assert m["mAP"] == pytest.approx(51 / 101)
  # Nothing parsable at all -> 0.
  assert metrics.coco_detection_metrics(targets, ["", "cat"])["mAP"] == 0.0


def test_ap50_vs_ap75():
  # Ground truth: the whole image. Prediction: rows 0..634 of 1023 -> IoU = 634/1023 = .6197:
  # a TP at IoU thresholds .50, .55, .60 and a miss at .65 ... .95 (7 of 10), so
  # AP50 = 1, AP75 = 0, mAP = 3/10.
  m = metrics.coco_detection_metrics([loc(0, 0, 1023, 1023) + " cat"],
                                     [loc(0, 0, 634, 1023) + " cat"])
  assert m == pytest.approx({"mAP": 0.3, "AP50": 1.0, "AP75": 0.0})


def test_detection_dict_targets_and_single_score():
  targets = [{"boxes": [[0, 0, 300 / 1023, 300 / 1023]], "labels": ["cat"]}]
  m = metrics.coco_detection_metrics(targets, [(CAT_A, 0.3)])
  assert m["mAP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# OCR.
# ------------------------------------------------------------------------------------------


def test_anls_by_hand():
  targets = ["hello", "abc", ["cat", "dog"], "abcd"]
  preds = ["helo", "xyz", "Dog", "ab"]
  # hello/helo: distance 1, max len 5 -> NL .2 -> 0.8
  # abc/xyz: distance 3, NL 1 -> 0
  # cat|dog / "Dog" (lower-cased): exact on "dog" -> 1.0
  # abcd/ab: distance 2, NL 2/4 = .5, not < .5 -> 0
  # mean (0.8 + 0 + 1 + 0) / 4 = 0.45
  assert metrics.anls(targets, preds)["anls"] == pytest.approx(0.45)


def test_cer_and_exact_match_by_hand():
  # hello -> helo: 1 deletion; world -> wrld!: delete 'o', insert '!' = 2.
  # CER = (1 + 2) / (5 + 5) = 0.3
  assert metrics.character_error_rate(["hello", "world"], ["helo", "wrld!"])["cer"] == (
      pytest.approx(0.3))
  m = metrics.ocr_metrics([["Stop", "STOP"], "exit"], ["STOP ", "Exit"])
  assert m["exact_match"] == 0.5
  # CER does not strip: "STOP " vs closest ref "STOP": 1 insertion; exit/Exit: 1 -> 2 / 8.
  assert m["cer"] == pytest.approx(2 / 8)
  assert m["anls"] == pytest.approx(1.0)  # case-insensitive


# ------------------------------------------------------------------------------------------
# VQA.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("a dog", "dog"), ("The Dog.", "dog"), ("isnt", "isn't"),
    ("yes!", "yes"), ("  red,  white ", "red white"), ("3.5", "3.5"), ("1,000", "1000"),
    ("none", "0"), ("black-and-white", "black and white"),
])
def test_vqa_normalization(raw, norm):
  assert metrics.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_by_hand():
  ten = lambda k, ans: [ans] * k + ["other"] * (10 - k)
  # 2 of 10 humans said "2": leaving out one of the 2 matching answers leaves 1 match (1/3),
  # leaving out any of the 8 others leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  assert metrics.vqa_example_accuracy(ten(2, "2"), "two") == pytest.approx(0.6)
  # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9; 4 or more: 1; none: 0.
  assert metrics.vqa_example_accuracy(ten(3, "dog"), "a dog") == pytest.approx(0.9)
  assert metrics.vqa_example_accuracy(ten(4, "dog"), "dog") == 1.0
  assert metrics.vqa_example_accuracy(ten(4, "dog"), "cat") == 0.0
  # Fewer than 4 answers: matches / n (a single answer is exact match).
  assert metrics.vqa_example_accuracy(["yes"], "Yes") == 1.0
  assert metrics.vqa_example_accuracy(["yes", "no"], "yes") == 0.5
  m = metrics.vqa_accuracy([ten(2, "2"), "yes"], ["two", "no"])
  assert m["vqa_accuracy"] == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------
# Captioning.
# ------------------------------------------------------------------------------------------


def test_ptb_tokenize():
  assert metrics.ptb_tokenize('A man\'s dog, "running" (fast).') == "a man 's dog running fast"
  assert metrics.ptb_tokenize("Don't stop: black-and-white 3.5!") == (
      "do n't stop black-and-white 3.5")


def test_cider_by_hand():
  # Two images with disjoint vocabularies; every n-gram occurs in one image's references, so
  # idf = log(2 / 1) > 0 for all. Identical candidate and reference: for each n the clipped
  # cosine is 1 and the length penalty exp(0) = 1, so CIDEr-D = 10 * mean_n(1) = 10 per image.
  refs = ["a man riding a horse", "two dogs play in snow"]
  assert metrics.cider(refs, refs)["cider"] == pytest.approx(10.0)
  # Second candidate shares no n-gram with its reference: 0 for that image -> (10 + 0)/2.
  assert metrics.cider(refs, [refs[0], "green apples on tables"])["cider"] == (
      pytest.approx(5.0))
  # Several references per image and punctuation/case differences are tokenized away.
  multi = [["A man riding a horse.", "a person on a horse"], ["two dogs play in snow"]]
  assert metrics.cider(multi, ["a MAN, riding a horse", "two dogs play in snow!"])[
      "cider"] > 5.0


def test_bleu_identical_is_one():
  refs = ["a man riding a horse", ["two dogs play in the snow", "dogs in snow"]]
  preds = ["a man riding a horse", "two dogs play in the snow"]
  assert metrics.bleu4(refs, preds)["bleu4"] == pytest.approx(1.0, abs=1e-6)
  assert metrics.bleu4(refs, ["a horse", "cats"])["bleu4"] < 0.1


# ------------------------------------------------------------------------------------------
# UL2.
# ------------------------------------------------------------------------------------------


def test_token_and_sequence_accuracy():
  # ints (trailing pads dropped): [5,6,7] vs [5,9,7,1]: 2 of 3 positions;
  # strings: "a b c d" vs "a b x": 2 of 4 (missing position counts wrong);
  # [3,4] vs [3,4,0] (pad dropped): 2 of 2, and the only exact sequence. Total 6 / 9.
  targets = [np.array([5, 6, 7, 0, 0]), "a b c d", [3, 4]]
  preds = [np.array([5, 9, 7, 1, 0]), "a b x", [3, 4, 0]]
  assert metrics.token_accuracy(targets, preds)["token_accuracy"] == pytest.approx(6 / 9)
  assert metrics.sequence_accuracy(targets, preds)["sequence_accuracy"] == pytest.approx(1 / 3)


def test_misaligned_inputs_raise():
  with pytest.raises(ValueError, match="aligned"):
    metrics.vqa_accuracy(["a"], ["a", "b"])
