r"""Kills a training run with SIGKILL at random steps, resumes it, and checks nothing was lost.

  python launch/fault_injection.py --gin_file=gin_configs/runs/quickstart_cpu.gin \
      --steps=40 --checkpoint_every=5 --kills=3 --workdir=/tmp/faults --json=faults.json

Runs the config once without interruption, then again with `--kills` SIGKILLs at random steps,
restarting after each. Reports, per kill: the step it was killed at, the newest complete
checkpoint on disk at that moment, the step the restart resumed from, and the steps lost beyond
that checkpoint (must be 0); finally whether the final parameters are bit-identical.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

_STEP_LINE = re.compile(r"\] step (\d+)/(\d+) ")
_RESUME_LINE = re.compile(r"Resuming from checkpoint step (\d+)")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(gin_files, bindings, model_dir, steps, checkpoint_every):
  cmd = [sys.executable, os.path.join(_ROOT, "launch", "tpu_train.py")]
  cmd += [f"--gin_file={g}" for g in gin_files]
  cmd += [f"--gin_bindings={b}" for b in bindings]
  cmd += [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
          f"--gin.train.checkpoint_every={checkpoint_every}", "--gin.train.log_every=1"]
  return cmd


def _env():
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
  env["PYTHONUNBUFFERED"] = "1"
  return env


def finished_checkpoints(model_dir: str) -> list[int]:
  path = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def run_to_end(cmd, log_path) -> int:
  with open(log_path, "a") as log:
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                          cwd=_ROOT).returncode


def run_and_kill_at(cmd, kill_step: int, log_path) -> tuple[int | None, int | None]:
  """Starts the run, SIGKILLs it once it logs `kill_step`; returns (resumed_from, killed_at)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                          cwd=_ROOT, text=True)
  resumed = killed_at = None
  with open(log_path, "a") as log:
    for line in proc.stdout:
      log.write(line)
      if m := _RESUME_LINE.search(line):
        resumed = int(m.group(1))
      if (m := _STEP_LINE.search(line)) and int(m.group(1)) >= kill_step:
        killed_at = int(m.group(1))
        proc.send_signal(signal.SIGKILL)
        break
  proc.wait()
  return resumed, killed_at


def read_params(model_dir: str, step: int):
  import numpy as np
  import orbax.checkpoint as ocp
  path = os.path.join(model_dir, "checkpoints", str(step), "state")
  meta = ocp.PyTreeCheckpointer().metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  import jax
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(item=args, restore_args=args))["params"]


def params_equal(a, b) -> bool:
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b))
  return bool(leaves) and all(leaves)


def inject_faults(gin_files, bindings=(), *, steps: int, checkpoint_every: int, kills: int,
                  workdir: str, seed: int = 0) -> dict:
  rng = random.Random(seed)
  straight, faulty = os.path.join(workdir, "straight"), os.path.join(workdir, "killed")
  log = os.path.join(workdir, "log.txt")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  rc = run_to_end(_command(gin_files, bindings, straight, steps, checkpoint_every), log)
  if rc != 0:
    raise RuntimeError(f"The uninterrupted run failed (exit {rc}); see {log}.")
  kill_steps = sorted(rng.sample(range(2, steps), k=min(kills, steps - 2)))
  events, pending_resume = [], None
  for k in kill_steps:
    on_disk = finished_checkpoints(faulty)
    resumed, killed_at = run_and_kill_at(
        _command(gin_files, bindings, faulty, steps, checkpoint_every), k, log)
    if pending_resume is not None:
      pending_resume["resumed_from"] = resumed or 0
      pending_resume["steps_lost_beyond_checkpoint"] = (
          pending_resume["newest_checkpoint"] - (resumed or 0))
    newest = max(finished_checkpoints(faulty), default=0)
    pending_resume = {"killed_at_step": killed_at, "newest_checkpoint": newest,
                      "checkpoints_before_start": on_disk}
    events.append(pending_resume)
  # The last restart runs to the end.
  proc_cmd = _command(gin_files, bindings, faulty, steps, checkpoint_every)
  proc = subprocess.run(proc_cmd, capture_output=True, text=True, env=_env(), cwd=_ROOT)
  with open(log, "a") as fh:
    fh.write(proc.stdout + proc.stderr)
  m = _RESUME_LINE.search(proc.stdout + proc.stderr)
  if pending_resume is not None:
    pending_resume["resumed_from"] = int(m.group(1)) if m else 0
    pending_resume["steps_lost_beyond_checkpoint"] = (
        pending_resume["newest_checkpoint"] - pending_resume["resumed_from"])
  if proc.returncode != 0:
    raise RuntimeError(f"The resumed run failed (exit {proc.returncode}); see {log}.")
  equal = params_equal(read_params(straight, steps), read_params(faulty, steps))
  leftovers = [d for d in os.listdir(os.path.join(faulty, "checkpoints")) if "tmp" in d]
  return {"steps": steps, "checkpoint_every": checkpoint_every, "kills": events,
          "steps_lost_beyond_checkpoint": sum(e["steps_lost_beyond_checkpoint"] for e in events),
          "final_params_bit_identical": equal, "partial_checkpoints_left": leftovers,
          "wall_seconds": round(time.time() - t0, 1)}


def _print_table(report: dict) -> None:
  print(f"{'kill':>4} {'killed at':>9} {'newest ckpt':>11} {'resumed from':>12} {'lost':>4}")
  for i, e in enumerate(report["kills"]):
    print(f"{i:>4} {e['killed_at_step']!s:>9} {e['newest_checkpoint']:>11} "
          f"{e['resumed_from']:>12} {e['steps_lost_beyond_checkpoint']:>4}")
  print(f"steps lost beyond the last checkpoint: {report['steps_lost_beyond_checkpoint']}")
  print(f"final parameters bit-identical to the uninterrupted run: "
        f"{report['final_params_bit_identical']}")


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--checkpoint_every", type=int, default=5)
  p.add_argument("--kills", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="/tmp/pali_faults")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  report = inject_faults(a.gin_file, a.gin_bindings, steps=a.steps,
                         checkpoint_every=a.checkpoint_every, kills=a.kills,
                         workdir=a.workdir, seed=a.seed)
  _print_table(report)
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(report, fh, indent=2)
  ok = report["final_params_bit_identical"] and report["steps_lost_beyond_checkpoint"] == 0
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
