"""The vocabulary: layout, exact round trips (python and TF), gin-configured model."""
import os
import pickle
import shutil

import gin
import numpy as np
import pytest
import tensorflow as tf

from pali.data import vocabulary as V


@pytest.fixture(scope="module")
def vocab():
  return V.PaliVocabulary(V.DEFAULT_SPM_PATH)


def test_layout(vocab):
  assert vocab.sentencepiece_size == 1049
  assert vocab.vocab_size == 2176
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.token_to_id("<loc0000>") == 1049
  assert vocab.token_to_id("<loc1023>") == 1049 + 1023
  assert [vocab.token_to_id(t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [2073, 2074, 2075]
  assert vocab.token_to_id("<extra_id_99>") == 2076
  assert vocab.token_to_id("<extra_id_0>") == 2175 == vocab.vocab_size - 1
  for n in (0, 1, 42, 99):
    assert vocab.sentinel_id(n) == vocab.token_to_id(f"<extra_id_{n}>") == 2175 - n
  assert vocab.loc_id(517) == 1049 + 517
  assert vocab.id_to_token(1049 + 5) == "<loc0005>"


ROUND_TRIP = [
    "a red circle above a blue square",
    "<loc0001><loc1023> circle ; star<loc0005>",
    "detect circle ; star",
    "<loc0000>",
    "x<loc0512>y",
    "  two  leading spaces, a tab\there and a newline\nthen trailing  ",
    "unicode: é, 日本語, emoji 🙂, ß",
    "[NLU] [NLG][S2S] <extra_id_0> <extra_id_99>",
    "not special: <loc1024> <loc999> <extra_id_100> [nlu]",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_python_and_tf(vocab, text):
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
  assert tf_ids == ids
  if ids:
    assert vocab.decode_tf(tf.constant(ids)).numpy().decode("utf-8") == text


def test_special_tokens_are_single_ids_anywhere(vocab):
  ids = vocab.encode("a<loc0007>b [S2S]<extra_id_3>")
  assert vocab.loc_id(7) in ids and vocab.mode_id("[S2S]") in ids
  assert vocab.sentinel_id(3) in ids
  assert vocab.encode("<loc0007>") == [vocab.loc_id(7)]
  # Malformed tokens are plain text, never special ids.
  assert all(i < vocab.sentencepiece_size for i in vocab.encode("<loc1024><extra_id_100>"))


def test_batch_encode_tf_is_ragged(vocab):
  texts = ["a b", "<loc0001>", ""]
  out = vocab.encode_tf(tf.constant(texts))
  assert out.to_list() == [vocab.encode(t) for t in texts]


def test_decode_stops_at_eos_and_skips_pad(vocab):
  ids = vocab.encode("red circle")
  assert vocab.decode(ids + [1] + vocab.encode("junk") + [0, 0]) == "red circle"
  row2 = [vocab.loc_id(3)] + [0] * (len(ids) + 2)
  batch = tf.constant([ids + [1, 5, 5], row2])
  out = vocab.decode_tf(batch).numpy().tolist()
  assert out[0].decode() == "red circle" and out[1].decode() == "<loc0003>"


def test_pickle(vocab):
  v2 = pickle.loads(pickle.dumps(vocab))
  assert v2.encode("caption en") == vocab.encode("caption en")


def test_model_path_from_gin(tmp_path):
  path = str(tmp_path / "my_spm.model")
  shutil.copy(V.DEFAULT_SPM_PATH, path)
  gin.parse_config(f"sentencepiece_model_path.path = '{path}'")
  v = V.PaliVocabulary()  # resolves lazily, through gin
  assert v.sentencepiece_model_file == path
  assert v.vocab_size == 2176


def test_bad_model_layout_is_reported(tmp_path):
  import sentencepiece as spm
  prefix = str(tmp_path / "bad")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["some words here", "and more words there"] * 50),
      model_prefix=prefix, vocab_size=16, bos_id=0, pad_id=-1, eos_id=1, unk_id=2,
      minloglevel=2)
  with pytest.raises(ValueError, match="pad=0, eos=1, unk=2"):
    V.PaliVocabulary(prefix + ".model").vocab_size
