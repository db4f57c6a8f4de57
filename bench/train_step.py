r"""Benchmarks one training step: median step time, examples/s, tokens/s, GFLOP/s and MFU.

  python bench/train_step.py                          # pali_small, 224 px, batch 8, float32
  python bench/train_step.py --dtype mixed --json /tmp/step_mixed.json
  python bench/train_step.py --config gin_configs/models/pali_tiny.gin --image_size 64

The step is the trainer's own (pali.training.step, sharded state, donated, jitted with the
trainer's shardings) on a random batch already on the device, so it measures compute only.
Compile time is reported apart. MFU uses pali.flops and pali.training.mfu's peak: on an
accelerator the data sheet's; on CPU a 2048^3 matmul in the run's matmul dtype timed after
every step, MFU being the median over steps of (step FLOP/s / that moment's peak), because
these CPUs drift by up to 15% within minutes.

--dtype: float32 (DTYPE float32), bfloat16 (DTYPE bfloat16: bf16 activations, float32
parameters) or mixed (DTYPE float32 and `matmul.precision = 'mixed'`: bf16 matmul operands
with float32 accumulation; activations, parameters and optimizer in float32).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="gin_configs/models/pali_small.gin", help="model gin file")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "mixed"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--max_images", type=int, default=1)
  p.add_argument("--input_len", type=int, default=32)
  p.add_argument("--target_len", type=int, default=32)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--gin_bindings", action="append", default=[], help="extra gin bindings")
  p.add_argument("--no_tcmalloc", action="store_true", help="keep the default allocator")
  p.add_argument("--profile", default=None, help="also trace 2 steps into this folder and "
                 "print where the time goes by XLA op kind (bench/profile_summary.py)")
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def random_batch(args, vocab_size: int):
  import numpy as np
  rng = np.random.default_rng(0)
  b, n, s = args.batch, args.max_images, args.image_size
  tokens = lambda length: rng.integers(3, vocab_size, (b, length)).astype(np.int32)  # noqa
  targets = tokens(args.target_len)
  return {
      "images": rng.integers(0, 256, (b, n, s, s, 3)).astype(np.uint8),
      "image_mask": np.ones((b, n), np.int32),
      "encoder_input_tokens": tokens(args.input_len),
      "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((b, args.target_len), np.float32),
  }


def compile_step(args):
  """The trainer's step for `args` (config, dtype, gin_bindings, batch shapes), jitted with its
  shardings and donated state, compiled: a namespace of compiled, state, batch, rng, model,
  host (the numpy batch), compile_s. Gin is cleared and re-parsed: compile one variant at a
  time (the model reads its gin bindings when traced)."""
  import time
  import types

  import flax.linen as nn
  import gin
  import jax

  from pali import partitioning
  from pali.models import pali as pali_model
  from pali.training import mfu
  from pali.training import optimizer as optimizer_lib
  from pali.training import step as step_lib
  from pali.training import train_state as train_state_lib
  from pali.training import xla_options

  gin.clear_config()
  config_path = args.config if os.path.isabs(args.config) else os.path.join(common.REPO_ROOT,
                                                                            args.config)
  bindings = [f"DTYPE = '{'bfloat16' if args.dtype == 'bfloat16' else 'float32'}'",
              f"matmul.precision = '{'mixed' if args.dtype == 'mixed' else 'default'}'"]
  gin.parse_config_files_and_bindings([config_path], bindings + list(args.gin_bindings))
  model = pali_model.build_model_for_image_size(args.image_size)
  mesh = partitioning.create_mesh()
  rules = partitioning.logical_axis_rules()
  host = random_batch(args, model.config.t5.vocab_size)
  schedule = optimizer_lib.learning_rate_schedule()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tx, _, shardings = train_state_lib.abstract_state(
        model, lambda p: optimizer_lib.create_optimizer(p, schedule=schedule), host, mesh, rules)
    state = train_state_lib.create_state(model, tx, host, shardings)
    batch = partitioning.host_batch_to_global(host, mesh, rules)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    repl = partitioning.replicated(mesh)
    rng = jax.device_put(jax.random.key(1), repl)
    step_fn = step_lib.make_train_step(model, tx, schedule)
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh, repl),
                     out_shardings=(shardings, repl), donate_argnums=(0,))
    t0 = time.perf_counter()
    # The trainer's XLA options for this step, and on top of them the XLA debug options of
    # this compile only (bench/ab_step.py's --xla_option; XLA_FLAGS would set them for the
    # whole process).
    extra = getattr(args, "xla_options", None) or {}
    options = {**xla_options.train_step_compiler_options(mfu.run_matmul_dtype(model.config)),
               **extra}
    lowered = jitted.lower(state, batch, rng)
    # Options asked for by name must hold: XLA's refusal is an error, not a fallback.
    compiled = (lowered.compile(compiler_options=options) if extra
                else xla_options.compile_lowered(lowered, options))
    compile_s = time.perf_counter() - t0
  return types.SimpleNamespace(compiled=compiled, state=state, batch=batch, rng=rng,
                               model=model, host=host, compile_s=compile_s,
                               xla_options=options)


def run(args) -> dict:
  import time

  import jax
  import numpy as np

  from pali import flops
  from pali.models import matmul
  from pali.models import pali as pali_model
  from pali.training import mfu

  built = compile_step(args)
  cfg, host, compile_s = built.model.config, built.host, built.compile_s
  compiled, state, batch, rng = built.compiled, built.state, built.batch, built.rng
  memory = compiled.memory_analysis()  # XLA's buffer plan: state, batch and temporaries

  losses = []

  def one_step():
    nonlocal state
    state, metrics = compiled(state, batch, rng)
    losses.append(float(metrics["loss"]))  # blocks until the step is done

  # On CPU each timed step is followed by a 2048^3 matmul in the run's dtype (best of 3): the
  # machine's speed drifts within minutes, so each step is set against the peak of its moment
  # and MFU is the median of those ratios.
  on_cpu = jax.devices()[0].platform == "cpu"
  matmul_dtype = mfu.run_matmul_dtype(cfg)
  peak_meter = mfu.cpu_matmul_meter(matmul_dtype) if on_cpu else None
  for _ in range(args.warmup):
    one_step()
  times, peaks, cpu_s = [], [], 0.0
  for _ in range(args.steps):
    cpu0, t0 = os.times(), time.perf_counter()
    one_step()
    times.append(time.perf_counter() - t0)
    cpu1 = os.times()
    # CPU seconds this process used per step: a load-independent proxy for the work done
    # when other jobs share the cores.
    cpu_s += (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    if peak_meter is not None:
      peaks.append(peak_meter(3))
  cpu_per_step = cpu_s / args.steps
  profile = profile_wall = None
  if args.profile:
    from bench import profile_summary
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      for _ in range(2):
        one_step()
    hlo = compiled.as_text()  # names the ops of the trace
    with open(os.path.join(args.profile, "step.hlo.txt"), "w") as fh:
      fh.write(hlo)  # for profile_summary.by_op
    profile = profile_summary.summarise(args.profile, steps=2)
    profile_wall = profile_summary.by_wall(args.profile, hlo, steps=2)

  shapes = flops.BatchShapes.from_batch(host)
  step_flops = flops.train_step_flops(cfg, shapes)
  med = common.median(times)
  if on_cpu:
    peak = common.median(peaks)
    step_mfu = common.median([step_flops / t / p for t, p in zip(times, peaks)])
  else:
    peak = mfu.peak_flops_per_device(matmul_dtype) * jax.device_count()
    step_mfu = step_flops / med / peak
  tokens = args.batch * (args.max_images * pali_model.num_image_tokens(cfg, args.image_size)
                         + args.input_len + args.target_len)
  return {
      "config": os.path.basename(args.config), "dtype": args.dtype,
      "matmul_precision": matmul.get_precision(), "batch": args.batch,
      "image_size": args.image_size, "input_len": args.input_len,
      "target_len": args.target_len, "gin_bindings": args.gin_bindings,
      "xla_options": built.xla_options,
      "steps": args.steps, "compile_s": compile_s,
      "median_step_s": med, "min_step_s": min(times), "step_times_s": times,
      "cpu_s_per_step": cpu_per_step,
      "examples_per_s": args.batch / med, "tokens_per_s": tokens / med,
      "gflop_per_step": step_flops / 1e9, "achieved_gflop_per_s": step_flops / med / 1e9,
      "peak_matmul_dtype": matmul_dtype, "peak_gflop_per_s": peak / 1e9,
      "mfu": step_mfu, "peak_gflop_per_s_each_step": [p / 1e9 for p in peaks],
      "loss_first": losses[0], "loss_last": losses[-1],
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "xla_argument_gib": getattr(memory, "argument_size_in_bytes", 0) / 2 ** 30,
      "xla_temp_gib": getattr(memory, "temp_size_in_bytes", 0) / 2 ** 30,
      "device_peak_gib": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
                         / 2 ** 30,
      **({"profile": profile, "profile_wall": profile_wall} if profile else {}),
  }


def main(argv=None):
  args = parse_args(argv)
  common.prepare_process(args.no_tcmalloc)  # re-executes with tcmalloc where installed
  row = run(args)
  machine = common.machine_info()
  row["load_average_after"] = machine["load_average_1_5_15min"]
  cols = ["config", "dtype", "batch", "compile_s", "median_step_s", "cpu_s_per_step",
          "examples_per_s",
          "tokens_per_s", "achieved_gflop_per_s", "peak_gflop_per_s", "mfu",
          "load_average_after"]
  print(common.format_table([row], cols))
  print(f"train step XLA options: {row['xla_options'] or 'defaults'}")
  if row.get("profile"):
    print(common.format_table(row["profile"], ["op", "ms_per_step", "share", "calls_per_step"]))
    wall = row["profile_wall"]
    print(common.format_table(wall["rows"], ["category", "ms_per_step", "share"]))
    print(f"wall time, traced: {wall['wall_ms_per_step']:.0f} ms a step; two or more dots at "
          f"once {wall['two_dots_ms_per_step']:.0f} ms; no op running "
          f"{wall['idle_ms_per_step']:.0f} ms")
  print(common.machine_line(machine))
  common.write_json(args.json, {"benchmark": "train_step", "machine": machine, "results": [row]})
  return row


if __name__ == "__main__":
  main()
