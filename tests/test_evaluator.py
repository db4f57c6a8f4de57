"""Batch evaluation: metrics per task family, pictures, TensorBoard/JSONL outputs, the eval
launcher on a checkpoint of a tiny training run, continuous mode, in-training evaluation, and
every example of a split scored exactly once (a partial last batch is padded, not dropped).

One tiny training run (2 steps, 32 px, evaluation at every step and a final report) is shared
by the module; the decode and loss functions are compiled once per process (the evaluator
caches its jitted functions), so the launcher and continuous-mode tests reuse them.
"""
import json
import os
import shutil
import threading
import time

import gin
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from pali.evaluation import eval_input, task_metrics, visualize
from tests import eval_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "synthetic_shapes_detection"
GIN_FILES = [os.path.join(REPO, "gin_configs", "models", "pali_tiny.gin"),
             os.path.join(REPO, "gin_configs", "runs", "pretrain.gin")]


def _run_bindings(model_dir):
  return [f"MODEL_DIR = '{model_dir}'", f"MIXTURE = '{TASK}'",
          "TRAIN_STEPS = 2", "BATCH_SIZE = 8", "IMAGE_SIZE = 32", "INPUT_LENGTH = 16",
          "TARGET_LENGTH = 24", "train.checkpoint_every = 1", "train.log_every = 1",
          "learning_rate_schedule.warmup_steps = 1",
          "EvalSettings.max_eval_examples = 8", "EvalSettings.batch_size = 8",
          "EvalSettings.num_images = 2"]


