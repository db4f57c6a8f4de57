"""Tests of pali.output_trie: the prefix trie that constrains decoding to a closed set."""
import jax.numpy as jnp
import numpy as np
import pytest

from pali import output_trie


def test_build_trie_structure():
  trie = output_trie.build_trie([[2, 3, 1, 0], [2, 3, 4], [4]])
  mask = np.asarray(trie.allowed_mask(jnp.array([0]), 6))[0]
  np.testing.assert_array_equal(mask, [0, 0, 1, 0, 1, 0])
  n = trie.next_nodes(jnp.array([0]), jnp.array([2]))
  n = trie.next_nodes(n, jnp.array([3]))
  np.testing.assert_array_equal(np.asarray(trie.allowed_mask(n, 6))[0], [0, 1, 0, 0, 1, 0])
  assert int(trie.next_nodes(n, jnp.array([5]))[0]) == output_trie.Trie.SINK
  with pytest.raises(ValueError):
    output_trie.build_trie([[2, 0, 3]])
