"""The quickstart config end to end through launch/tpu_train.py: train, checkpoint, TensorBoard,
final evaluation with a metrics table and a picture of predictions."""
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import fault_injection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
  cmd = [sys.executable, "launch/tpu_train.py", "--gin_file=gin_configs/runs/quickstart_cpu.gin",
         f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=4", "--gin.IMAGE_SIZE=32",
         "--gin.BATCH_SIZE=8", "--gin.train.log_every=2", "--gin.train.checkpoint_every=2",
         "--gin.EvalSettings.max_eval_examples=8"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=fault_injection._env())
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  assert "step 4/4" in log
  assert fault_injection.finished_checkpoints(str(tmp_path)) == [2, 4]
  assert (tmp_path / "config.gin").exists()

  events = EventAccumulator(str(tmp_path / "train"))
  events.Reload()
  tags = set(events.Tags()["tensors"])
  for tag in ("loss", "z_loss", "accuracy", "learning_rate", "grad_norm", "param_norm",
              "steps_per_s", "examples_per_s", "tokens_per_s", "compile_seconds"):
    assert tag in tags, (tag, sorted(tags))

  assert "Evaluation of" in proc.stdout  # the per-task metrics table
  assert (tmp_path / "eval" / "predictions.png").stat().st_size > 0
