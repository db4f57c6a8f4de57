"""Tests of pali.decoding.decode_batch: decoding a model with the PaliModel calling convention
(encode, then decode with a KV cache), against teacher-forced full forwards."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pali import decoding
from tests.test_decoding import _strip


# ------------------------------------------------------------------------------------------
# decode_batch on a small flax model with the PaliModel calling convention.
# ------------------------------------------------------------------------------------------


class _Accumulate(nn.Module):
  """Decode-time cache: a running sum of position-weighted embeddings."""
  dim: int

  @nn.compact
  def __call__(self, emb, decode):
    if not decode:
      pos = 1.0 + jnp.arange(emb.shape[1], dtype=jnp.float32)[None, :, None]
      return jnp.cumsum(emb * pos, axis=1)
    initialised = self.has_variable("cache", "acc")
    acc = self.variable("cache", "acc", jnp.zeros, (emb.shape[0], self.dim))
    idx = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if initialised:
      acc.value = acc.value + emb[:, 0] * (1.0 + idx.value)
      idx.value = idx.value + 1
    return acc.value[:, None]


class _FakePali(nn.Module):
  vocab: int = 7
  dim: int = 8

  def setup(self):
    self.embed = nn.Embed(self.vocab, self.dim)
    self.img = nn.Dense(self.dim)
    self.out = nn.Dense(self.vocab)
    self.acc = _Accumulate(self.dim)

  def encode(self, images, image_mask, encoder_input_tokens, *, train=False):
    img = self.img(images.reshape(images.shape[:2] + (-1,)).astype(jnp.float32) / 255.0)
    enc = jnp.concatenate([img, self.embed(encoder_input_tokens)], axis=1)
    mask = jnp.concatenate([image_mask > 0, encoder_input_tokens > 0], axis=1)
    return enc, mask

  def decode(self, encoded, encoder_mask, decoder_input_tokens, *, train=False, decode=False,
             max_decode_length=None):
    pooled = jnp.sum(encoded * encoder_mask[..., None], axis=1)[:, None]
    emb = self.embed(decoder_input_tokens)
    x = self.acc(emb, decode)
    return self.out(jnp.tanh(x + pooled))


def _fake_batch(b=3):
  r = np.random.RandomState(0)
  return {"images": r.randint(0, 255, (b, 1, 4, 4, 3)).astype(np.uint8),
          "image_mask": np.ones((b, 1), np.int32),
          "encoder_input_tokens": r.randint(2, 7, (b, 5)).astype(np.int32)}


def test_decode_batch_matches_teacher_forced_model():
  model = _FakePali()
  batch = _fake_batch()
  params = model.init(jax.random.PRNGKey(1), batch["images"], batch["image_mask"],
                      batch["encoder_input_tokens"], method=_FakePali.encode)["params"]
  # encode alone does not create 'out': initialise decode too and merge.
  enc, emask = model.apply({"params": params}, batch["images"], batch["image_mask"],
                           batch["encoder_input_tokens"], method=_FakePali.encode)
  dec_params = model.init(jax.random.PRNGKey(2), enc, emask, jnp.zeros((3, 4), jnp.int32),
                          method=_FakePali.decode)["params"]
  params = {**dec_params, **params}
  Lmax = 5
  toks, _ = jax.jit(functools.partial(decoding.decode_batch, model, max_decode_len=Lmax))(
      params, batch)
  # Reference: teacher-forced full forward, one argmax at a time.
  ref = np.zeros((3, Lmax), np.int32)
  for b in range(3):
    fed = [0]
    for t in range(Lmax):
      logits = model.apply({"params": params}, enc[b:b + 1], emask[b:b + 1],
                           jnp.asarray([fed]), method=_FakePali.decode)
      tok = int(jnp.argmax(logits[0, -1]))
      ref[b, t] = tok
      fed.append(tok)
      if tok == 1:
        break
  np.testing.assert_array_equal(np.asarray(toks), ref)
  bt, bs = decoding.decode_batch(model, params, batch, max_decode_len=Lmax, method="beam",
                                 beam_size=3)
  assert bt.shape == (3, 3, Lmax)
  assert (np.diff(np.asarray(bs), axis=1) <= 1e-6).all()  # sorted best first
  st, _ = decoding.decode_batch(model, params, batch, max_decode_len=Lmax, method="sample",
                                rng=jax.random.PRNGKey(0), top_k=1)
  np.testing.assert_array_equal(np.asarray(st), ref)


# ------------------------------------------------------------------------------------------
# decode_batch on the real tiny PaliModel (gin_configs/models/pali_tiny.gin).
# ------------------------------------------------------------------------------------------


def _tiny_pali(scan):
  import gin
  import os
  from pali.models import pali
  gin.parse_config_files_and_bindings(
      [os.path.join(os.path.dirname(__file__), "..", "gin_configs", "models", "pali_tiny.gin")],
      [f"T5Config.scan = {scan}"])
  model = pali.build_model()
  r = np.random.RandomState(0)
  batch = {"images": r.randint(0, 256, (2, 1, 16, 16, 3)).astype(np.uint8),
           "image_mask": np.ones((2, 1), np.int32),
           "encoder_input_tokens": r.randint(2, 100, (2, 5)).astype(np.int32),
           "decoder_input_tokens": np.zeros((2, 4), np.int32)}
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"])
  return model, params, batch


def _teacher_forced_logp(model, params, batch, seq):
  """Summed log-probs of each row of ``seq`` [B, L] (up to its EOS) by a full forward."""
  from pali.models import pali
  enc, mask = model.apply({"params": params}, batch["images"], batch["image_mask"],
                          batch["encoder_input_tokens"], method=pali.PaliModel.encode)
  seq = np.asarray(seq)
  inputs = np.concatenate([np.zeros_like(seq[:, :1]), seq[:, :-1]], axis=1)
  logits = model.apply({"params": params}, enc, mask, jnp.asarray(inputs),
                       method=pali.PaliModel.decode)
  lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  out = []
  for b in range(seq.shape[0]):
    n = len(_strip(seq[b]))
    out.append(sum(lp[b, t, seq[b, t]] for t in range(n)))
  return np.asarray(out), lp


# Scanned decoder (the harder cache layout; the unscanned flax cache layout is covered by the
# fake model above). Batch 2 and 2 scanned layers: cache leaves [layers=2, B=2, ...] are
# ambiguous by shape, so this also checks that decode_batch finds the batch axis exactly.
def test_decode_batch_on_tiny_pali():
  model, params, batch = _tiny_pali(scan=True)
  Lmax = 5
  dec = jax.jit(decoding.decode_batch, static_argnames=("model", "max_decode_len", "method",
                                                        "beam_size"))
  toks, scores = dec(model, params, batch, max_decode_len=Lmax)
  # Greedy: every emitted token is the argmax of a teacher-forced full forward.
  ref_scores, lp = _teacher_forced_logp(model, params, batch, toks)
  for b in range(2):
    for t in range(len(_strip(toks[b]))):
      assert int(toks[b, t]) == int(np.argmax(lp[b, t]))
  np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-3)
  # Beam 3: each hypothesis' score equals its teacher-forced log-prob (a wrongly reordered
  # cache would break this), best first.
  bt, bs = dec(model, params, batch, max_decode_len=Lmax, method="beam", beam_size=3)
  for k in range(3):
    ref, _ = _teacher_forced_logp(model, params, batch, bt[:, k])
    np.testing.assert_allclose(np.asarray(bs[:, k]), ref, atol=1e-3)
  assert (np.diff(np.asarray(bs), axis=1) <= 1e-6).all()
