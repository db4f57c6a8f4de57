"""UL2 mixture of denoisers over token sequences (tf.data ops, stateless seeded randomness).

R (regular span corruption, mode token `[NLU]`): (mean span 3, rate 0.15), (8, 0.15).
X (extreme, `[NLG]`): (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5).
S (sequential / prefix LM, `[S2S]`): split point uniform, the target is the rest.
Default rates 50% S, 25% R, 25% X (UL2R / U-PaLM), each group split evenly over its settings.

Span corruption follows T5 (`random_spans_noise_mask`, `noise_span_to_unique_sentinel`):
noise tokens = round(L * rate) clipped to [1, L - 1]; spans = max(1, round(noise / mean));
span lengths by random segmentation; spans alternate non-noise, noise (starting with
non-noise); each noise span becomes one sentinel in the inputs, counting down from
`<extra_id_0>` (the top id); the targets list sentinel + removed tokens.

Length arithmetic: for each denoiser the largest raw length L is precomputed such that
[mode] + inputs + EOS <= inputs length and targets + EOS <= targets length (and at most
100 spans, one per sentinel); a longer document contributes a random chunk of that length,
so targets always fit. As in T5, short sequences round the span count: statistics hold over
long sequences.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

import gin
import seqio
import tensorflow as tf

from pali.data import robust
from pali.data.preprocessors import no_autograph
from pali.data import vocabulary as vocab_lib


@dataclasses.dataclass(frozen=True)
class Denoiser:
  name: str
  mode: str  # '[NLU]' | '[NLG]' | '[S2S]'
  mean_span: float = 0.0
  rate: float = 0.0
  prefix_lm: bool = False


R_DENOISERS = (Denoiser("R_3_0.15", "[NLU]", 3, 0.15), Denoiser("R_8_0.15", "[NLU]", 8, 0.15))
X_DENOISERS = (Denoiser("X_3_0.5", "[NLG]", 3, 0.5), Denoiser("X_8_0.5", "[NLG]", 8, 0.5),
               Denoiser("X_64_0.15", "[NLG]", 64, 0.15), Denoiser("X_64_0.5", "[NLG]", 64, 0.5))
S_DENOISER = Denoiser("S", "[S2S]", prefix_lm=True)


@gin.configurable
def ul2_denoisers(s_rate: float = 0.5, r_rate: float = 0.25,
                  x_rate: float = 0.25) -> Tuple[Tuple[Denoiser, float], ...]:
  """(denoiser, probability) pairs; each group's rate is split evenly over its settings.
  Gin: `ul2_denoisers.s_rate = 0.5` etc. (read when a dataset is built)."""
  total = s_rate + r_rate + x_rate
  if total <= 0 or min(s_rate, r_rate, x_rate) < 0:
    raise ValueError(f"UL2 rates must be >= 0 with a positive sum, got S={s_rate}, "
                     f"R={r_rate}, X={x_rate}")
  out = [(S_DENOISER, s_rate / total)]
  out += [(d, r_rate / total / len(R_DENOISERS)) for d in R_DENOISERS]
  out += [(d, x_rate / total / len(X_DENOISERS)) for d in X_DENOISERS]
  return tuple((d, p) for d, p in out if p > 0)


def span_corruption_lengths(raw_length: int, rate: float, mean_span: float):
  """(noise tokens, spans, input tokens, target tokens) for a raw length, T5's arithmetic
  (without EOS or mode token)."""
  noise = min(max(int(round(raw_length * rate)), 1), raw_length - 1)
  spans = max(1, int(round(noise / mean_span)))
  spans = min(spans, noise, raw_length - noise)
  return noise, spans, raw_length - noise + spans, noise + spans


def max_raw_length(input_budget: int, target_budget: int, d: Denoiser,
                   max_spans: int = vocab_lib.NUM_SENTINELS) -> int:
  """The largest raw token count whose corrupted inputs / targets fit the budgets."""
  if d.prefix_lm:
    return input_budget + target_budget
  best = 0
  for length in range(2, input_budget + target_budget + 2):
    noise, spans, lin, lout = span_corruption_lengths(length, d.rate, d.mean_span)
    unclamped = max(1, int(round(noise / d.mean_span)))
    if lin <= input_budget and lout <= target_budget and unclamped <= max_spans:
      best = length
  if best < 2:
    raise ValueError(f"Sequence lengths (inputs budget {input_budget}, targets budget "
                     f"{target_budget}) leave no room for denoiser {d.name}; raise "
                     "task_feature_lengths")
  return best


def _segment_lengths(num_items, num_segments, seed):
  """Random segmentation of num_items into num_segments non-empty parts (T5)."""
  first = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  order = tf.argsort(tf.random.stateless_uniform(tf.shape(first), seed))
  first = tf.pad(tf.gather(first, order), [[1, 0]])
  seg_id = tf.cumsum(first)
  return tf.math.unsorted_segment_sum(tf.ones_like(seg_id), seg_id, num_segments)


def random_spans_noise_mask(length, rate: float, mean_span: float, seed,
                            max_spans: int = vocab_lib.NUM_SENTINELS):
  """bool [length]: T5's noise mask (non-noise first, spans alternate, ends with noise)."""
  length = tf.cast(length, tf.int32)
  lf = tf.cast(length, tf.float32)
  noise = tf.clip_by_value(tf.cast(tf.round(lf * rate), tf.int32), 1, length - 1)
  spans = tf.maximum(1, tf.cast(tf.round(tf.cast(noise, tf.float32) / mean_span), tf.int32))
  spans = tf.minimum(tf.minimum(spans, noise), tf.minimum(length - noise, max_spans))
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  noise_lengths = _segment_lengths(noise, spans, s1)
  nonnoise_lengths = _segment_lengths(length - noise, spans, s2)
  interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  starts = tf.cumsum(interleaved)[:-1]
  indicator = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, length)
  return tf.equal(tf.math.floormod(tf.cumsum(indicator), 2), 1)


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int):
  """Each noise span -> one sentinel (first span `<extra_id_0>` = vocab_size - 1, then
  counting down); the other noise tokens are dropped."""
  prev = tf.pad(noise_mask[:-1], [[1, 0]])
  first = tf.logical_and(noise_mask, tf.logical_not(prev))
  subsequent = tf.logical_and(noise_mask, prev)
  sentinel = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  tokens = tf.where(first, sentinel, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(subsequent))


