"""bench/ab_step.py's variant syntax (the benchmark itself runs by hand: BENCHMARKS.md)."""
import argparse

import pytest

from bench import ab_step


def test_variant_takes_name_dtype_and_bindings():
  assert ab_step.parse_variant("f32:float32") == {"name": "f32", "dtype": "float32",
                                                  "gin_bindings": []}
  v = ab_step.parse_variant("split:mixed:matmul.split_weights = 'forward'; "
                            "matmul.custom_backward = True")
  assert v == {"name": "split", "dtype": "mixed",
               "gin_bindings": ["matmul.split_weights = 'forward'",
                                "matmul.custom_backward = True"]}


@pytest.mark.parametrize("spec", ["f32", "f32:float16", ":mixed"])
def test_bad_variant_is_refused_with_the_syntax(spec):
  with pytest.raises(argparse.ArgumentTypeError, match="NAME:DTYPE"):
    ab_step.parse_variant(spec)


def test_variant_names_must_differ():
  with pytest.raises(SystemExit):
    ab_step.parse_args(["--variant", "a:float32", "--variant", "a:mixed"])


def test_xla_option_reads_bools_ints_and_enum_names():
  assert ab_step.parse_xla_option("a:xla_cpu_multi_thread_eigen=false") == (
      "a", "xla_cpu_multi_thread_eigen", False)
  assert ab_step.parse_xla_option("b:xla_cpu_parallel_codegen_split_count=8") == (
      "b", "xla_cpu_parallel_codegen_split_count", 8)
  assert ab_step.parse_xla_option(
      "conc:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED") == (
      "conc", "xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED")
  for bad in ("a", "a:key", ":key=1", "a:=1", "a:key="):
    with pytest.raises(argparse.ArgumentTypeError, match="NAME:KEY=VALUE"):
      ab_step.parse_xla_option(bad)


def test_xla_options_go_to_their_variant_only():
  args = ab_step.parse_args(["--variant", "base:float32", "--variant", "conc:float32",
                             "--xla_option", "conc:xla_cpu_multi_thread_eigen=false"])
  assert [v["xla_options"] for v in args.variant] == [
      {}, {"xla_cpu_multi_thread_eigen": False}]
  with pytest.raises(SystemExit):  # no such variant
    ab_step.parse_args(["--variant", "base:float32", "--xla_option", "other:k=1"])


def test_compile_step_hands_the_xla_options_to_the_compiler():
  # An option XLA cannot read fails the compile: the options reach it.
  import jax

  from bench import train_step
  args = train_step.parse_args(["--config", "gin_configs/models/pali_tiny.gin",
                                "--image_size", "64", "--batch", "8", "--input_len", "8",
                                "--target_len", "8"])
  args.xla_options = {"xla_cpu_multi_thread_eigen": "not-a-bool"}
  with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_multi_thread_eigen"):
    train_step.compile_step(args)
