"""Autoregressive decoding: greedy, temperature/top-k/top-p sampling, beam search, and
prefix-trie constrained decoding (closed-set outputs, as OFA does for classification; the trie
is `pali/output_trie.py`, re-exported here as `Trie` and `build_trie`).

Everything here is model-agnostic and jit-compatible (``lax.while_loop``, static shapes). A
model is seen through one callable::

    tokens_to_logits(token_ids: int32 [N, 1], cache: pytree) -> (logits: float [N, V], new_cache)

that consumes the previous token and returns the logits of the next one. The first call gets
the decoder start token 0 (decoder inputs are the targets shifted right with 0 in front).
``N`` is the batch size, or ``batch_size * beam_size`` in beam search.

Conventions shared by all decoders:
- token 0 is padding, ``eos_id`` (1) ends a row; after its EOS a row emits 0 (pad);
- the output buffer is ``[B, max_len]`` (``[B, beams, max_len]`` for beam search), right padded;
  a row that never emits EOS is truncated at ``max_len``;
- scores are summed log-probabilities of the emitted tokens (EOS included) under the model's
  unconstrained, untempered distribution (``log_softmax(logits)``); beam scores are divided by
  the GNMT length penalty ``((5 + len) / 6) ** alpha``.
- the loop stops early once every row has finished.

Cache leaves: arrays with the batch on axis 0 (or axis 1, for caches of scanned layer stacks
``[layers, N, ...]``) are expanded / re-ordered for beam search; rank-0 leaves (e.g. flax's
``cache_index``) are shared and left alone.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pali.output_trie import EOS_ID, PAD_ID, Trie, build_trie  # noqa: F401 (public here)

# A large finite negative number: -inf would turn into NaN in sums and softmaxes.
NEG_INF = -1.0e10

TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


# --------------------------------------------------------------------------------------------
# Logit processing.
# --------------------------------------------------------------------------------------------


def _top_k_mask(logits: jax.Array, top_k: int) -> jax.Array:
  """Keeps the ``top_k`` largest logits per row (ties at the threshold kept)."""
  if top_k <= 0 or top_k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, NEG_INF, logits)


def _top_p_mask(logits: jax.Array, top_p) -> jax.Array:
  """Nucleus filter: keeps the smallest set of most likely tokens whose mass reaches top_p.

  A token is kept when the probability mass strictly before it (in descending order) is below
  ``top_p``; the most likely token is therefore always kept.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Smallest kept logit per row is the threshold.
  threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, NEG_INF, logits)


# --------------------------------------------------------------------------------------------
# Greedy and sampling.
# --------------------------------------------------------------------------------------------


def _sample_loop(tokens_to_logits, init_cache, batch_size, max_len, eos_id, trie, rng,
                 choose_fn):
  """Shared one-token-at-a-time loop; ``choose_fn(masked_log_probs, logits, mask, rng)``."""
  B = batch_size

  def cond(state):
    i, _, _, done, _, _, _, _ = state
    return (i < max_len) & ~jnp.all(done)

  def body(state):
    i, prev, seqs, done, scores, cache, node, rng = state
    logits, cache = tokens_to_logits(prev[:, None], cache)
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if trie is not None:
      mask = trie.allowed_mask(node, V)
    else:
      mask = jnp.ones(logits.shape, bool)
    rng, sub = jax.random.split(rng)
    tok = choose_fn(jnp.where(mask, log_probs, NEG_INF), logits, mask, sub).astype(jnp.int32)
    tok_logp = jnp.take_along_axis(log_probs, tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, PAD_ID, tok)
    scores = scores + jnp.where(done, 0.0, tok_logp)
    seqs = jax.lax.dynamic_update_slice(seqs, tok[:, None], (0, i))
    if trie is not None:
      node = trie.next_nodes(node, tok)
    done = done | (tok == eos_id)
    return i + 1, tok, seqs, done, scores, cache, node, rng

  state = (
      jnp.array(0, jnp.int32),
      jnp.zeros((B,), jnp.int32),
      jnp.zeros((B, max_len), jnp.int32),
      jnp.zeros((B,), bool),
      jnp.zeros((B,), jnp.float32),
      init_cache,
      jnp.zeros((B,), jnp.int32),
      rng if rng is not None else jax.random.PRNGKey(0),
  )
  _, _, seqs, _, scores, _, _, _ = jax.lax.while_loop(cond, body, state)
  return seqs, scores


