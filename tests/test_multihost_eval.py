"""Evaluation across two processes x 4 CPU devices (jax.distributed) equals one process with 8.

Saves a checkpoint of pali_tiny (one layer per stack, seeded random parameters: no training
step to compile), then starts `launch/eval.py` twice
(process 0 and 1, coordinator on 127.0.0.1) on it: each host decodes its own shard, process 0
gathers, scores and writes. Two caption tasks whose splits do not fill the batches of 8:
9 examples (shards of 5 and 4: host 1 decodes an all-padding batch at the last step) and 20
under a budget of 19 (host 1 reads a row beyond the budget at the last step). Process 0 must
score 9 and 19 examples with the metrics of an in-process 8-device evaluation of the same
checkpoint; process 1 gets an EVAL_DIR of its own, which must stay absent (it writes nothing).
"""
import json
import os
import subprocess
import sys

import gin
import numpy as np
import portpicker
import pytest

from tests import eval_tasks
from tests.test_evaluator import _scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150
GIN_FILES = [os.path.join(REPO, "gin_configs", p) for p in
             ("models/pali_tiny.gin", "runs/pretrain.gin", "runs/eval.gin")]
BUDGET = 19
EXPECTED = {eval_tasks.CAPTION_20: 19, eval_tasks.CAPTION_9: 9}


def _bindings(model_dir: str) -> list[str]:
  return [f"MODEL_DIR = '{model_dir}'", f"MIXTURE = '{eval_tasks.MIXTURE}'",
          "TRAIN_STEPS = 1", "BATCH_SIZE = 8", "IMAGE_SIZE = 16", "INPUT_LENGTH = 8",
          "TARGET_LENGTH = 16",
          "ViTConfig.depth = 1", "T5Config.num_encoder_layers = 1",
          "T5Config.num_decoder_layers = 1",  # one layer per stack: shorter compiles
          "create_mesh.data = 2", "create_mesh.fsdp = 2", "create_mesh.tensor = 2",
          f"EvalSettings.max_eval_examples = {BUDGET}", "EvalSettings.batch_size = 8",
          "EvalSettings.num_images = 2"]


def _eval_argv(model_dir: str, eval_dir: str) -> list[str]:
  return ([f"--gin_file={f}" for f in GIN_FILES]
          + [f"--gin_bindings={b}" for b in _bindings(model_dir)]
          + [f"--gin.EVAL_DIR='{eval_dir}'", "--module_import=tests.eval_tasks"])


def _launch_two_processes(argvs: list[list[str]], log_dir: str) -> list[str]:
  """Runs launch/eval.py once per argv as processes 0 and 1; returns their logs."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  procs, logs = [], []
  for pid, argv in enumerate(argvs):
    log = open(os.path.join(log_dir, f"eval.process_{pid}.log"), "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "eval.py"), *argv,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={pid}", "--alsologtostderr"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  if codes != [0, 0]:
    pytest.fail(f"multi-process evaluation failed (exit codes {codes}):\n" + "\n".join(
        f"--- process {pid} ---\n{t[-3000:]}" for pid, t in enumerate(texts)))
  return texts


def _predictions(eval_dir: str, task: str) -> list[dict]:
  with open(os.path.join(eval_dir, "eval", task, "predictions_1.jsonl")) as f:
    return [json.loads(line) for line in f]


def _save_random_checkpoint(model_dir: str, step: int) -> None:
  """Seeded random parameters of the configured model, saved as a training checkpoint's
  params (what `restore_params` reads)."""
  import jax

  from launch import eval as _  # noqa: F401  (registers evaluate_checkpoints for eval.gin)
  from pali import checkpoints, partitioning
  from pali.evaluation import checkpoint_io
  from pali.models import pali as pali_model
  gin.parse_config_files_and_bindings(GIN_FILES, _bindings(model_dir), finalize_config=False)
  mesh, rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
  abstract = checkpoint_io.abstract_params(
      pali_model.build_model_for_image_size(16), mesh, rules, image_size=16, max_images=1,
      task_feature_lengths={"inputs": 8, "targets": 16})
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: jax.device_put(rng.normal(0, 0.2, a.shape).astype(a.dtype), a.sharding),
      abstract)
  saver = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), save_every=1,
                                   asynchronous=False)
  saver.save(step, {"params": params})
  saver.close()
  gin.clear_config()


@pytest.mark.slow
def test_two_process_eval_matches_one_process(tmp_path):
  import tasks  # noqa: F401  (registers the vocabulary's configurable)
  from launch import eval as eval_launcher
  from launch import launch_utils
  from absl import flags
  from pali.models import pali  # noqa: F401

  model_dir = str(tmp_path / "run")
  _save_random_checkpoint(model_dir, step=1)

  multi = [str(tmp_path / "eval_process_0"), str(tmp_path / "eval_process_1")]
  logs = _launch_two_processes([_eval_argv(model_dir, d) for d in multi], str(tmp_path))
  assert not os.path.exists(multi[1]), os.listdir(multi[1])  # process 1 wrote nothing
  assert json.load(open(os.path.join(multi[0], "eval", "evaluated_steps.json"))) == [1]
  assert "Step 1:" in logs[0] and "Step 1:" not in logs[1]  # only process 0 prints the table

  # Reference: this process, 8 devices, the same mesh shape and configuration.
  single = str(tmp_path / "eval_single")
  flags.FLAGS.unparse_flags()
  launch_utils.parse_flags_with_gin_shortcuts(["eval.py"] + _eval_argv(model_dir, single))
  gin.clear_config()
  reference = eval_launcher.run_from_flags()[1]

  for task, n in EXPECTED.items():
    scalars = _scalars(os.path.join(multi[0], "eval", task))
    assert float(scalars["num_examples"][1]) == n == reference[task]["num_examples"]
    assert len(scalars["predictions"][1]) == 2 + 2  # two pictures (width, height, 2 PNGs)
    for name, want in reference[task].items():
      if name != "decode_seconds":
        # Tolerance: the same float32 math; only gloo vs in-process collectives may add in
        # another order (the loss sums).
        np.testing.assert_allclose(float(scalars[name][1]), want, rtol=1e-5, err_msg=name)
    got, want = _predictions(multi[0], task), _predictions(single, task)
    assert len(got) == n
    # The same examples in the same (split) order, with the same greedy predictions.
    assert [(r["input"], r["target"], r["prediction"]) for r in got] == [
        (r["input"], r["target"], r["prediction"]) for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want],
                               rtol=1e-5, atol=1e-5)
