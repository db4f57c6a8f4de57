r"""The matmul ceilings of this machine: GFLOP/s of a jitted n^3 matmul per matmul dtype.

  python bench/matmul_peak.py [--sizes 2048 1024] [--json out.json]

Rows: 'float32' (f32 x f32 -> f32), 'mixed' (bf16 x bf16 accumulated and returned in f32,
what `matmul.precision = 'mixed'` runs) and 'bfloat16' (bf16 -> bf16). These are the peaks
MFU is measured against on CPU (pali.training.mfu.measure_cpu_peak_flops, best of 5), each
compiled with the train step's XLA options for its dtype (float32 on oneDNN on x86 CPUs:
pali/training/xla_options.py). On a CPU
with AMX (Intel Sapphire Rapids and later) XLA's YNNPACK kernels run 'mixed' several times
faster than float32, while bf16 -> bf16 is not faster at all: the mixed mode is what pays.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[2048])
  p.add_argument("--no_tcmalloc", action="store_true", help="keep the default allocator")
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def run(args) -> list[dict]:
  from pali.training import mfu
  rows = []
  for n in args.sizes:
    for dtype in mfu.MATMUL_DTYPES:
      rows.append({"n": n, "matmul_dtype": dtype,
                   "gflop_per_s": mfu.measure_cpu_peak_flops(dtype, n=n) / 1e9})
  return rows


def main(argv=None):
  args = parse_args(argv)
  common.prepare_process(args.no_tcmalloc)  # re-executes with tcmalloc where installed
  rows = run(args)
  machine = common.machine_info()
  print(common.format_table(rows, ["n", "matmul_dtype", "gflop_per_s"]))
  print(common.machine_line(machine))
  common.write_json(args.json, {"benchmark": "matmul_peak", "machine": machine, "results": rows})
  return rows


if __name__ == "__main__":
  main()
