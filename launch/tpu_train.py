r"""Trains a PaLI model from gin files, on one CPU or on a TPU/GPU pod.

  python launch/tpu_train.py --gin_file=gin_configs/runs/quickstart_cpu.gin \
      --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=100

Several hosts: run the same command on every host. On TPU pods `jax.distributed` finds its peers
by itself (`--multihost`); elsewhere pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""
from __future__ import annotations

import os
import sys

# Make the repository importable when run as a script, before anything else.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launch_utils  # noqa: E402

launch_utils.set_process_environment()

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
launch_utils.define_common_flags()


def main(argv):
  del argv
  launch_utils.quiet_library_logs()
  launch_utils.maybe_initialize_distributed()
  from pali.training import trainer

  try:
    launch_utils.import_modules_and_parse_gin()
    result = trainer.train()
  except launch_utils.user_errors() as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    launch_utils.exit_now(2)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    launch_utils.exit_now(3)
  logging.info("Training finished at step %d%s.", result.step,
               " (preempted)" if result.preempted else "")
  launch_utils.exit_now(0)


if __name__ == "__main__":
  app.run(main, flags_parser=launch_utils.parse_flags_with_gin_shortcuts)
