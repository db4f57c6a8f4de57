r"""Evaluates checkpoints of a run: one step, all of them, or each new one as it appears.

  # the latest run of the quickstart config, every checkpoint present:
  python launch/eval.py --gin_file=gin_configs/runs/quickstart_cpu.gin \
      --gin_file=gin_configs/runs/eval.gin
  # one step, one task:
  python launch/eval.py --gin_file=gin_configs/runs/quickstart_cpu.gin \
      --gin_file=gin_configs/runs/eval.gin \
      --gin.CHECKPOINT_PATH="'runs/quickstart/checkpoints/300'" \
      --gin.EVAL_MIXTURE="'synthetic_shapes_detection'"
  # beside a training job: wait for new checkpoints until step EVAL_LAST_STEP is evaluated
  # (or none appeared for EVAL_TIMEOUT_S seconds):
  python launch/eval.py ... --gin.WAIT_FOR_NEW=True

Give the run's own gin file first (it defines the model and IMAGE_SIZE, INPUT_LENGTH,
TARGET_LENGTH, MIXTURE, TRAIN_STEPS), then gin_configs/runs/eval.gin. Results go to
`<run>/eval/<task>/` (TensorBoard and predictions_<step>.jsonl); the steps already evaluated
are listed in `<run>/eval/evaluated_steps.json` and skipped when the job restarts.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launch_utils  # noqa: E402

launch_utils.set_process_environment()

import gin  # noqa: E402
from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
if "gin_file" not in FLAGS:
  launch_utils.define_common_flags()


def _load_evaluated(path: str) -> set[int]:
  import tensorflow as tf
  if not tf.io.gfile.exists(path):
    return set()
  with tf.io.gfile.GFile(path) as f:
    return set(json.load(f))


def _save_evaluated(path: str, steps: set[int]) -> None:
  import jax
  import tensorflow as tf
  if jax.process_index() == 0:  # the other hosts write nothing, not even the folder
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(sorted(steps), f)


def _agree(value: int) -> int:
  """Process 0's value on every host (hosts may list a folder at slightly different times)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


@gin.configurable(denylist=["model"])
def evaluate_checkpoints(*, checkpoint_path: str = gin.REQUIRED,
                         mixture_or_task: str = gin.REQUIRED,
                         task_feature_lengths=gin.REQUIRED, image_size: int = 224,
                         max_images: int = 1, eval_dir: str | None = None,
                         wait_for_new: bool = False, last_step: int | None = None,
                         timeout_s: float = 3600.0, poll_interval_s: float = 30.0,
                         skip_evaluated: bool = True, model=None) -> dict[int, dict]:
  """Evaluates the checkpoints at `checkpoint_path` (a step folder, a checkpoints folder or a
  run folder); returns {step: {task: metrics}}. See the module docstring."""
  from pali import checkpoints, partitioning
  from pali.evaluation import checkpoint_io
  from pali.evaluation import evaluator as ev
  from pali.models import pali as pali_model

  directory, only_step = checkpoint_io.resolve_checkpoint_path(checkpoint_path)
  eval_dir = eval_dir or checkpoint_io.model_dir_for(directory)
  record = os.path.join(eval_dir, "eval", "evaluated_steps.json")
  done = _load_evaluated(record) if skip_evaluated and only_step is None else set()
  mesh, rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
  model = model or pali_model.build_model_for_image_size(image_size)
  abstract = checkpoint_io.abstract_params(
      model, mesh, rules, image_size=image_size, max_images=max_images,
      task_feature_lengths=task_feature_lengths)
  evaluator = ev.Evaluator(model, mesh=mesh, rules=rules,
                           task_feature_lengths=task_feature_lengths, image_size=image_size,
                           max_images=max_images)
  results: dict[int, dict] = {}
  last_new = time.time()
  while True:
    steps = [only_step] if only_step is not None else checkpoint_io.checkpoint_steps(directory)
    pending = [s for s in steps if s not in done]
    step = _agree(pending[0] if pending else -1)
    if step >= 0:
      logging.info("Evaluating step %d of %s on %s", step, directory, mixture_or_task)
      params = checkpoints.restore_params(directory, step, abstract)
      results[step] = evaluator.evaluate(params, mixture_or_task=mixture_or_task, step=step,
                                         model_dir=eval_dir)
      del params
      done.add(step)
      if only_step is None:
        _save_evaluated(record, done)
      last_new = time.time()
      if only_step is not None or (last_step is not None and step >= last_step):
        break
      continue
    if not wait_for_new:
      break
    if last_step is not None and done and max(done) >= last_step:
      break
    if time.time() - last_new > timeout_s:
      logging.info("No new checkpoint in %s for %.0f s: stopping.", directory, timeout_s)
      break
    time.sleep(poll_interval_s)
  evaluator.close()
  if not results and not wait_for_new and only_step is None and not done:
    raise FileNotFoundError(f"No finished checkpoint in {directory}.")
  return results


def run_from_flags() -> dict[int, dict]:
  """Parses gin from the flags, evaluates, prints a table per step; returns the results."""
  launch_utils.maybe_initialize_distributed()
  from pali.evaluation import evaluator as ev

  try:
    launch_utils.import_modules_and_parse_gin(required_macros=("CHECKPOINT_PATH",))
    results = evaluate_checkpoints()
  except (*launch_utils.user_errors(), FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import jax
  if jax.process_index() == 0:
    for step, per_task in sorted(results.items()):
      print(f"\nStep {step}:\n{ev.format_table(per_task)}")
  return results


def main(argv):
  del argv
  run_from_flags()  # returns nothing: app.run would turn a return value into an exit code


if __name__ == "__main__":
  app.run(main, flags_parser=launch_utils.parse_flags_with_gin_shortcuts)
