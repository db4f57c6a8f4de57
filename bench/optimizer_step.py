r"""The optimizer half of the training step, timed: pali.training.adafactor (optax's chain in one
pass per parameter) against optax's own chain, in alternating rounds in one process.

  python bench/optimizer_step.py                       # pali_small, 224 px
  python bench/optimizer_step.py --rounds 6 --json opt.json

Each variant jits `step.apply_gradients` (global norm, update, apply, the non-finite guard) plus
the parameter norm the step logs, with the state donated, as the train step runs it, on the
model's real parameter shapes and random gradients. Both variants keep the same state tree and,
fed the same gradients, end at the same parameters (`max_param_diff_vs_first`).
`optax_chain` is what create_optimizer ran before (global-norm clip, then `optax.adafactor`);
the step itself carries this difference (BENCHMARKS.md, "Training step").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="gin_configs/models/pali_small.gin")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps_per_round", type=int, default=5)
  p.add_argument("--no_tcmalloc", action="store_true")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def _parameters(args):
  """The model's parameter tree (random values of its shapes) and a schedule."""
  import gin
  import jax

  from bench import train_step
  from pali.models import pali as pali_model
  from pali.training import optimizer
  from pali.training import train_state

  gin.clear_config()
  path = args.config if os.path.isabs(args.config) else os.path.join(common.REPO_ROOT,
                                                                     args.config)
  gin.parse_config_files_and_bindings([path], [])
  model = pali_model.build_model_for_image_size(args.image_size)
  batch_args = train_step.parse_args(["--image_size", str(args.image_size), "--batch", "1"])
  batch = train_step.random_batch(batch_args, model.config.t5.vocab_size)
  shapes = train_state.unbox_abstract(jax.eval_shape(
      lambda rng: model.init({"params": rng, "dropout": rng}, batch, train=False)["params"],
      jax.random.key(0)))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(shapes))))
  params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype),
                        shapes)
  return params, optimizer.learning_rate_schedule()


def variants(params, schedule) -> dict:
  from pali.training import adafactor
  from pali.training import optimizer
  return {"one_pass": optimizer.create_optimizer(params, name="adafactor", schedule=schedule),
          "optax_chain": adafactor.reference_chain(schedule, clip_grad_norm=1.0)}


def run(args) -> list[dict]:
  import jax
  import optax

  from pali.training import step as step_lib
  from pali.training import xla_options
  from pali.training.train_state import TrainState

  params, schedule = _parameters(args)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape, p.dtype) * 1e-3,
                       params)
  runs = {}
  for name, tx in variants(params, schedule).items():

    def post(state, grads, tx=tx):
      new_state, grad_norm, _ = step_lib.apply_gradients(state, grads, tx)
      return new_state, (grad_norm, optax.global_norm(state.params))

    state = TrainState(step=jax.numpy.zeros([], jax.numpy.int32),
                       params=jax.tree.map(lambda p: p.copy(), params), opt_state=tx.init(params))
    t0 = time.perf_counter()
    # With the train step's XLA options (a mixed step's: the optimizer has no dots to place).
    compiled = xla_options.compile_lowered(jax.jit(post, donate_argnums=(0,)).lower(state, grads),
                                           xla_options.train_step_compiler_options("mixed"))
    runs[name] = {"compiled": compiled, "state": state, "times": [],
                  "compile_s": time.perf_counter() - t0}
  for _ in range(args.rounds):
    for r in runs.values():
      for _ in range(args.steps_per_round):
        t0 = time.perf_counter()
        r["state"], out = r["compiled"](r["state"], grads)
        jax.block_until_ready((r["state"], out))
        r["times"].append(time.perf_counter() - t0)
  # Same start, same gradients, same number of updates: the variants must agree.
  first = jax.tree.leaves(next(iter(runs.values()))["state"].params)
  rows = []
  for name, r in runs.items():
    end = jax.tree.leaves(r["state"].params)
    diff = max(float(jax.numpy.max(jax.numpy.abs(a - b))) for a, b in zip(end, first))
    moved = max(float(jax.numpy.max(jax.numpy.abs(a - b)))
                for a, b in zip(end, jax.tree.leaves(params)))
    times = r["times"][1:]  # the first call pays for fresh allocations
    rows.append({"variant": name, "median_ms": 1e3 * common.median(times),
                 "min_ms": 1e3 * min(times), "calls": len(times),
                 "compile_s": r["compile_s"], "max_param_diff_vs_first": diff,
                 "max_param_change": moved})
  for row in rows:
    row["vs_first"] = row["median_ms"] / rows[0]["median_ms"]
  return rows


def main(argv=None):
  args = parse_args(argv)
  common.prepare_process(args.no_tcmalloc)
  common.ensure_repo_on_path()
  rows = run(args)
  import jax  # noqa: F401  (machine_info reads the devices)
  machine = common.machine_info()
  print(common.format_table(rows, ["variant", "median_ms", "min_ms", "vs_first", "calls",
                                   "compile_s", "max_param_change", "max_param_diff_vs_first"]))
  print(common.machine_line(machine))
  common.write_json(args.json, {"machine": machine, "args": vars(args), "rows": rows})


if __name__ == "__main__":
  main()
