"""A confidence per decoded box, for detection AP: the probability of the box's own tokens.

AP ranks every predicted box by its score. The sequence's probability gives all boxes of an
image one score, so a doubtful box cannot rank below a sure one. pix2seq scores a box by its
class token's probability; we score it by the product of the probabilities of all its tokens,
the four locations and the label, which ranked better here (learn_cpu, two seeds, 1024
scenes: AP50 0.885 / 0.900 against 0.878 / 0.894 with the sequence's score and 0.877 / 0.892
with the label's alone; BENCHMARKS.md "Learning"). The probabilities come from one
teacher-forced pass over the decoded tokens (the same model and inputs as decoding, so the same
distribution), which leaves every decoder untouched.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pali.evaluation.detection_metrics import parse_detections


def make_token_log_probs(model):
  """`fn(params, batch, tokens [B, L]) -> log p(tokens) float32 [B, L]` (0 at padding), with
  `batch` holding the decoder's inputs (images, image_mask, encoder_input_tokens)."""

  def fn(params, batch, tokens):
    decoder_inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))  # start token 0, shifted right
    logits = model.apply({"params": params}, dict(batch, decoder_input_tokens=decoder_inputs),
                         train=False)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_lp = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(tokens > 0, token_lp, 0.0)

  return fn


def object_scores(ids: Sequence[int], token_log_probs: Sequence[float], vocab
                  ) -> Optional[list[float]]:
  """One probability per object that `parse_detections(vocab.decode(ids))` finds, in its order.

  `ids` are a decoded row up to (not including) EOS; `token_log_probs[i]` belongs to `ids[i]`.
  An object's span starts at its run of location tokens and ends before the next run; its
  tokens are the locations and the label up to the `;` separator, lone spaces left out. None
  when the spans do not give exactly the objects of the whole string (a malformed row): use
  the sequence's score then.
  """
  ids = [int(t) for t in ids]
  is_loc = np.asarray(vocab.is_loc(np.asarray(ids, np.int64)), bool)
  starts = [i for i in range(len(ids)) if is_loc[i] and (i == 0 or not is_loc[i - 1])]
  bounds = [0] + starts[1:] + [len(ids)]
  objects, scores = [], []
  for a, b in zip(bounds[:-1], bounds[1:]):
    found = parse_detections(vocab.decode(ids[a:b]))
    if len(found) > 1:
      return None
    if not found:
      continue
    object_lp = 0.0
    for i in range(a, b):
      piece = "<loc>" if is_loc[i] else vocab.decode([ids[i]])
      if ";" in piece:
        break
      if piece.strip():  # a lone space before ';' says nothing about the object
        object_lp += float(token_log_probs[i])
    objects.append(found[0])
    scores.append(float(np.exp(object_lp)))
  whole = parse_detections(vocab.decode(ids))
  same = len(whole) == len(objects) and all(
      lw == lo and np.array_equal(bw, bo) for (bw, lw), (bo, lo) in zip(whole, objects))
  return scores if same else None
