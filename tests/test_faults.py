"""Faults survived: NaN batches, SIGTERM, SIGKILL (also mid-save), half-written checkpoints."""
import os
import re
import signal
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from launch import fault_injection
from pali import checkpoints
from pali.training import trainer
from tests import trainer_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = ["gin_configs/runs/quickstart_cpu.gin"]
SMALL = ["IMAGE_SIZE = 32", "BATCH_SIZE = 8", "INPUT_LENGTH = 16", "TARGET_LENGTH = 16",
         "learning_rate_schedule.warmup_steps = 5"]


def _nan_at(bad_index):
  """The random dataset with NaN loss weights in batch number `bad_index`."""
  import tensorflow as tf

  def dataset_fn(*args, **kw):
    def poison(i, batch):
      scale = tf.where(i == bad_index, np.float32(np.nan), np.float32(1.0))
      return {**batch, "decoder_loss_weights": scale * batch["decoder_loss_weights"]}
    return fx.random_dataset_fn(*args, **kw).enumerate().map(poison)
  return dataset_fn


def _train(model_dir, steps, on_nonfinite, dataset_fn):
  gin.bind_parameter("create_mesh.fsdp", -1)
  return trainer.train(
      model_dir=str(model_dir), mixture="unused", train_steps=steps, batch_size=8,
      task_feature_lengths={"inputs": fx.INPUT_LEN, "targets": fx.TARGET_LEN},
      image_size=fx.IMAGE_SIZE, checkpoint_every=2, log_every=1, on_nonfinite=on_nonfinite,
      model=fx.tiny_model(), dataset_fn=dataset_fn)


def test_nan_batch_stops_with_step_and_last_good_checkpoint(tmp_path):
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"at step 4 .*Last good checkpoint: step 2"):
    _train(tmp_path, 6, "stop", _nan_at(3))  # batch index 3 is consumed by step 4
  assert fault_injection.finished_checkpoints(str(tmp_path)) == [2]  # no NaN checkpoint


def test_nan_batch_skipped_when_configured(tmp_path):
  result = _train(tmp_path, 6, "skip", _nan_at(3))
  assert result.step == 6
  leaves = jax.tree_util.tree_leaves(jax.device_get(result.state.params))
  assert all(np.isfinite(x).all() for x in leaves)


def test_half_written_checkpoints_are_ignored_and_removed(tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  _train(tmp_path, 2, "stop", fx.random_dataset_fn)
  partial = ckpt_dir / "4.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("half a save")
  ckpt = checkpoints.Checkpointer(str(ckpt_dir), save_every=2)
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert not partial.exists()


def _launch(model_dir, steps, *extra):
  cmd = fault_injection._command(GIN, SMALL + list(extra), str(model_dir), steps, 1000)
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=fault_injection._env(), cwd=ROOT)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  proc = _launch(tmp_path, 1000)
  out = []
  for line in proc.stdout:
    out.append(line)
    m = re.search(r"\] step (\d+)/1000 ", line)
    if m and int(m.group(1)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=300)
  log = "".join(out) + rest
  assert proc.returncode == 0, log[-3000:]
  m = re.search(r"SIGTERM received: saved a checkpoint at step (\d+)", log)
  assert m, log[-3000:]
  saved = int(m.group(1))
  assert fault_injection.finished_checkpoints(str(tmp_path)) == [saved]
  resumed = subprocess.run(_launch_cmd(tmp_path, saved + 2), capture_output=True, text=True,
                           env=fault_injection._env(), cwd=ROOT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from checkpoint step {saved}" in resumed.stdout + resumed.stderr


def _launch_cmd(model_dir, steps):
  return fault_injection._command(GIN, SMALL, str(model_dir), steps, 1000)


@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path):
  report = fault_injection.inject_faults(GIN, SMALL, steps=8, checkpoint_every=2, kills=2,
                                         workdir=str(tmp_path), seed=1)
  assert report["final_params_bit_identical"], report
  assert report["steps_lost_beyond_checkpoint"] == 0, report
  assert report["partial_checkpoints_left"] == []
  assert all(e["killed_at_step"] is not None for e in report["kills"])
