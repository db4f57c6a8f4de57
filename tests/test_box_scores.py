"""Per-box detection scores: which tokens score a box, and what that does to AP."""
import jax
import numpy as np
import pytest

from pali import decoding
from pali.data import vocabulary
from pali.evaluation import box_scores, task_metrics
from tests.test_decode_batch import _tiny_pali

TWO_OBJECTS = "<loc0010><loc0020><loc0500><loc0600> square ; <loc0100><loc0100><loc0300><loc0300> circle"


@pytest.fixture(scope="module")
def vocab():
  return vocabulary.get_vocabulary()


def test_each_box_is_scored_by_its_own_tokens(vocab):
  ids = vocab.encode(TWO_OBJECTS)
  is_loc = vocab.is_loc(np.asarray(ids))
  second = [i for i in range(1, len(ids)) if is_loc[i] and not is_loc[i - 1]][0]
  # Location tokens 0.9 each; label tokens of the first object 0.5, of the second 0.25; the
  # separator ';' and the spaces around it 0.01 (they must not count).
  lp = np.where(is_loc, np.log(0.9), np.where(np.arange(len(ids)) < second, np.log(0.5),
                                              np.log(0.25)))
  for i, t in enumerate(ids):
    if not is_loc[i] and not vocab.decode([t]).strip(" ;"):
      lp[i] = np.log(0.01)
  scores = box_scores.object_scores(ids, lp, vocab)
  # ' square' and ' circle' are one piece each.
  assert len(vocab.encode(" square")) == len(vocab.encode(" circle")) == 1
  np.testing.assert_allclose(scores, [0.9 ** 4 * 0.5, 0.9 ** 4 * 0.25], rtol=1e-6)


def test_malformed_rows_fall_back_or_score_nothing(vocab):
  lp = lambda ids: np.zeros(len(ids))
  few_locs = vocab.encode("<loc0010><loc0020> square")
  assert box_scores.object_scores(few_locs, lp(few_locs), vocab) == []
  # Two objects without the ';' between them: the whole string parses to none, the spans to
  # two, so the boxes cannot be matched to tokens: the sequence's score is used instead.
  glued = vocab.encode(TWO_OBJECTS.replace(" ;", ""))
  assert box_scores.object_scores(glued, lp(glued), vocab) is None
  assert box_scores.object_scores([], [], vocab) == []


def test_per_box_scores_rank_a_doubtful_box_below_a_sure_one():
  """Image 1: a square, found. Image 2: a circle, found, and a phantom square. With one score
  per sequence the phantom (image 2 is the likelier sequence) outranks image 1's true square:
  square AP 0.5, AP50 0.75. Scored by its own label it ranks last: AP50 1.0."""
  det = task_metrics.FAMILIES["detection"]
  targets = ["<loc0100><loc0100><loc0300><loc0300> square",
             "<loc0500><loc0500><loc0800><loc0800> circle"]
  predictions = [targets[0], targets[1] + " ; <loc0000><loc0600><loc0200><loc0900> square"]
  common = dict(targets=targets, predictions=predictions, scores=[np.log(0.3), np.log(0.9)],
                target_ids=[[]] * 2, prediction_ids=[[]] * 2)
  assert det.compute(**common)["AP50"] == pytest.approx(0.75, abs=1e-3)
  per_box = det.compute(**common, object_scores=[[0.95], [0.95, 0.1]])
  assert per_box["AP50"] == pytest.approx(1.0, abs=1e-3)
  # A row without per-box scores (None) keeps the sequence score for its boxes.
  mixed = det.compute(**common, object_scores=[None, [0.95, 0.1]])
  assert mixed["AP50"] == pytest.approx(1.0, abs=1e-3)


def test_teacher_forced_token_log_probs_sum_to_the_greedy_score():
  model, params, batch = _tiny_pali(scan=False)
  inputs = {k: batch[k] for k in ("images", "image_mask", "encoder_input_tokens")}
  tokens, scores = decoding.decode_batch(model, params, inputs, max_decode_len=5)
  lp = jax.jit(box_scores.make_token_log_probs(model))(params, inputs, tokens)
  assert lp.shape == tokens.shape
  assert (np.asarray(lp)[np.asarray(tokens) == 0] == 0).all()
  np.testing.assert_allclose(np.asarray(lp).sum(-1), np.asarray(scores), atol=1e-3)