def _parse(files, bindings):
  import tasks  # noqa: F401  (registers tasks and the vocabulary's configurable)
  from pali.models import pali  # noqa: F401
  from pali.training import trainer  # noqa: F401
  gin.clear_config()
  gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step training run that evaluates TASK at every step and reports at the end."""
  from pali.training import trainer
  model_dir = str(tmp_path_factory.mktemp("run"))
  _parse(GIN_FILES, _run_bindings(model_dir) + [
      "train.eval_every = 1", f"train.eval_mixture = '{TASK}'", "train.final_eval = True"])
  result = trainer.train()
  gin.clear_config()
  return model_dir, result


def _scalars(event_dir):
  acc = EventAccumulator(event_dir, size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    out[tag] = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
  return out


# ---- without a model ---------------------------------------------------------------------------
def test_task_families_and_metric_inputs():
  assert task_metrics.task_family("synthetic_shapes_detection") == "detection"
  assert task_metrics.task_family("synthetic_text_split_ocr") == "ocr"
  assert task_metrics.task_family("synthetic_shapes_vqa") == "vqa"
  assert task_metrics.task_family("synthetic_shapes_split_caption") == "caption"
  assert task_metrics.task_family("synthetic_stdlib_ul2") == "denoise"
  assert task_metrics.task_family("my_thing") == "other"
  det = task_metrics.FAMILIES["detection"]
  box = "<loc0100><loc0100><loc0500><loc0500> circle"
  m = det.compute(targets=[box, box], predictions=[box, "garbage"], scores=[-0.1, -5.0],
                  target_ids=[], prediction_ids=[])
  assert m["AP50"] == pytest.approx(0.5, abs=0.01)  # one of two objects found, exactly
  ul2 = task_metrics.FAMILIES["denoise"].compute(
      targets=[], predictions=[], scores=[], target_ids=[[5, 6, 7, 8]],
      prediction_ids=[[5, 6, 9]])
  assert ul2 == {"token_accuracy": 0.5, "sequence_accuracy": 0.0}
  vqa = task_metrics.FAMILIES["vqa"].compute(targets=["two", "three"], predictions=["2", "4"],
                                             scores=[0, 0], target_ids=[], prediction_ids=[])
  assert vqa == {"vqa_accuracy": 0.5}


def test_draw_prediction_boxes_and_text():
  image = np.full((32, 32, 3), 128, np.uint8)
  pic = visualize.draw_prediction(
      image, prediction="<loc0000><loc0000><loc0511><loc0511> star", target="", size=64)
  assert pic.shape[1] == 64 and pic.shape[0] > 64  # image plus a text panel below
  red = (pic[..., 0] > 200) & (pic[..., 1] < 80)
  assert red[:64, :33].any() and not red[:64, 40:].any()  # the box is in the top-left quarter
  assert (pic[64:] < 100).any()  # some text was written in the panel
  tiles = visualize.grid([pic, pic, pic], columns=2, titles=["a", "b", "c"])
  assert tiles.shape[1] > 2 * 64 and tiles.shape[0] > 2 * pic.shape[0]


def test_positions_over_hosts_with_uneven_shards_and_a_budget():
  # Two hosts of 4 rows: row j of host 0, then row j of host 1, ... (seqio's interleaved
  # shards: the example's index in the split).
  np.testing.assert_array_equal(eval_input.assign_positions([4, 4], 4, 100),
                                [[0, 2, 4, 6], [1, 3, 5, 7]])
  # Host 1's shard ran out: it still runs the step, with rows that are all padding.
  np.testing.assert_array_equal(eval_input.assign_positions([1, 0], 4, 100, start=8),
                                [[8, -1, -1, -1], [-1, -1, -1, -1]])
  # Uneven counts, and a budget of 3 more examples: the rest is read but not kept.
  np.testing.assert_array_equal(eval_input.assign_positions([3, 2], 4, 3, start=16),
                                [[16, 18, -1, -1], [17, -1, -1, -1]])
  np.testing.assert_array_equal(eval_input.assign_positions([3], 4, 100), [[0, 1, 2, -1]])


def test_eval_batches_pad_the_last_batch_with_zero_weight_rows():
  import tensorflow as tf
  n, width = 11, 3
  ds = tf.data.Dataset.from_tensor_slices({
      "encoder_input_tokens": np.arange(1, n + 1, dtype=np.int32)[:, None, None].repeat(
          width, 2),
      "decoder_loss_weights": np.ones((n, 1, width), np.float32)})
  batches = list(eval_input.eval_batches(ds, host_batch=4, max_examples=100))
  assert len(batches) == 3  # 4 + 4 + 3 (padded to 4), nothing dropped
  for batch, positions in batches:
    assert batch["encoder_input_tokens"].shape == (4, width)  # one static shape
    assert positions.shape == (4,)
    np.testing.assert_array_equal(batch["decoder_loss_weights"][:, 0], positions >= 0)
  positions = np.concatenate([p for _, p in batches])
  np.testing.assert_array_equal(positions, list(range(n)) + [-1])
  tokens = np.concatenate([b["encoder_input_tokens"][:, 0] for b, _ in batches])
  np.testing.assert_array_equal(tokens, list(range(1, n + 1)) + [0])  # a zero row
  # A budget of 6: the second batch reads 2 and pads 2; no third step.
  batches = list(eval_input.eval_batches(ds, host_batch=4, max_examples=6))
  np.testing.assert_array_equal(np.concatenate([p for _, p in batches]),
                                [0, 1, 2, 3, 4, 5, -1, -1])


# ---- with the tiny training run ------------------------------------------------------------------
def test_in_training_eval_writes_events_jsonl_images_and_report(run):
  model_dir, result = run
  assert result.step == 2
  event_dir = os.path.join(model_dir, "eval", TASK)
  scalars = _scalars(event_dir)
  for tag in ("mAP", "AP50", "AP75", "loss", "accuracy", "num_examples"):
    assert set(scalars[tag]) == {1, 2}, tag
  assert float(scalars["num_examples"][2]) == 8
  assert np.isfinite(float(scalars["loss"][2])) and float(scalars["loss"][2]) > 0
  images = scalars["predictions"][2]  # tf.summary.image: [width, height, png...]
  assert len(images) == 2 + 2  # two encoded pictures
  lines = open(os.path.join(event_dir, "predictions_2.jsonl")).read().splitlines()
  assert len(lines) == 8
  for line in lines:
    row = json.loads(line)
    assert set(row) == {"input", "target", "prediction", "score"}
    assert row["input"].startswith("detect") and "<loc" in row["target"]
  assert os.path.getsize(os.path.join(model_dir, "eval", "predictions.png")) > 1000


def test_restore_params_reads_only_params(run):
  from pali import checkpoints, partitioning
  from pali.evaluation import evaluator as ev
  from pali.models import pali as pali_model
  model_dir, result = run
  _parse(GIN_FILES, _run_bindings(model_dir))
  mesh, rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
  model = pali_model.build_model_for_image_size(32)
  abstract = ev.abstract_params(model, mesh, rules, image_size=32, max_images=1,
                                task_feature_lengths={"inputs": 16, "targets": 24})
  params = checkpoints.restore_params(os.path.join(model_dir, "checkpoints"), 2, abstract)
  flat = jax.tree_util.tree_leaves_with_path(params)
  want = dict(jax.tree_util.tree_leaves_with_path(result.state.params))
  assert len(flat) == len(want)
  shardings = {p: a.sharding for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
  for path, leaf in flat:
    assert leaf.sharding == shardings[path]  # restored onto the mesh, in its shards
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]))


def _launch_eval(argv):
  from launch import eval as eval_launcher
  from launch import launch_utils
  from absl import flags
  flags.FLAGS.unparse_flags()
  launch_utils.parse_flags_with_gin_shortcuts(["eval.py"] + argv)
  gin.clear_config()
  return eval_launcher.run_from_flags()


def _eval_argv(model_dir, *extra):
  files = GIN_FILES + [os.path.join(REPO, "gin_configs", "runs", "eval.gin")]
  argv = [f"--gin_file={f}" for f in files]
  argv += [f"--gin_bindings={b}" for b in _run_bindings(model_dir)]
  return argv + [f"--gin.EVAL_MIXTURE='{TASK}'", *extra]


def test_eval_launcher_on_one_step_folder(run, tmp_path):
  model_dir, _ = run
  out = str(tmp_path / "eval_out")
  results = _launch_eval(_eval_argv(
      model_dir, f"--gin.CHECKPOINT_PATH='{model_dir}/checkpoints/1'",
      f"--gin.EVAL_DIR='{out}'"))
  assert list(results) == [1] and set(results[1]) == {TASK}
  assert {"mAP", "AP50", "AP75", "loss"} <= set(results[1][TASK])
  scalars = _scalars(os.path.join(out, "eval", TASK))
  assert set(scalars["loss"]) == {1}
  # Same parameters as the in-training evaluation at step 1: same loss.
  in_training = _scalars(os.path.join(model_dir, "eval", TASK))
  np.testing.assert_allclose(float(scalars["loss"][1]), float(in_training["loss"][1]),
                             rtol=1e-5)


def test_continuous_eval_picks_up_a_new_checkpoint(run, tmp_path):
  model_dir, _ = run
  watched = tmp_path / "watched" / "checkpoints"
  watched.mkdir(parents=True)
  src = os.path.join(model_dir, "checkpoints")
  shutil.copytree(os.path.join(src, "1"), watched / "1")

  def write_step_2_later():
    time.sleep(3)
    shutil.copytree(os.path.join(src, "2"), watched / "2.orbax-checkpoint-tmp-0")
    os.rename(watched / "2.orbax-checkpoint-tmp-0", watched / "2")  # as orbax finalises

  writer = threading.Thread(target=write_step_2_later)
  writer.start()
  try:
    results = _launch_eval(_eval_argv(
        model_dir, f"--gin.CHECKPOINT_PATH='{watched}'", "--gin.WAIT_FOR_NEW=True",
        "--gin.EVAL_LAST_STEP=2", "--gin.EVAL_TIMEOUT_S=120",
        "--gin_bindings=evaluate_checkpoints.poll_interval_s = 0.5"))
  finally:
    writer.join()
  assert sorted(results) == [1, 2]
  run_dir = watched.parent
  assert json.load(open(run_dir / "eval" / "evaluated_steps.json")) == [1, 2]
  assert set(_scalars(str(run_dir / "eval" / TASK))["AP50"]) == {1, 2}
  # A restart skips what was evaluated already.
  assert _launch_eval(_eval_argv(model_dir, f"--gin.CHECKPOINT_PATH='{watched}'")) == {}


def _reference(model, params, task_name, lengths, image_size):
  """The whole split as ONE unsharded batch (no padding), decoded and scored by hand: per
  example (target, prediction, score) and a `loss_of(n)` over the first n examples."""
  import seqio

  from pali import decoding
  from pali.data import pipeline
  from pali.evaluation import evaluator as ev
  from pali.training import step as step_lib
  n = eval_tasks.SIZES[task_name]
  ds = pipeline.get_dataset(task_name, split="validation", task_feature_lengths=lengths,
                            batch_size=n, image_size=image_size, shuffle=False, seed=0,
                            num_epochs=1)
  (batch,) = list(ds.as_numpy_iterator())
  params = jax.device_get(params)
  tokens, scores = jax.jit(lambda p, b: decoding.decode_batch(
      model, p, b, max_decode_len=lengths["targets"], method="greedy"))(
          params, {k: batch[k] for k in ev.DECODE_FEATURES})
  vocab = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
  decode = lambda rows: [vocab.decode(ev._strip_ids(r)) for r in np.asarray(rows)]  # noqa: E731
  loss_step = jax.jit(step_lib.make_eval_step(model))

  def loss_of(count):
    weights = batch["decoder_loss_weights"].copy()
    weights[count:] = 0
    sums = jax.device_get(loss_step(params, dict(batch, decoder_loss_weights=weights)))
    return (float(sums["loss"]) / float(sums["weight_sum"]),
            float(sums["correct"]) / float(sums["weight_sum"]))

  return decode(batch["decoder_target_tokens"]), decode(tokens), np.asarray(scores), loss_of


def _restored_caption_model(run):
  """The fixture run's step-2 model and params, for the 20-example caption task at 32 px."""
  from pali import checkpoints, partitioning
  from pali.evaluation import evaluator as ev
  from pali.models import pali as pali_model
  model_dir, _ = run
  _parse(GIN_FILES, _run_bindings(model_dir))
  task_name, lengths = eval_tasks.CAPTION_20, {"inputs": 16, "targets": 24}
  mesh, rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
  model = pali_model.build_model_for_image_size(32)
  params = checkpoints.restore_params(os.path.join(model_dir, "checkpoints"), 2, ev.abstract_params(
      model, mesh, rules, image_size=32, max_images=1, task_feature_lengths=lengths))
  return model, mesh, rules, params, task_name, lengths


