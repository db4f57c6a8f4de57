"""The project's vocabulary: one SentencePiece model plus appended tokens (defined here only).

Layout (ids):
  0 pad, 1 eos, 2 unk                          (from the SentencePiece model)
  3 .. S-1                                      the SentencePiece pieces (S = its size)
  S .. S+1023                                   `<loc0000>` .. `<loc1023>`
  S+1024, S+1025, S+1026                        `[NLU]`, `[NLG]`, `[S2S]`
  S+1027 .. S+1126                              `<extra_id_99>` .. `<extra_id_0>`
so `<extra_id_N>` = vocab_size - 1 - N, as in seqio/T5. With the shipped model (S = 1049)
the vocabulary has 2176 ids.

Text -> ids: the appended tokens are matched anywhere in the text (by a regular expression),
and the text between them is encoded by SentencePiece. ids -> text is the inverse. With the
shipped model (identity normalisation, no dummy prefix, byte fallback) the round trip is
exact for any text. A user's own model (mT5's, UL2's: set
`get_vocabulary.sentencepiece_model_file` in gin) normalises text as it was trained to, so
its round trip is exact up to that normalisation.
"""
import os
import re
import threading
from typing import Iterable, List, Optional, Sequence

import gin
import numpy as np
import seqio
import sentencepiece as spm
import tensorflow as tf
import tensorflow_text as tf_text

DEFAULT_SPM_PATH = os.path.join(os.path.dirname(__file__), "assets", "pali_synthetic_sp1049.model")

NUM_LOC_TOKENS = 1024
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
NUM_SENTINELS = 100
NUM_EXTRA_TOKENS = NUM_LOC_TOKENS + len(MODE_TOKENS) + NUM_SENTINELS

# Exactly the appended tokens (RE2 and Python `re` syntax alike).
_LOC_RE = r"<loc(?:0[0-9]{3}|10[01][0-9]|102[0-3])>"
_SENTINEL_RE = r"<extra_id_(?:[0-9]|[1-9][0-9])>"
_MODE_RE = r"\[NLU\]|\[NLG\]|\[S2S\]"
SPECIAL_RE = f"(?:{_LOC_RE}|{_MODE_RE}|{_SENTINEL_RE})"


def loc_token(bin_index: int) -> str:
  return f"<loc{int(bin_index):04d}>"


def sentinel_token(n: int) -> str:
  return f"<extra_id_{int(n)}>"


