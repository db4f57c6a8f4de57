r"""Compares training-step variants in one process, timed in alternating rounds.

  python bench/ab_step.py --variant f32:float32 --variant mixed:mixed \
      --variant "split:mixed:matmul.split_weights = 'forward'"

A variant is NAME:DTYPE[:BINDING[;BINDING...]] (DTYPE as bench/train_step.py's --dtype, then
extra gin bindings). Each variant's step (bench/train_step.compile_step: the trainer's step,
sharded, donated) is compiled once; then every round runs `--steps_per_round` steps of each
variant in turn. On a machine whose speed drifts (the 2-core CPUs of BENCHMARKS.md drift by up
to 15% within the hour), separate processes minutes apart can't resolve a 5% change; rounds
interleaved within one process can. The first variant is the baseline of the `vs_first`
column. Gin bindings and XLA options can differ: to compare code, add a temporary gin switch
(or run this once per commit).

`--xla_option NAME:KEY=VALUE` (repeatable) compiles variant NAME with that XLA debug option,
e.g. "conc:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED": the options
XLA_FLAGS sets for a whole process, here per variant in the same process.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench import train_step  # noqa: E402


def parse_variant(spec: str) -> dict:
  name, sep, rest = spec.partition(":")
  dtype, _, bindings = rest.partition(":")
  if not sep or not name or dtype not in ("float32", "bfloat16", "mixed"):
    raise argparse.ArgumentTypeError(f"{spec!r}: use NAME:DTYPE[:BINDING;...] with DTYPE float32, "
                     "bfloat16 or mixed.")
  return {"name": name, "dtype": dtype,
          "gin_bindings": [b.strip() for b in bindings.split(";") if b.strip()]}


def parse_xla_option(spec: str) -> tuple[str, str, object]:
  """'NAME:KEY=VALUE' -> (NAME, KEY, VALUE), VALUE a bool or int where it reads as one
  (XLA refuses 'false' for a bool option), else the string (enum names)."""
  name, sep, rest = spec.partition(":")
  key, eq, value = rest.partition("=")
  if not (sep and eq and name and key.strip() and value.strip()):
    raise argparse.ArgumentTypeError(f"{spec!r}: use NAME:KEY=VALUE, NAME a variant's name.")
  value = value.strip()
  if value.lower() in ("true", "false"):
    return name, key.strip(), value.lower() == "true"
  try:
    return name, key.strip(), int(value)
  except ValueError:
    return name, key.strip(), value


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", action="append", required=True, type=parse_variant,
                 help="NAME:DTYPE[:BINDING;...]; give two or more")
  p.add_argument("--config", default="gin_configs/models/pali_small.gin", help="model gin file")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--max_images", type=int, default=1)
  p.add_argument("--input_len", type=int, default=32)
  p.add_argument("--target_len", type=int, default=32)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps_per_round", type=int, default=2)
  p.add_argument("--no_tcmalloc", action="store_true", help="keep the default allocator")
  p.add_argument("--xla_option", action="append", default=[], type=parse_xla_option,
                 help="NAME:KEY=VALUE, an XLA debug option for variant NAME's compile")
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  names = [v["name"] for v in args.variant]
  if len(set(names)) != len(names):
    p.error("variant names must differ")
  for v in args.variant:
    v["xla_options"] = {}
  for name, key, value in args.xla_option:
    if name not in names:
      p.error(f"--xla_option {name}:{key}: no variant is named {name!r} (variants: {names})")
    args.variant[names.index(name)]["xla_options"][key] = value
  return args


def run(args) -> list[dict]:
  import time

  built = []
  for v in args.variant:
    vargs = argparse.Namespace(**{**vars(args), "dtype": v["dtype"],
                                  "gin_bindings": v["gin_bindings"],
                                  "xla_options": v["xla_options"]})
    built.append(train_step.compile_step(vargs))
  times = [[] for _ in built]
  losses = [[] for _ in built]
  for b, loss in zip(built, losses):  # one untimed step each: first-run allocations
    b.state, metrics = b.compiled(b.state, b.batch, b.rng)
    loss.append(float(metrics["loss"]))
  for _ in range(args.rounds):
    for b, t, loss in zip(built, times, losses):
      for _ in range(args.steps_per_round):
        t0 = time.perf_counter()
        b.state, metrics = b.compiled(b.state, b.batch, b.rng)
        loss.append(float(metrics["loss"]))  # blocks until the step is done
        t.append(time.perf_counter() - t0)
  base = common.median(times[0])
  return [{"variant": v["name"], "dtype": v["dtype"], "gin_bindings": v["gin_bindings"],
           "xla_options": b.xla_options,
           "compile_s": b.compile_s, "median_step_s": common.median(t), "min_step_s": min(t),
           "steps": len(t), "vs_first": common.median(t) / base, "step_times_s": t,
           "loss_first": loss[0], "loss_last": loss[-1]}
          for v, b, t, loss in zip(args.variant, built, times, losses)]


def main(argv=None):
  args = parse_args(argv)
  common.prepare_process(args.no_tcmalloc)  # re-executes with tcmalloc where installed
  rows = run(args)
  print(common.format_table(rows, ["variant", "dtype", "gin_bindings", "xla_options",
                                   "median_step_s", "min_step_s", "steps", "vs_first",
                                   "loss_first", "loss_last"]))
  machine = common.machine_info()
  print(common.machine_line(machine))
  common.write_json(args.json, {"benchmark": "ab_step", "machine": machine,
                                "config": args.config, "batch": args.batch, "results": rows})
  return rows


if __name__ == "__main__":
  main()