def test_partial_last_batch_is_scored_not_dropped(run, tmp_path):
  """20 examples, batches of 8: 8 + 8 + 4 real rows (and 4 padding) -> all 20 scored, with the
  metrics of the same 20 examples decoded as one unpadded batch; a budget of 13 scores 13."""
  import seqio

  from pali.evaluation import evaluator as ev
  model, mesh, rules, params, task_name, lengths = _restored_caption_model(run)
  targets, predictions, scores, loss_of = _reference(model, params, task_name, lengths, 32)
  scorer = task_metrics.for_task(task_name, seqio.get_mixture_or_task(task_name))

  for budget, n in ((64, 20), (13, 13)):
    evaluator = ev.Evaluator(model, mesh=mesh, rules=rules, task_feature_lengths=lengths,
                             image_size=32, settings=ev.EvalSettings(
                                 max_eval_examples=budget, batch_size=8, num_images=2))
    assert evaluator.global_batch == 8
    out = str(tmp_path / f"budget_{budget}")
    metrics = evaluator.evaluate(params, mixture_or_task=task_name, step=2,
                                 model_dir=out)[task_name]
    evaluator.close()
    assert metrics["num_examples"] == n
    rows = [json.loads(line) for line in
            open(os.path.join(out, "eval", task_name, "predictions_2.jsonl"))]
    assert [r["target"] for r in rows] == targets[:n]  # each example once, in split order
    assert [r["prediction"] for r in rows] == predictions[:n]
    np.testing.assert_allclose([r["score"] for r in rows], scores[:n], rtol=1e-4, atol=1e-4)
    want = scorer.compute(targets=targets[:n], predictions=predictions[:n],
                          scores=list(scores[:n]), target_ids=[], prediction_ids=[])
    assert {"cider", "bleu4"} <= set(want)
    for k, v in want.items():
      assert metrics[k] == pytest.approx(v, abs=1e-9), k
    # Padding rows carry zero loss weight: the loss is that of the n real examples.
    loss, accuracy = loss_of(n)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy, rel=1e-5)
    assert float(_scalars(os.path.join(out, "eval", task_name))["num_examples"][2]) == n
  assert loss_of(13)[0] != pytest.approx(loss_of(16)[0], rel=1e-4)  # the loss tells sets apart


def test_each_batch_decodes_with_its_own_key(run, tmp_path):
  """Sampled decoding: the 3 batches of a 20-example split get 3 different keys (one key for
  all would give every batch the same noise)."""
  from pali.evaluation import evaluator as ev
  model, mesh, rules, params, task_name, lengths = _restored_caption_model(run)
  evaluator = ev.Evaluator(model, mesh=mesh, rules=rules, task_feature_lengths=lengths,
                           image_size=32, settings=ev.EvalSettings(
                               max_eval_examples=64, batch_size=8, num_images=0))
  keys, decode = [], evaluator._decode

  def recording_decode(params, batch, trie, rng):
    keys.append(tuple(np.asarray(rng).ravel().tolist()))
    return decode(params, batch, trie, rng)

  evaluator._decode = recording_decode
  evaluator.evaluate(params, mixture_or_task=task_name, step=2, model_dir=str(tmp_path))
  evaluator.close()
  assert len(keys) == 3 and len(set(keys)) == 3
