"""pali.data.cache: preprocessed examples in ArrayRecord, read back through grain."""
import dataclasses
import itertools
import json
import os
import shutil

import grain.python as grain
import jax
import numpy as np
import pytest

import tasks  # noqa: F401  (registers everything)
from pali.data import cache, pipeline
from pali.data import vocabulary as V
from pali.models import pali as pali_model
from pali.training import trainer
from tests import trainer_fixtures as fx

MIXTURE = "pali_synthetic_pretrain"
LENGTHS = {"inputs": 16, "targets": 16}
SIZE = 32
N = 64
SEED = 3


def _key(example):
  return tuple((k, example[k].dtype.name, example[k].tobytes()) for k in sorted(example))


def _unbatch(batches):
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["images"]))]


def _read(cache_dir, n=None, **kw):
  args = dict(split="train", task_feature_lengths=LENGTHS, batch_size=8, image_size=SIZE,
              seed=0, cache_dir=cache_dir)
  args.update(kw)
  it = cache.cached_dataset(MIXTURE, **args).as_numpy_iterator()
  return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cache"))
  cache.write_cache(MIXTURE, out, split="train", num_examples=N, task_feature_lengths=LENGTHS,
                    image_size=SIZE, seed=SEED, num_shards_out=2)
  return out


@pytest.fixture(scope="module")
def live_batches():
  """What get_dataset draws with the cache's seed: N examples as batches of 8."""
  it = pipeline.get_dataset(MIXTURE, split="train", task_feature_lengths=LENGTHS, batch_size=8,
                            image_size=SIZE, shuffle=True, seed=SEED).as_numpy_iterator()
  out = list(itertools.islice(it, N // 8))
  del it
  return out


def test_record_format_keeps_dtypes_and_shapes_and_rejects_a_truncated_record():
  example = {"images": np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3),
             "none": np.zeros((0, 4, 4, 3), np.uint8), "w": np.float32(0.5),
             "tokens": np.array([[5, -1]], np.int32).T}  # not C-contiguous
  raw = cache.encode(example)
  back = cache.decode(raw)
  assert list(back) == list(example)
  for k, v in example.items():
    assert back[k].dtype == v.dtype and back[k].shape == np.shape(v), k
    np.testing.assert_array_equal(back[k], v)
  with pytest.raises(ValueError, match="corrupt cache"):
    cache.decode(raw[:-1])


def test_cache_files_and_spec(cache_dir):
  assert sorted(os.listdir(cache_dir)) == [  # no temporary folder left behind
      "train.array_record-00000-of-00002", "train.array_record-00001-of-00002",
      "train.spec.json"]
  spec = cache.read_spec(cache_dir, "train")
  assert spec["num_examples"] == N and spec["seed"] == SEED and spec["mixture"] == MIXTURE
  assert spec["task_feature_lengths"] == LENGTHS and spec["image_size"] == SIZE
  assert spec["features"]["images"] == {"shape": [1, SIZE, SIZE, 3], "dtype": "uint8"}
  assert spec["features"]["decoder_loss_weights"] == {"shape": [16], "dtype": "float32"}


def test_cache_holds_exactly_what_get_dataset_drew(cache_dir, live_batches):
  cached = _unbatch(_read(cache_dir, batch_size=1, shuffle=False, num_epochs=1))
  live = _unbatch(live_batches)
  assert len(cached) == N
  for c, e in zip(cached, live):  # in draw order, feature for feature
    _assert_batches_equal(c, e)
  assert len({_key(e) for e in live}) == N  # distinct examples: the comparison has teeth


def test_batches_have_get_datasets_features_dtypes_and_shapes(cache_dir, live_batches):
  spec = lambda b: {k: (v.dtype, v.shape) for k, v in b.items()}  # noqa: E731
  (batch,) = _read(cache_dir, 1)
  assert spec(batch) == spec(live_batches[0])
  assert batch["images"].dtype == np.uint8


def test_each_epoch_is_a_new_permutation_of_the_cache(cache_dir):
  everything = {_key(e) for e in _unbatch(_read(cache_dir, batch_size=1, shuffle=False,
                                                 num_epochs=1))}
  batches = _read(cache_dir, 2 * N // 8)  # two epochs, shuffled
  epochs = [[_key(e) for e in _unbatch(batches[i:i + N // 8])] for i in (0, N // 8)]
  for keys in epochs:
    assert sorted(keys) == sorted(everything)
  assert epochs[0] != epochs[1]
  other_seed = [_key(e) for e in _unbatch(_read(cache_dir, N // 8, seed=1))]
  assert other_seed != epochs[0]
  for a, b in zip(_read(cache_dir, 3), _read(cache_dir, 3)):  # same seed, same batches
    _assert_batches_equal(a, b)


@pytest.mark.parametrize("shard_id,num_shards", [(0, 1), (1, 2)])
def test_skip_is_o1_and_gives_the_next_batch_of_an_unskipped_run(cache_dir, shard_id, num_shards):
  kw = dict(shard_id=shard_id, num_shards=num_shards, cache_dir=cache_dir, split="train",
            task_feature_lengths=LENGTHS, batch_size=8, image_size=SIZE, seed=5)
  ds = cache.cached_dataset(MIXTURE, **kw)
  it = ds.as_numpy_iterator()
  states, batches = [], []
  for _ in range(12):  # with 2 shards: 4 batches per epoch, so this crosses two epochs
    states.append(it.get_state())
    batches.append(next(it))
  for n in (1, 5, 11):
    skipped = ds.skip(n).as_numpy_iterator()
    assert json.loads(skipped.get_state()) == json.loads(states[n])  # grain's own bookkeeping
    _assert_batches_equal(next(skipped), batches[n])
  _assert_batches_equal(next(ds.skip(2).skip(3).as_numpy_iterator()), batches[5])
  # O(1): a billion batches are not read; the batch is where the sampler puts it.
  n = 10**9
  far = next(ds.skip(n).as_numpy_iterator())
  source = grain.ArrayRecordDataSource(
      [os.path.join(cache_dir, f) for f in cache.read_spec(cache_dir, "train")["files"]])
  sampler = grain.IndexSampler(
      N, shard_options=grain.ShardOptions(shard_id, num_shards, drop_remainder=True),
      shuffle=True, num_epochs=None, seed=5)
  expect = [cache.decode(source[sampler[(n * 8 + j) * num_shards + shard_id].record_key])
            for j in range(8)]
  _assert_batches_equal(far, {k: np.stack([e[k] for e in expect]) for k in expect[0]})


def test_two_shards_are_disjoint_and_cover_the_cache(cache_dir):
  shards = [_read(cache_dir, shard_id=i, num_shards=2, num_epochs=1) for i in (0, 1)]
  assert [len(s) for s in shards] == [N // 16, N // 16]  # one epoch: 32 examples each, then end
  keys = [{_key(e) for e in _unbatch(s)} for s in shards]
  assert not keys[0] & keys[1]
  everything = {_key(e) for e in _unbatch(_read(cache_dir, batch_size=1, shuffle=False,
                                                 num_epochs=1))}
  assert keys[0] | keys[1] == everything


def test_a_cache_for_other_settings_is_refused_with_both_values(cache_dir):
  with pytest.raises(ValueError, match="image_size: the cache has 32, the run asks for 64"):
    cache.cached_dataset(MIXTURE, split="train", task_feature_lengths=LENGTHS, batch_size=8,
                         image_size=64, cache_dir=cache_dir)
  with pytest.raises(ValueError, match=r"task_feature_lengths: the cache has \{'inputs': 16, "
                                       r"'targets': 16\}, the run asks for \{'inputs': 32"):
    cache.cached_dataset(MIXTURE, split="train", task_feature_lengths={"inputs": 32,
                         "targets": 16}, batch_size=8, image_size=SIZE, cache_dir=cache_dir)
  with pytest.raises(ValueError, match="mixture: the cache has 'pali_synthetic_pretrain', "
                                       "the run asks for 'pali_synthetic_learn'"):
    cache.cached_dataset("pali_synthetic_learn", split="train", task_feature_lengths=LENGTHS,
                         batch_size=8, image_size=SIZE, cache_dir=cache_dir)
  with pytest.raises(ValueError, match="No complete cache for split 'validation'"):
    cache.cached_dataset(MIXTURE, split="validation", task_feature_lengths=LENGTHS,
                         batch_size=8, image_size=SIZE, cache_dir=cache_dir)
  with pytest.raises(ValueError, match="smaller than batch_size=64"):
    _read(cache_dir, 1, batch_size=64, num_shards=2)


def _copy(cache_dir, dest, *, spec=True):
  os.makedirs(dest)
  for name in os.listdir(cache_dir):
    if spec or not name.endswith(".json"):
      shutil.copy(os.path.join(cache_dir, name), dest)
  return str(dest)


def test_a_partial_cache_is_not_picked_up(cache_dir, tmp_path, monkeypatch):
  no_spec = _copy(cache_dir, tmp_path / "no_spec", spec=False)
  with pytest.raises(ValueError, match="No complete cache"):
    _read(no_spec, 1)
  only_tmp = tmp_path / "only_tmp"  # a write that died before publishing
  _copy(cache_dir, only_tmp / ".tmp-train-abc")
  with pytest.raises(ValueError, match="No complete cache"):
    _read(str(only_tmp), 1)
  short = _copy(cache_dir, tmp_path / "short")
  os.remove(os.path.join(short, "train.array_record-00001-of-00002"))
  with pytest.raises(ValueError, match="incomplete"):
    _read(short, 1)

  # A write interrupted after 5 examples leaves neither files nor a spec, and an older
  # complete cache in the same folder untouched.
  def dying_get_dataset(*args, **kwargs):
    examples = _unbatch(_read(cache_dir, batch_size=1, shuffle=False, num_epochs=1))[:5]

    class Dying:
      def as_numpy_iterator(self):
        for e in examples:
          yield {k: v[None] for k, v in e.items()}
        raise RuntimeError("preempted")
    return Dying()

  monkeypatch.setattr(cache.pipeline, "get_dataset", dying_get_dataset)
  empty, old = str(tmp_path / "empty"), _copy(cache_dir, tmp_path / "old")
  before = _read(old, 2)
  for out in (empty, old):
    with pytest.raises(RuntimeError, match="preempted"):
      cache.write_cache(MIXTURE, out, split="train", num_examples=N,
                        task_feature_lengths=LENGTHS, image_size=SIZE, seed=9)
  assert os.listdir(empty) == []
  assert sorted(os.listdir(old)) == sorted(os.listdir(cache_dir))
  for a, b in zip(before, _read(old, 2)):
    _assert_batches_equal(a, b)


def _train(model_dir, steps, *, checkpoint_every=2, dataset_fn=None):
  import gin
  for name, value in [("create_mesh.data", 2), ("create_mesh.fsdp", 4), ("create_mesh.tensor", 1),
                      ("create_optimizer.name", "adafactor"),
                      ("learning_rate_schedule.warmup_steps", 2)]:
    gin.bind_parameter(name, value)
  config = fx.tiny_config(posemb_grid=SIZE // 8)
  config = dataclasses.replace(config, t5=dataclasses.replace(
      config.t5, vocab_size=V.get_vocabulary().vocab_size))
  kw = {} if dataset_fn is None else {"dataset_fn": dataset_fn}
  return trainer.train(
      model_dir=str(model_dir), mixture=MIXTURE, train_steps=steps, batch_size=8,
      task_feature_lengths=LENGTHS, image_size=SIZE, checkpoint_every=checkpoint_every,
      log_every=1, model=pali_model.build_model(config), **kw)


class _Recorded:
  """A cached_dataset that logs every batch the trainer takes from it."""

  def __init__(self, ds, log):
    self.ds, self.log = ds, log

  def skip(self, n):
    return _Recorded(self.ds.skip(n), self.log)

  def as_numpy_iterator(self):
    for batch in self.ds.as_numpy_iterator():
      self.log.append(batch)
      yield batch


def test_trainer_trains_from_the_cache_and_resumes_with_the_same_batches(cache_dir, tmp_path):
  import gin
  # The README's two lines, as a user writes them.
  gin.parse_config(f"train.dataset_fn = @cached_dataset\ncached_dataset.cache_dir = '{cache_dir}'")
  straight = _train(tmp_path / "a", 6)
  assert straight.step == 6 and np.isfinite(straight.first_loss)

  log = []
  recorded = lambda *a, **kw: _Recorded(cache.cached_dataset(*a, **kw), log)  # noqa: E731
  _train(tmp_path / "b", 3, checkpoint_every=3, dataset_fn=recorded)  # stops (saves) at 3
  assert len(log) == 3
  resumed = _train(tmp_path / "b", 6, dataset_fn=recorded)
  assert resumed.step == 6 and len(log) == 6
  # The trainer's data: seed 0, one host; an uninterrupted reader's first 6 batches.
  expected = _read(cache_dir, 6)
  for got, want in zip(log, expected):
    _assert_batches_equal(got, want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(straight.state.params),
                         jax.device_get(resumed.state.params))
