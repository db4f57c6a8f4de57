"""Tests of pali.decoding on toy models with exactly known behaviour."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali import decoding

V = 6  # 0 pad, 1 eos, 2..5 words
B = 16
L = 6


# ------------------------------------------------------------------------------------------
# A toy model whose next-token logits depend on the previous token, on the whole history
# (through a batched cache leaf) and on the row (another batched leaf), plus a scalar
# cache_index, so that wrong cache expansion / gathering in beam search changes the result.
# ------------------------------------------------------------------------------------------


def _tables(seed=0, vocab=V, rows=B):
  r = np.random.RandomState(seed)
  bigram = r.normal(size=(vocab, vocab)).astype(np.float32) * 2
  hist = r.normal(size=(7, vocab)).astype(np.float32)
  row = r.normal(size=(rows, vocab)).astype(np.float32)
  bigram[:, 0] = -100.0  # the model never wants pad
  return bigram, hist, row


def _np_logits(tables, b, fed):
  """Reference logits (numpy) of row b after feeding tokens ``fed`` (fed[0] == 0)."""
  bigram, hist, row = tables
  return bigram[fed[-1]] + 0.5 * hist[sum(fed) % 7] + row[b] + 1.0 * (len(fed) - 1) * (
      np.arange(bigram.shape[0]) == 1)


def _make_model(tables, max_len=L):
  bigram, hist, row = (jnp.asarray(t) for t in tables)
  vocab = bigram.shape[0]

  def init_cache(batch):
    return {"cache_index": jnp.array(0, jnp.int32),
            "history": jnp.zeros((batch, max_len + 1), jnp.int32),
            "row_bias": row[:batch]}

  def tokens_to_logits(tok, cache):
    i = cache["cache_index"]
    history = jax.lax.dynamic_update_slice(cache["history"], tok, (0, i))
    s = jnp.sum(history, axis=1)
    logits = (bigram[tok[:, 0]] + 0.5 * hist[s % 7] + cache["row_bias"]
              + 1.0 * i.astype(jnp.float32) * (jnp.arange(vocab) == 1))
    return logits, {"cache_index": i + 1, "history": history, "row_bias": cache["row_bias"]}

  return tokens_to_logits, init_cache


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _ref_greedy(tables, rows, max_len):
  out = np.zeros((rows, max_len), np.int32)
  scores = np.zeros(rows)
  for b in range(rows):
    fed = [0]
    for t in range(max_len):
      lp = _log_softmax(_np_logits(tables, b, fed))
      tok = int(np.argmax(lp))
      out[b, t] = tok
      scores[b] += lp[tok]
      fed.append(tok)
      if tok == 1:
        break
  return out, scores


def _seq_logp(tables, b, seq):
  fed, total = [0], 0.0
  for tok in seq:
    total += _log_softmax(_np_logits(tables, b, fed))[tok]
    fed.append(tok)
  return total


def _strip(seq):
  seq = list(np.asarray(seq))
  return seq[:seq.index(1) + 1] if 1 in seq else seq


@pytest.fixture(scope="module")
def toy():
  tables = _tables()
  ttl, init_cache = _make_model(tables)
  return tables, ttl, init_cache


# ------------------------------------------------------------------------------------------


def test_greedy_matches_stepwise_argmax_and_eos_per_row(toy):
  tables, ttl, init_cache = toy
  fn = jax.jit(functools.partial(decoding.greedy, ttl, batch_size=B, max_len=L))
  toks, scores = fn(init_cache(B))
  ref, ref_scores = _ref_greedy(tables, B, L)
  np.testing.assert_array_equal(np.asarray(toks), ref)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5, atol=1e-5)
  # Per-row EOS: rows finish at different steps and emit pad after their EOS.
  eos_pos = [list(r).index(1) if 1 in r else None for r in np.asarray(toks)]
  assert len(set(eos_pos)) >= 3, eos_pos
  for r, p in zip(np.asarray(toks), eos_pos):
    if p is not None:
      assert (r[p + 1:] == 0).all() and (r[:p] > 1).all()


def test_beam_size_one_equals_greedy(toy):
  tables, ttl, init_cache = toy
  g, gs = decoding.greedy(ttl, init_cache(B), B, L)
  bt, bs = jax.jit(functools.partial(decoding.beam_search, ttl, batch_size=B, max_len=L,
                                     beam_size=1))(init_cache(B))
  assert bt.shape == (B, 1, L) and bs.shape == (B, 1)
  ended = np.asarray((g == 1).any(axis=1))
  assert 0 < ended.sum() < B  # both finished and truncated rows are covered
  np.testing.assert_array_equal(np.asarray(bt[:, 0]), np.asarray(g))
  np.testing.assert_allclose(np.asarray(bs[:, 0]), np.asarray(gs), atol=1e-5)


def test_beam_search_beats_greedy_on_hand_made_model():
  # Bigram log-probs: start -> 2 (0.6) or 3 (0.4); after 2: eos .34, 2 .33, 3 .33;
  # after 3: eos .98, 2 .01, 3 .01. Greedy takes 2 then eos: 0.6 * 0.34 = 0.204.
  # Beam search finds 3 then eos: 0.4 * 0.98 = 0.392.
  table = np.full((4, 4), 1e-9)
  table[0, 2:] = [0.6, 0.4]
  table[2, 1:] = [0.34, 0.33, 0.33]
  table[3, 1:] = [0.98, 0.01, 0.01]
  table[1, 1] = 1.0
  logt = jnp.log(jnp.asarray(table, jnp.float32))
  ttl = lambda tok, cache: (logt[tok[:, 0]], cache)
  cache = {"dummy": jnp.zeros((2, 3))}
  g, gs = decoding.greedy(ttl, cache, 2, 3)
  np.testing.assert_array_equal(np.asarray(g), [[2, 1, 0]] * 2)
  np.testing.assert_allclose(np.asarray(gs), math.log(0.204), rtol=1e-5)
  bt, bs = decoding.beam_search(ttl, cache, 2, 3, beam_size=2)
  np.testing.assert_array_equal(np.asarray(bt[:, 0]), [[3, 1, 0]] * 2)
  np.testing.assert_allclose(np.asarray(bs[:, 0]), math.log(0.392), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(bt[:, 1]), [[2, 1, 0]] * 2)


def test_exhaustive_beam_equals_brute_force_with_length_penalty():
  # V=5, L=3: at most 9 alive prefixes x 5 tokens = 45 candidates per step, so beam 45 keeps
  # every candidate; its 9 best hypotheses must be the 9 best of all sequences (pad, at logit
  # -100, only fills the lower slots), scores included.
  vocab, rows, max_len, alpha = 5, 3, 3, 0.6
  tables = _tables(seed=3, vocab=vocab, rows=rows)
  ttl, init_cache = _make_model(tables, max_len)
  K = 45
  toks, scores = jax.jit(functools.partial(
      decoding.beam_search, ttl, batch_size=rows, max_len=max_len, beam_size=K,
      alpha=alpha))(init_cache(rows))
  lp = lambda n: ((5 + n) / 6) ** alpha
  for b in range(rows):
    cands = []
    for n in range(1, max_len + 1):
      for body in itertools.product(range(2, vocab), repeat=n - 1):
        seq = list(body) + [1]
        cands.append((_seq_logp(tables, b, seq) / lp(n), seq))
    for seq in itertools.product(range(2, vocab), repeat=max_len):  # truncated
      cands.append((_seq_logp(tables, b, list(seq)) / lp(max_len), list(seq)))
    cands.sort(key=lambda c: -c[0])
    np.testing.assert_allclose(np.asarray(scores[b, :9]), [c[0] for c in cands[:9]],
                               atol=1e-4)
    assert _strip(toks[b, 0]) == cands[0][1]


def test_sampling_degenerate_settings_equal_greedy(toy):
  tables, ttl, init_cache = toy
  g, gs = decoding.greedy(ttl, init_cache(B), B, L)
  rng = jax.random.PRNGKey(42)
  for kw in [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)]:
    fn = jax.jit(functools.partial(decoding.temperature_sample, ttl, batch_size=B, max_len=L,
                                   **kw))
    t, s = fn(init_cache=init_cache(B), rng=rng)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(g), err_msg=str(kw))
    np.testing.assert_allclose(np.asarray(s), np.asarray(gs), atol=1e-5)


def test_sampling_follows_the_distribution():
  probs = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
  logits = jnp.log(jnp.asarray(probs + 1e-12, jnp.float32))
  ttl = lambda tok, cache: (jnp.broadcast_to(logits, (tok.shape[0], 5)), cache)
  n = 20000
  t, _ = decoding.temperature_sample(ttl, {}, n, 1, jax.random.PRNGKey(0))
  freq = np.bincount(np.asarray(t[:, 0]), minlength=5) / n
  np.testing.assert_allclose(freq, probs, atol=0.015)
  # top_k=2 keeps {3, 4} renormalised; top_p=0.5 keeps {4, 3} (mass before 3 is 0.4 < 0.5).
  for kw in [dict(top_k=2), dict(top_p=0.5)]:
    t, _ = decoding.temperature_sample(ttl, {}, n, 1, jax.random.PRNGKey(1), **kw)
    freq = np.bincount(np.asarray(t[:, 0]), minlength=5) / n
    np.testing.assert_allclose(freq, [0, 0, 0, 3 / 7, 4 / 7], atol=0.015, err_msg=str(kw))


LABELS = [[2, 3], [2, 3, 4], [2, 5], [4], [5, 5, 5], [3, 2, 4]]


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_constrained_decoding_never_leaves_the_trie(method):
  rows = 64
  tables = _tables(seed=7, rows=rows)
  ttl, init_cache = _make_model(tables, L)
  trie = decoding.build_trie(LABELS)
  allowed = {tuple(l) + (1,) for l in LABELS}
  if method == "greedy":
    toks, _ = jax.jit(functools.partial(decoding.greedy, ttl, batch_size=rows, max_len=L,
                                        trie=trie))(init_cache(rows))
    toks = toks[:, None]
  elif method == "sample":
    toks, _ = decoding.temperature_sample(ttl, init_cache(rows), rows, L,
                                          jax.random.PRNGKey(0), temperature=3.0, trie=trie)
    toks = toks[:, None]
  else:
    K = 8  # more beams than labels: the two spare slots must come back empty
    toks, scores = jax.jit(functools.partial(
        decoding.beam_search, ttl, batch_size=rows, max_len=L, beam_size=K,
        trie=trie))(init_cache(rows))
    scores = np.asarray(scores)
    assert (scores[:, :len(LABELS)] > decoding.NEG_INF / 2).all()
    assert (scores[:, len(LABELS):] <= decoding.NEG_INF / 2).all()
    assert (np.asarray(toks)[:, len(LABELS):] == 0).all()
    toks = toks[:, :len(LABELS)]
    # Closed-set classification: beam >= #labels is exhaustive, so the ranking is the
    # model's log-prob ranking of the labels (alpha 0).
    for b in range(rows):
      ref = sorted(allowed, key=lambda s: -_seq_logp(tables, b, s))
      got = [tuple(_strip(t)) for t in np.asarray(toks[b])]
      assert got == ref
  seen = set()
  for row in np.asarray(toks).reshape(-1, L):
    seq = tuple(_strip(row))
    assert seq in allowed, seq
    assert (row[len(seq):] == 0).all()
    seen.add(seq)
  assert len(seen) >= 3  # the constraint did not collapse to one label
