"""Two processes x 4 CPU devices (jax.distributed) train like one process with 8 devices.

Starts `launch/tpu_train.py` twice per run (process 0 and 1, coordinator on 127.0.0.1), each
reading its own shard of the batch; trains 2 steps (checkpoint), then resumes across both
processes to step 4. The losses of all steps and the step-4 parameters must match an
in-process 8-device run of the same gin configuration.
"""
import glob
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from tests import multihost_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150


def _launch_two_processes(gin_file: str, log_dir) -> None:
  port = portpicker.pick_unused_port()
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO,
             # The resumed launch compiles the same step: take it from the persistent cache.
             JAX_COMPILATION_CACHE_DIR=os.path.join(log_dir, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  procs, logs = [], []
  for pid in range(2):
    name = f"{os.path.basename(gin_file)}.process_{pid}.log"
    log = open(os.path.join(log_dir, name), "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "tpu_train.py"), f"--gin_file={gin_file}",
         "--module_import=tests.multihost_task", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={pid}", "--alsologtostderr"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  tails = []
  for pid, log in enumerate(logs):
    log.seek(0)
    tails.append(f"--- process {pid} ---\n" + log.read()[-3000:])
    log.close()
  if codes != [0, 0]:
    pytest.fail(f"multi-process training failed (exit codes {codes}):\n" + "\n".join(tails))


def _losses_by_step(model_dir) -> dict[int, list[float]]:
  """Every 'loss' scalar process 0 wrote to TensorBoard, per step (all event files)."""
  import tensorflow as tf
  from tensorboard.util import tensor_util

  out: dict[int, list[float]] = {}
  for path in sorted(glob.glob(os.path.join(str(model_dir), "train", "events.out.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":
          out.setdefault(event.step, []).append(float(tensor_util.make_ndarray(value.tensor)))
  return out


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
  import gin

  from pali import checkpoints, partitioning
  from pali.training import trainer

  multi_dir = tmp_path / "multi"
  os.makedirs(multi_dir)
  for steps in (2, 4):  # the second launch restores step 2 across both processes
    gin_file = tmp_path / f"multihost_{steps}.gin"
    gin_file.write_text(multihost_task.gin_config(str(multi_dir), steps))
    _launch_two_processes(str(gin_file), str(tmp_path))
  ckpt_dir = multi_dir / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4]

  # Reference: one process, the same 8 devices' worth of mesh, same gin text, 4 steps.
  gin.parse_config(multihost_task.gin_config(str(tmp_path / "single"), 4, checkpoint_every=4))
  ref = trainer.train()
  assert ref.step == 4

  multi_losses, ref_losses = _losses_by_step(multi_dir), _losses_by_step(tmp_path / "single")
  # Each step logged exactly once: the resumed run really started from the restored step 2.
  assert sorted(multi_losses) == [1, 2, 3, 4], multi_losses
  assert all(len(v) == 1 for v in multi_losses.values()), multi_losses
  for step in (1, 2, 3, 4):
    # Tolerance: the same float32 math; only the collectives (gloo across processes vs
    # in-process) may add in another order.
    np.testing.assert_allclose(multi_losses[step][0], ref_losses[step][0], rtol=1e-5)

  ref_params = jax.device_get(ref.state.params)
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), ref.state.params)
  with jax.set_mesh(partitioning.create_mesh(data=2, fsdp=2, tensor=2)):
    restored = jax.device_get(checkpoints.restore_params(str(ckpt_dir), 4, abstract))
  # Parameters are ~0.1-1 in size; 1e-5 absolute after 4 Adafactor steps allows reordered sums.
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                    err_msg=jax.tree_util.keystr(path)),
      ref_params, restored)
  # And they did move: the comparison is not between two initialisations.
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a: float(np.abs(a).sum()), ref_params))
  assert sum(moved) > 0
