"""Per-task metrics with seqio's signature ``fn(targets, predictions) -> {name: float}``.

Scales: every metric is returned on its library's natural scale: accuracies, ANLS, CER and
BLEU are fractions in [0, 1]; CIDEr is pycocoevalcap's value (1.0 = "100 CIDEr" in papers).
Multiply by 100 for paper-style figures.

- captioning: ``cider``, ``bleu4`` (``caption_metrics`` gives both); pycocoevalcap scorers
  with our own Java-free PTB-style tokenizer (``ptb_tokenize``).
- VQA: ``vqa_accuracy`` with the official answer normalisation (``normalize_vqa_answer``).
- OCR / doc-VQA: ``exact_match``, ``character_error_rate``, ``anls``.
- detection: ``coco_detection_metrics`` (see ``detection_metrics``).
- UL2 denoising: ``token_accuracy``, ``sequence_accuracy``.

Targets may be one reference or a list of references per example wherever the metric allows
several (captioning, VQA, exact match, ANLS, CER).
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Any, Sequence

import editdistance
import numpy as np

from pali.evaluation.detection_metrics import (coco_detection_metrics,  # noqa: F401
                                               parse_detections)


def _as_refs(target: Any) -> list[str]:
  """One reference or a list/tuple/array of references -> list of str."""
  if isinstance(target, (bytes, np.bytes_)):
    return [target.decode("utf-8")]
  if isinstance(target, str):
    return [target]
  refs = [t.decode("utf-8") if isinstance(t, (bytes, np.bytes_)) else str(t)
          for t in list(target)]
  if not refs:
    raise ValueError("An example has an empty list of references.")
  return refs


def _as_str(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _check_lengths(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions; they must "
                     "be aligned one to one.")
  if not targets:
    raise ValueError("No examples to score.")


# --------------------------------------------------------------------------------------------
# Captioning.
# --------------------------------------------------------------------------------------------

# What the Stanford PTB tokenizer splits off, then the coco-caption wrapper drops.
_CLITICS = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"[a-z0-9]+(?:[-.'/&][a-z0-9]+)*|n't|'[a-z]+|\S")


def ptb_tokenize(text: str) -> str:
  """Lowercases and tokenizes like coco-caption's PTBTokenizer, without Java.

  Words keep inner hyphens, periods and apostrophes ("black-and-white", "3.5"); clitics are
  split off ("dog's" -> "dog 's", "don't" -> "do n't"); every token without a letter or digit
  (punctuation, quotes, brackets) is dropped, as the coco-caption wrapper does.
  """
  text = _CLITICS.sub(r" \1", _as_str(text).lower())
  return " ".join(t for t in _TOKEN.findall(text) if re.search(r"[a-z0-9]", t))


def _caption_inputs(targets, predictions):
  _check_lengths(targets, predictions)
  gts = {i: [ptb_tokenize(r) for r in _as_refs(t)] for i, t in enumerate(targets)}
  res = {i: [ptb_tokenize(p)] for i, p in enumerate(predictions)}
  return gts, res


def cider(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus CIDEr-D (pycocoevalcap ``Cider``: n = 1..4, sigma 6, x10). The idf statistics
  come from the references of the scored corpus, so the value depends on the whole set."""
  from pycocoevalcap.cider.cider import Cider
  gts, res = _caption_inputs(targets, predictions)
  score, _ = Cider().compute_score(gts, res)
  return {"cider": float(score)}