def greedy(tokens_to_logits: TokensToLogits, init_cache: Any, batch_size: int, max_len: int,
           eos_id: int = EOS_ID, *, trie: Optional[Trie] = None
           ) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding. Returns (tokens int32 [B, max_len], log-prob scores float32 [B]).

  With ``trie`` the argmax is taken over the tokens the trie allows, so every finished row is
  one of the trie's sequences followed by EOS.
  """
  choose = lambda masked_lp, logits, mask, rng: jnp.argmax(masked_lp, axis=-1)
  return _sample_loop(tokens_to_logits, init_cache, batch_size, max_len, eos_id, trie, None,
                      choose)


def temperature_sample(tokens_to_logits: TokensToLogits, init_cache: Any, batch_size: int,
                       max_len: int, rng: jax.Array, *, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID,
                       trie: Optional[Trie] = None) -> tuple[jax.Array, jax.Array]:
  """Ancestral sampling from ``softmax(logits / temperature)``, optionally top-k / top-p
  filtered (top-k first, then nucleus on the tempered distribution).

  ``temperature == 0`` is greedy (may be a traced value). ``top_k`` (static int, 0 = off),
  ``top_p`` (1.0 = off). Returns (tokens int32 [B, max_len], log-prob scores float32 [B]);
  scores are under the untempered, unfiltered model distribution.
  """
  if not isinstance(top_k, (int, np.integer)):
    raise TypeError(f"top_k must be a Python int (static), got {type(top_k)}.")

  def choose(masked_lp, logits, mask, rng):
    greedy_tok = jnp.argmax(masked_lp, axis=-1)
    t = jnp.asarray(temperature, jnp.float32)
    scaled = jnp.where(mask, logits / jnp.maximum(t, 1e-6), NEG_INF)
    scaled = _top_k_mask(scaled, int(top_k))
    scaled = _top_p_mask(scaled, top_p)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(t == 0.0, greedy_tok, sampled)

  return _sample_loop(tokens_to_logits, init_cache, batch_size, max_len, eos_id, trie, rng,
                      choose)


# --------------------------------------------------------------------------------------------
# Beam search.
# --------------------------------------------------------------------------------------------


NO_BATCH_AXIS = -1


def _batch_axis(x: jax.Array, n: int) -> int:
  """Heuristic batch axis of a cache leaf: 0, else 1 (scanned stacks), else none."""
  if x.ndim >= 1 and x.shape[0] == n:
    return 0
  if x.ndim >= 2 and x.shape[1] == n:
    return 1
  return NO_BATCH_AXIS


def infer_cache_batch_axes(make_cache_shapes: Callable[[int], Any], batch_size: int) -> Any:
  """Exact batch axes of a cache: compares the (abstract) caches for two batch sizes.

  ``make_cache_shapes(n)`` returns the cache pytree (arrays or ShapeDtypeStructs) for batch n.
  Returns a pytree of ints (``NO_BATCH_AXIS`` for leaves without a batch axis, such as
  ``cache_index``), for ``beam_search(cache_batch_axes=...)``.
  """
  a, b = make_cache_shapes(batch_size), make_cache_shapes(batch_size + 1)
  def axis(x, y):
    diff = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q]
    return diff[0] if diff else NO_BATCH_AXIS
  return jax.tree_util.tree_map(axis, a, b)


def _axes_tree(cache, n, axes):
  if axes is None:
    return jax.tree_util.tree_map(lambda x: _batch_axis(x, n), cache)
  return axes


def expand_cache(cache: Any, batch_size: int, beam_size: int, axes: Any = None) -> Any:
  """Repeats every batched cache leaf ``beam_size`` times: [B, ...] -> [B * beam, ...]
  (row b * beam + k is beam k of example b). ``axes``: pytree of batch axes (see
  ``infer_cache_batch_axes``); by default axis 0 if its size is B, else axis 1 if its size is
  B (scanned layer stacks [layers, B, ...]), else the leaf is shared (e.g. ``cache_index``)."""
  def f(x, ax):
    return x if ax == NO_BATCH_AXIS else jnp.repeat(x, beam_size, axis=ax)
  return jax.tree_util.tree_map(f, cache, _axes_tree(cache, batch_size, axes))


def gather_cache(cache: Any, flat_index: jax.Array, axes: Any = None) -> Any:
  """Reorders batched cache leaves [N, ...] by ``flat_index`` int32 [N] (axes as in
  ``expand_cache``)."""
  n = flat_index.shape[0]
  def f(x, ax):
    return x if ax == NO_BATCH_AXIS else jnp.take(x, flat_index, axis=ax)
  return jax.tree_util.tree_map(f, cache, _axes_tree(cache, n, axes))


def length_penalty(length, alpha: float):
  """GNMT length penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(tokens_to_logits: TokensToLogits, init_cache: Any, batch_size: int,
                max_len: int, beam_size: int = 4, *, alpha: float = 0.0,
                eos_id: int = EOS_ID, trie: Optional[Trie] = None,
                cache_batch_axes: Any = None) -> tuple[jax.Array, jax.Array]:
  """Beam search with the GNMT length penalty ``((5 + len) / 6) ** alpha``.

  ``init_cache`` has batch ``batch_size``; it is expanded to ``batch_size * beam_size`` here
  (and ``tokens_to_logits`` then sees ``batch_size * beam_size`` rows, beam-minor: whatever it
  closes over, e.g. encoder outputs, must be repeated with ``jnp.repeat(x, beam_size, 0)``).

  Each step takes the 2*beam best extensions of the alive beams: those ending in EOS and
  ranking within the best ``beam`` enter the finished set (score = log-prob /
  length_penalty(len incl. EOS)); the best ``beam`` non-EOS ones stay alive. With
  ``beam_size=1`` and ``alpha=0`` this is exactly greedy decoding. Beams still alive at ``max_len`` are added as truncated hypotheses (scored with
  length ``max_len``); finished ones compete with them on score, as in greedy decoding where a
  truncated row is returned as is. Stops early when no alive beam can beat the worst finished.

  ``cache_batch_axes``: the batch axis of every cache leaf (see ``infer_cache_batch_axes``);
  by default guessed from the shapes (axis 0, else 1, of size B; otherwise shared).

  Returns (tokens int32 [B, beam, max_len] best first, scores float32 [B, beam]). Slots with
  no valid hypothesis (possible only with a trie of fewer than ``beam`` sequences) have score
  ``<= NEG_INF / 2`` and all-pad tokens.
  """
  B, K, L = batch_size, beam_size, max_len
  cache_batch_axes = _axes_tree(init_cache, B, cache_batch_axes)
  cache = expand_cache(init_cache, B, K, cache_batch_axes)
  inv_lp_max = 1.0 / length_penalty(L, alpha)

  # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (K - 1), jnp.float32), (B, 1))
  state = dict(
      i=jnp.array(0, jnp.int32),
      alive_seqs=jnp.zeros((B, K, L), jnp.int32),
      alive_logp=alive_logp,
      alive_node=jnp.zeros((B, K), jnp.int32),
      fin_seqs=jnp.zeros((B, K, L), jnp.int32),
      fin_scores=jnp.full((B, K), NEG_INF, jnp.float32),
      cache=cache,
  )

  def cond(s):
    # Best possible alive score: log-probs only fall, the penalty is largest at L.
    best_alive = jnp.max(s["alive_logp"], axis=-1) * (
        inv_lp_max if alpha >= 0 else 1.0 / length_penalty(1, alpha))
    worst_fin = jnp.min(s["fin_scores"], axis=-1)
    can_improve = (worst_fin <= NEG_INF / 2) | (best_alive > worst_fin)
    can_improve &= jnp.max(s["alive_logp"], axis=-1) > NEG_INF / 2
    return (s["i"] < L) & jnp.any(can_improve)

  def body(s):
    i = s["i"]
    prev = jnp.where(i == 0, 0,
                     jax.lax.dynamic_index_in_dim(s["alive_seqs"], jnp.maximum(i - 1, 0), 2,
                                                  keepdims=False))
    logits, new_cache = tokens_to_logits(prev.reshape(B * K, 1), s["cache"])
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(B, K, V)
    if trie is not None:
      log_probs = jnp.where(trie.allowed_mask(s["alive_node"], V), log_probs, NEG_INF)
    cand = (s["alive_logp"][:, :, None] + log_probs).reshape(B, K * V)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * K)  # [B, 2K]
    top_beam = top_idx // V
    top_tok = (top_idx % V).astype(jnp.int32)
    valid = top_logp > NEG_INF / 2
    top_seqs = jnp.take_along_axis(s["alive_seqs"], top_beam[:, :, None], axis=1)
    top_seqs = jax.lax.dynamic_update_slice(top_seqs, top_tok[:, :, None], (0, 0, i))
    is_eos = top_tok == eos_id

    # Alive: best K non-EOS candidates.
    alive_cand = jnp.where(is_eos | ~valid, NEG_INF, top_logp)
    new_alive_logp, sel = jax.lax.top_k(alive_cand, K)
    new_alive_seqs = jnp.take_along_axis(top_seqs, sel[:, :, None], axis=1)
    src_beam = jnp.take_along_axis(top_beam, sel, axis=1)
    src_tok = jnp.take_along_axis(top_tok, sel, axis=1)
    flat = (jnp.arange(B)[:, None] * K + src_beam).reshape(-1)
    new_cache = gather_cache(new_cache, flat, cache_batch_axes)
    new_node = s["alive_node"]
    if trie is not None:
      new_node = trie.next_nodes(jnp.take_along_axis(s["alive_node"], src_beam, axis=1),
                                 src_tok)

    # Finished: merge the EOS candidates that rank within the top K of this step (as the
    # classic beam, which then moves them out; so beam 1 is greedy), and, at the last
    # step, the truncated alive beams.
    in_beam = jnp.arange(2 * K)[None, :] < K
    fin_cand = jnp.where(is_eos & valid & in_beam, top_logp / length_penalty(i + 1, alpha),
                         NEG_INF)
    last = i == L - 1
    trunc = jnp.where(last & (new_alive_logp > NEG_INF / 2), new_alive_logp * inv_lp_max,
                      NEG_INF)
    all_scores = jnp.concatenate([s["fin_scores"], fin_cand, trunc], axis=1)
    all_seqs = jnp.concatenate([s["fin_seqs"], top_seqs, new_alive_seqs], axis=1)
    fin_scores, fsel = jax.lax.top_k(all_scores, K)
    fin_seqs = jnp.take_along_axis(all_seqs, fsel[:, :, None], axis=1)

    return dict(i=i + 1, alive_seqs=new_alive_seqs, alive_logp=new_alive_logp,
                alive_node=new_node, fin_seqs=fin_seqs, fin_scores=fin_scores,
                cache=new_cache)

  s = jax.lax.while_loop(cond, body, state)
  ok = s["fin_scores"] > NEG_INF / 2
  seqs = jnp.where(ok[:, :, None], s["fin_seqs"], PAD_ID)
  return seqs, s["fin_scores"]


