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