def bleu4(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU-4 (pycocoevalcap ``Bleu``, 'closest' reference length), in [0, 1]."""
  from pycocoevalcap.bleu.bleu import Bleu
  gts, res = _caption_inputs(targets, predictions)
  with contextlib.redirect_stdout(io.StringIO()):
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"bleu4": float(scores[3])}


def caption_metrics(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  return {**cider(targets, predictions), **bleu4(targets, predictions)}


# --------------------------------------------------------------------------------------------
# VQA accuracy (official VQA v2 evaluation, vqaEval.py).
# --------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped as a negative
# look-ahead, so in effect it removes every period not followed by a digit. Kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text: str) -> str:
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def _vqa_digits_articles(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
  """The official VQA answer normalisation: whitespace, punctuation, lower case, number words
  to digits ('Two' -> '2'), articles dropped ('a dog' -> 'dog'), missing apostrophes of
  contractions restored ('isnt' -> "isn't")."""
  answer = _as_str(answer).replace("\n", " ").replace("\t", " ").strip()
  return _vqa_digits_articles(_vqa_punctuation(answer))


def vqa_example_accuracy(answers: Sequence[str], prediction: str) -> float:
  """Accuracy of one prediction against the human answers.

  With n >= 4 answers (VQA v2 has 10): the mean over the n leave-one-out subsets of
  min(1, #matches / 3), as the official script. With n <= 3 (datasets with fewer answers)
  leave-one-out cannot reach full credit, so we use min(1, #matches / n): plain exact match
  for a single answer. Unlike the official script (which assumes pre-normalised ground
  truth), the answers are normalised the same way as the prediction.
  """
  pred = normalize_vqa_answer(prediction)
  gts = [normalize_vqa_answer(a) for a in _as_refs(answers)]
  matches = [g == pred for g in gts]
  n, total = len(gts), sum(matches)
  if n <= 3:
    return min(1.0, total / n)
  # Leaving out answer j leaves total - matches[j] matches.
  return float(np.mean([min(1.0, (total - m) / 3.0) for m in matches]))


def vqa_accuracy(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Mean VQA accuracy in [0, 1]; each target is the list of human answers (or one str)."""
  _check_lengths(targets, predictions)
  return {"vqa_accuracy": float(np.mean(
      [vqa_example_accuracy(t, p) for t, p in zip(targets, predictions)]))}


# --------------------------------------------------------------------------------------------
# OCR and document VQA.
# --------------------------------------------------------------------------------------------


def exact_match(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Fraction of predictions equal to one of their references (after stripping surrounding
  whitespace; case and inner whitespace count)."""
  _check_lengths(targets, predictions)
  hits = [_as_str(p).strip() in {r.strip() for r in _as_refs(t)}
          for t, p in zip(targets, predictions)]
  return {"exact_match": float(np.mean(hits))}


def character_error_rate(targets: Sequence[Any], predictions: Sequence[str]
                         ) -> dict[str, float]:
  """Corpus CER = sum of character edit distances / sum of reference lengths (as jiwer).
  With several references, the closest one (smallest distance) is used. Can exceed 1."""
  _check_lengths(targets, predictions)
  dist = length = 0
  for t, p in zip(targets, predictions):
    p = _as_str(p)
    d, r = min((editdistance.eval(p, r), r) for r in _as_refs(t))
    dist += d
    length += len(r)
  return {"cer": float(dist / max(length, 1))}


def _anls_one(refs: Sequence[str], pred: str, threshold: float) -> float:
  norm = lambda s: " ".join(s.lower().split())
  pred = norm(pred)
  best = 0.0
  for r in refs:
    r = norm(r)
    longest = max(len(r), len(pred))
    nl = editdistance.eval(r, pred) / longest if longest else 0.0
    best = max(best, 1.0 - nl if nl < threshold else 0.0)
  return best


def anls(targets: Sequence[Any], predictions: Sequence[str], threshold: float = 0.5
         ) -> dict[str, float]:
  """Average Normalised Levenshtein Similarity (DocVQA / ST-VQA): per example, the max over
  references of 1 - NL if NL < threshold else 0, NL = edit distance / max(len) after lower
  casing and collapsing whitespace (as the official DocVQA evaluation)."""
  _check_lengths(targets, predictions)
  return {"anls": float(np.mean([_anls_one(_as_refs(t), _as_str(p), threshold)
                                 for t, p in zip(targets, predictions)]))}


def ocr_metrics(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  return {**exact_match(targets, predictions), **character_error_rate(targets, predictions),
          **anls(targets, predictions)}


# --------------------------------------------------------------------------------------------
# UL2 denoising.
# --------------------------------------------------------------------------------------------


def _as_tokens(x: Any) -> list:
  """A str is split on whitespace; an int sequence loses its trailing pads (0)."""
  if isinstance(x, (str, bytes, np.bytes_)):
    return _as_str(x).split()
  seq = list(np.asarray(x).reshape(-1).tolist())
  while seq and seq[-1] == 0:
    seq.pop()
  return seq


def token_accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """Fraction of target tokens predicted exactly at their position (corpus level: summed over
  examples, divided by the total number of target tokens). Predictions shorter than the
  target count the missing positions as wrong; extra predicted tokens are not counted."""
  _check_lengths(targets, predictions)
  correct = total = 0
  for t, p in zip(targets, predictions):
    t, p = _as_tokens(t), _as_tokens(p)
    correct += sum(a == b for a, b in zip(t, p))
    total += len(t)
  return {"token_accuracy": float(correct / max(total, 1))}


def sequence_accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """Fraction of examples whose predicted token sequence equals the target exactly."""
  _check_lengths(targets, predictions)
  return {"sequence_accuracy": float(np.mean(
      [_as_tokens(t) == _as_tokens(p) for t, p in zip(targets, predictions)]))}