# --------------------------------------------------------------------------------------------
# Wiring a PaliModel.
# --------------------------------------------------------------------------------------------


def decode_batch(model, params, batch: dict, *, max_decode_len: int, method: str = "greedy",
                 rng: Optional[jax.Array] = None, beam_size: int = 4, **kwargs
                 ) -> tuple[jax.Array, jax.Array]:
  """Encodes ``batch`` with a ``PaliModel`` and decodes up to ``max_decode_len`` tokens.

  method: 'greedy' | 'sample' (``rng`` required; kwargs temperature/top_k/top_p) | 'beam'
  (``beam_size``, kwargs alpha). ``trie=`` and ``eos_id=`` pass through to all of them.
  The cache starts as zeros of the shapes ``model.init`` gives (no forward pass); for beam
  search its batch axes are found exactly (``infer_cache_batch_axes``).
  Returns (tokens, scores) as the chosen decoder does ([B, L] or [B, beam, L]). Traceable:
  wrap in ``jax.jit`` with ``model``, ``max_decode_len`` and ``method`` static.
  """
  variables = {"params": params}
  encoded, encoder_mask = model.apply(
      variables, batch["images"], batch["image_mask"], batch["encoder_input_tokens"],
      method=model.encode)
  B, L = encoded.shape[0], max_decode_len

  def cache_shapes(n):  # abstract: no forward pass, no parameters materialised
    enc = jax.ShapeDtypeStruct((n,) + encoded.shape[1:], encoded.dtype)
    mask = jax.ShapeDtypeStruct((n,) + encoder_mask.shape[1:], encoder_mask.dtype)
    return jax.eval_shape(
        lambda e, m: model.init(jax.random.PRNGKey(0), e, m, jnp.zeros((n, L), jnp.int32),
                                decode=True, max_decode_length=L,
                                method=model.decode)["cache"], enc, mask)

  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(B))
  if method == "beam":
    kwargs.setdefault("cache_batch_axes", infer_cache_batch_axes(cache_shapes, B))
    encoded = jnp.repeat(encoded, beam_size, axis=0)
    encoder_mask = jnp.repeat(encoder_mask, beam_size, axis=0)

  def tokens_to_logits(token_ids, cache):
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, encoded, encoder_mask, token_ids, decode=True,
        max_decode_length=L, mutable=["cache"], method=model.decode)
    return logits[:, -1, :].astype(jnp.float32), mutated["cache"]

  if method == "greedy":
    return greedy(tokens_to_logits, cache, B, L, **kwargs)
  if method == "sample":
    if rng is None:
      raise ValueError("decode_batch(method='sample') needs rng=jax.random.PRNGKey(...).")
    return temperature_sample(tokens_to_logits, cache, B, L, rng, **kwargs)
  if method == "beam":
    return beam_search(tokens_to_logits, cache, B, L, beam_size, **kwargs)
  raise ValueError(f"Unknown decoding method {method!r}; use 'greedy', 'sample' or 'beam'.")
