"""A prefix trie of allowed output sequences, for constrained decoding (pali/decoding.py).

Closed-set outputs (class labels, as OFA decodes classification) become a trie whose padded
child tables are a jax pytree: `Trie.allowed_mask` gives the tokens that may follow each node
and `Trie.next_nodes` steps along, both inside jit. Token ids follow the vocabulary layout:
0 is padding, 1 EOS.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAD_ID = 0
EOS_ID = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trie:
  """A prefix trie as padded child tables (a jax pytree, usable inside jit).

  Node 0 is the root, node 1 the terminal sink (reached after EOS or on an impossible token;
  it has no children). ``child_tokens[n, j]`` is the token of the j-th child of node n
  (-1 for unused slots) and ``child_nodes[n, j]`` the node it leads to. Memory is
  ``num_nodes * max_fanout`` instead of ``num_nodes * vocab`` for a dense table.
  """
  child_tokens: jax.Array  # int32 [num_nodes, max_fanout]
  child_nodes: jax.Array  # int32 [num_nodes, max_fanout]

  ROOT = 0
  SINK = 1

  @property
  def num_nodes(self) -> int:
    return self.child_tokens.shape[0]

  def allowed_mask(self, nodes: jax.Array, vocab_size: int) -> jax.Array:
    """bool [..., vocab_size]: which tokens may follow each trie node in ``nodes``."""
    flat = nodes.reshape(-1)
    toks = self.child_tokens[flat]  # [N, F]
    toks = jnp.where(toks < 0, vocab_size, toks)  # unused slots -> out of range -> dropped
    rows = jnp.arange(flat.shape[0])[:, None]
    mask = jnp.zeros((flat.shape[0], vocab_size), bool).at[rows, toks].set(True, mode="drop")
    return mask.reshape(nodes.shape + (vocab_size,))

  def next_nodes(self, nodes: jax.Array, tokens: jax.Array) -> jax.Array:
    """int32 [...]: the node reached from ``nodes`` by ``tokens`` (the sink if not allowed)."""
    toks = self.child_tokens[nodes]  # [..., F]
    hit = toks == tokens[..., None]
    child = jnp.max(jnp.where(hit, self.child_nodes[nodes], -1), axis=-1)
    return jnp.where(child >= 0, child, Trie.SINK).astype(jnp.int32)


def build_trie(sequences: Sequence[Sequence[int]], eos_id: int = EOS_ID) -> Trie:
  """Builds the trie of ``sequences``, each followed by ``eos_id``.

  Trailing pads (0) and a trailing EOS in the given sequences are removed first (so tokenized
  labels with or without EOS both work); a pad inside a sequence is an error. Duplicates and
  sequences that are prefixes of others are fine. An empty sequence allows EOS at the root.
  """
  if len(sequences) == 0:
    raise ValueError("build_trie needs at least one allowed sequence.")
  children: list[dict[int, int]] = [{}, {}]  # root, sink
  for i, seq in enumerate(sequences):
    seq = [int(t) for t in np.asarray(seq).reshape(-1)]
    while seq and seq[-1] == PAD_ID:
      seq.pop()
    if seq and seq[-1] == eos_id:
      seq.pop()
    if any(t == PAD_ID or t == eos_id or t < 0 for t in seq):
      raise ValueError(
          f"Allowed sequence #{i} {seq} contains pad (0), EOS ({eos_id}) or a negative id "
          "before its end; give the label token ids without padding.")
    node = Trie.ROOT
    for t in seq:
      if t not in children[node]:
        children.append({})
        children[node][t] = len(children) - 1
      node = children[node][t]
    children[node][eos_id] = Trie.SINK
  fanout = max(1, max(len(c) for c in children))
  child_tokens = np.full((len(children), fanout), -1, np.int32)
  child_nodes = np.full((len(children), fanout), -1, np.int32)
  for n, c in enumerate(children):
    for j, (t, m) in enumerate(sorted(c.items())):
      child_tokens[n, j] = t
      child_nodes[n, j] = m
  return Trie(jnp.asarray(child_tokens), jnp.asarray(child_nodes))