def _uniform_int(seed, lo, hi):
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)


def denoise_one(tokens, denoiser: Denoiser, raw_length: int, input_budget: int,
                target_budget: int, vocab, seed):
  """One example through one denoiser: (inputs without EOS, targets without EOS)."""
  s_off, s_mask = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  n = tf.size(tokens)
  length = tf.minimum(n, raw_length)
  offset = _uniform_int(s_off, 0, n - length)
  chunk = tokens[offset:offset + length]
  mode = tf.constant([vocab.mode_id(denoiser.mode)], tf.int32)
  if denoiser.prefix_lm:
    lo = tf.maximum(1, length - target_budget)
    hi = tf.minimum(length - 1, input_budget)
    k = _uniform_int(s_mask, lo, hi)
    return tf.concat([mode, chunk[:k]], 0), chunk[k:]
  mask = random_spans_noise_mask(length, denoiser.rate, denoiser.mean_span, s_mask)
  inputs = noise_span_to_unique_sentinel(chunk, mask, vocab.vocab_size)
  targets = noise_span_to_unique_sentinel(chunk, tf.logical_not(mask), vocab.vocab_size)
  return tf.concat([mode, inputs], 0), targets


def ul2_denoise(dataset, sequence_length, output_features, *,
                denoisers: Optional[Sequence[Tuple[Denoiser, float]]] = None,
                key: str = "targets", keep_denoiser_id: bool = False):
  """UL2 mixture of denoisers on the token ids in `key` (other features pass through, so it
  works on text-only and on image+text examples). Sets `inputs` and `targets` (no EOS:
  `finalize` appends it). Sequences of fewer than 2 tokens are skipped and counted
  ('ul2_too_short')."""
  denoisers = tuple(denoisers or ul2_denoisers())
  vocab = output_features["targets"].vocabulary
  input_budget = sequence_length["inputs"] - 2  # mode token, EOS
  target_budget = sequence_length["targets"] - 1  # EOS
  raw = [max_raw_length(input_budget, target_budget, d) for d, _ in denoisers]
  logits = tf.math.log(tf.constant([[p for _, p in denoisers]], tf.float32))

  @no_autograph
  def ok(x):
    good = tf.size(x[key]) >= 2
    with tf.control_dependencies([robust.count_if(tf.logical_not(good), "ul2_too_short")]):
      return tf.identity(good)

  @seqio.map_over_dataset(num_seeds=1)
  @no_autograph
  def fn(x, seed):
    s_choice, s_denoise = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    choice = tf.cast(tf.random.stateless_categorical(logits, 1, s_choice)[0, 0], tf.int32)
    tokens = tf.cast(x[key], tf.int32)
    branches = [
        (lambda d=d, r=r: denoise_one(tokens, d, r, input_budget, target_budget, vocab,
                                      s_denoise))
        for (d, _), r in zip(denoisers, raw)]
    inputs, targets = tf.switch_case(choice, branches)
    out = {**x, "inputs": inputs, "targets": targets}
    if keep_denoiser_id:
      out["denoiser_id"] = choice
    return out

  return fn(dataset.filter(ok))