class PaliVocabulary(seqio.Vocabulary):
  """SentencePiece pieces, then location tokens, UL2 mode tokens and sentinels."""

  def __init__(self, sentencepiece_model_file: Optional[str] = None):
    """`sentencepiece_model_file=None` resolves, on first use, to the gin binding
    `sentencepiece_model_path.path` (default: the shipped model). Tasks are registered at
    import, before gin is parsed, so they hold a vocabulary that resolves late."""
    super().__init__(extra_ids=0)
    self._path_arg = sentencepiece_model_file
    self._lock = threading.RLock()
    self._loaded = False
    self._tf_state = None
    self._re = re.compile(f"({SPECIAL_RE})")

  def _load(self):
    if self._loaded:
      return
    with self._lock:
      if self._loaded:
        return
      path = self._path_arg or sentencepiece_model_path()
      with tf.io.gfile.GFile(path, "rb") as f:
        model_bytes = f.read()
      sp = spm.SentencePieceProcessor(model_proto=model_bytes)
      if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (0, 1, 2):
        raise ValueError(
            f"SentencePiece model {path} must use pad=0, eos=1, unk=2 (got pad={sp.pad_id()}, "
            f"eos={sp.eos_id()}, unk={sp.unk_id()}); train it with --pad_id=0 --eos_id=1 "
            "--unk_id=2 --bos_id=-1 (see scripts/build_vocab.py)")
      self._path, self._model_bytes, self._sp = path, model_bytes, sp
      self._sp_size = sp.get_piece_size()
      self._special = self._special_tokens()
      self._special_ids = {t: self._sp_size + i for i, t in enumerate(self._special)}
      self._loaded = True

  def __getattr__(self, name):
    # Late loading: the first access to a model attribute loads the model.
    if name in ("_path", "_model_bytes", "_sp", "_sp_size", "_special", "_special_ids"):
      self._load()
      return self.__dict__[name]
    raise AttributeError(name)

  def _special_tokens(self) -> List[str]:
    return ([loc_token(i) for i in range(NUM_LOC_TOKENS)] + list(MODE_TOKENS) +
            [sentinel_token(n) for n in reversed(range(NUM_SENTINELS))])

  # ---- layout ----------------------------------------------------------------------------
  @property
  def sentencepiece_model_file(self) -> str:
    return self._path

  @property
  def sentencepiece_size(self) -> int:
    return self._sp_size

  @property
  def eos_id(self) -> int:
    return 1

  @property
  def unk_id(self) -> int:
    return 2

  @property
  def bos_id(self) -> Optional[int]:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self._sp_size + NUM_EXTRA_TOKENS

  @property
  def first_loc_id(self) -> int:
    return self._sp_size

  def loc_id(self, bin_index: int) -> int:
    return self._sp_size + int(bin_index)

  def mode_id(self, token: str) -> int:
    return self._special_ids[token]

  def sentinel_id(self, n: int) -> int:
    return self.vocab_size - 1 - int(n)

  def is_loc(self, ids):
    ids = np.asarray(ids)
    return (ids >= self._sp_size) & (ids < self._sp_size + NUM_LOC_TOKENS)

  def token_to_id(self, token: str) -> int:
    if token in self._special_ids:
      return self._special_ids[token]
    return self._sp.piece_to_id(token)

  def id_to_token(self, i: int) -> str:
    i = int(i)
    if i >= self._sp_size:
      return self._special[i - self._sp_size]
    return self._sp.id_to_piece(i)

  # ---- python ----------------------------------------------------------------------------
  def _encode(self, s: str) -> List[int]:
    if isinstance(s, bytes):
      s = s.decode("utf-8")
    out = []
    for part in self._re.split(s):
      if not part:
        continue
      if part in self._special_ids:
        out.append(self._special_ids[part])
      else:
        out.extend(self._sp.encode_as_ids(part))
    return out

  def _decode(self, ids: Iterable[int]) -> str:
    pieces, run = [], []
    for i in ids:
      i = int(i)
      if i in (0, 1):
        continue
      if i >= self._sp_size:
        if run:
          pieces.append(self._sp.decode_ids(run))
          run = []
        pieces.append(self._special[i - self._sp_size] if i < self.vocab_size else "")
      else:
        run.append(i)
    if run:
      pieces.append(self._sp.decode_ids(run))
    return "".join(pieces)

  # ---- spelled (character-level) encoding --------------------------------------------------
  def char_pieces(self) -> dict:
    """{character: piece id} of every single-character piece; ' ' maps to the '▁' piece."""
    out = {}
    for i in range(3, self._sp_size):
      piece = self._sp.id_to_piece(i)
      if len(piece) == 1 and piece != "\u2581" and not self._sp.is_control(i):
        out[piece] = i
    boundary = self._sp.piece_to_id("\u2581")
    if boundary != self.unk_id:
      out[" "] = boundary
    return out

  def encode_spelled(self, s: str) -> List[int]:
    """One id per character (unk where the vocabulary has no such piece): decodes to `s`."""
    table = self.char_pieces()
    return [table.get(c, self.unk_id) for c in (s.decode("utf-8") if isinstance(s, bytes) else s)]

  # ---- tensorflow ------------------------------------------------------------------------
  def _tf(self):
    # Built lazily (and once per vocabulary) so that pickling / gin never see TF objects.
    with self._lock:
      if self._tf_state is None:
        # Eager resources (init_scope), so that every dataset function can capture them.
        with tf.init_scope():
          tokenizer = tf_text.SentencepieceTokenizer(model=self._model_bytes,
                                                     out_type=tf.int32)
          table = tf.lookup.StaticHashTable(
              tf.lookup.KeyValueTensorInitializer(
                  tf.constant(self._special), tf.range(len(self._special), dtype=tf.int32)
                  + self._sp_size), default_value=-1)
        self._tf_state = (tokenizer, table)
      return self._tf_state

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> 1-D int32 ids; a 1-D string tensor -> ragged [n, (ids)]."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      return self._encode_tf(tf.reshape(s, [1]))[0]
    tokenizer, table = self._tf()
    parts = tf_text.regex_split(s, SPECIAL_RE, keep_delim_regex_pattern=SPECIAL_RE)
    special = table.lookup(parts.flat_values)
    is_special = special >= 0
    text = tf.where(is_special, tf.constant(""), parts.flat_values)
    sp_ids = tokenizer.tokenize(text)  # ragged [n_parts, (k)]; empty for special parts
    spec = tf.ragged.boolean_mask(special[:, None], is_special[:, None])
    per_part = tf.concat([spec, tf.cast(sp_ids, tf.int32)], axis=1)
    return tf.RaggedTensor.from_row_splits(per_part.flat_values, tf.gather(
        per_part.row_splits, parts.row_splits))

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids, tf.int32)
    shape = tf.shape(ids)[:-1]
    flat = tf.reshape(ids, [-1, tf.shape(ids)[-1]])

    def _py(x):
      return np.array([self._decode(row).encode("utf-8") for row in x], dtype=object)

    out = tf.numpy_function(_py, [flat], tf.string, stateful=False)
    return tf.reshape(out, shape)

  def __eq__(self, other):
    return isinstance(other, PaliVocabulary) and self._model_bytes == other._model_bytes

  def __hash__(self):
    return hash(self._model_bytes)

  def __getstate__(self):
    return {"sentencepiece_model_file": self._path_arg}

  def __setstate__(self, state):
    self.__init__(state["sentencepiece_model_file"])

  def __repr__(self):
    return f"PaliVocabulary({self._path_arg or 'gin/default'!r})"


@gin.configurable
def sentencepiece_model_path(path: Optional[str] = None) -> str:
  """Gin: `sentencepiece_model_path.path = '/path/to/spm.model'` (default: the shipped one).
  Bind it before the first use of the vocabulary (the trainer parses gin before data)."""
  return path or DEFAULT_SPM_PATH


_DEFAULT = None
_DEFAULT_LOCK = threading.Lock()


def get_vocabulary() -> PaliVocabulary:
  """The project's vocabulary, shared by all tasks (its model resolves through gin)."""
  global _DEFAULT
  with _DEFAULT_LOCK:
    if _DEFAULT is None:
      _DEFAULT = PaliVocabulary()
    return _DEFAULT
