r"""Runs training stages one after the other, each from the previous stage's checkpoint.

  python launch/run_stages.py --ladder=cpu          # the small CPU ladder, 32 -> 80 px
  python launch/run_stages.py \
      --stage=gin_configs/stages/stage1_224.gin --stage=gin_configs/stages/stage2_448.gin \
      --gin_file=gin_configs/models/palix_55b.gin --gin.RUN_ROOT="'gs://bucket/palix'"

Each stage is one `launch/tpu_train.py` process (on a pod, run the per-stage commands of the
README instead). Stage files name their MODEL_DIR and INIT_FROM (gin_configs/stages/).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_LADDER = sorted(glob.glob(os.path.join(_ROOT, "gin_configs/stages/cpu_ladder/stage*.gin")),
                    key=lambda p: int(os.path.basename(p)[5]))


def run_stage_in_process(stage_file: str, gin_files=(), bindings=()):
  """Parses one stage's gin (after `gin_files`) and trains it here; returns the TrainResult."""
  import gin

  from launch import launch_utils
  from pali.training import trainer

  gin.clear_config()
  launch_utils.parse_gin(list(gin_files) + [stage_file], bindings)
  result = trainer.train()
  gin.clear_config()
  return result


def main(argv=None) -> int:
  from launch.launch_utils import rewrite_gin_shortcuts
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--ladder", choices=["cpu"], help="Run the built-in CPU ladder.")
  p.add_argument("--stage", action="append", default=[], help="Stage gin files, in order.")
  p.add_argument("--gin_file", action="append", default=[], help="Gin files before each stage.")
  p.add_argument("--gin_bindings", action="append", default=[])
  a = p.parse_args(rewrite_gin_shortcuts(list(sys.argv[1:] if argv is None else argv)))
  stages = CPU_LADDER if a.ladder == "cpu" else a.stage
  if not stages:
    p.error("give --ladder=cpu or at least one --stage")
  for stage in stages:
    cmd = [sys.executable, os.path.join(_ROOT, "launch", "tpu_train.py")]
    cmd += [f"--gin_file={g}" for g in a.gin_file + [stage]]
    cmd += [f"--gin_bindings={b}" for b in a.gin_bindings]
    print(f"=== {os.path.relpath(stage, _ROOT)}", flush=True)
    rc = subprocess.run(cmd, cwd=_ROOT).returncode
    if rc:
      print(f"Stage {stage} failed (exit {rc}); later stages not started.", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.path.insert(0, _ROOT)
  sys.exit(main())
