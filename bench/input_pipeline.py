"""Input pipeline throughput: examples/s of the synthetic mixture (and, with --per_task, of
each of its tasks) on this machine. A benchmark, not a test.

    python bench/input_pipeline.py --image_sizes 224 64 --json /tmp/input_pipeline.json

Per configuration: dataset construction time, time to the first batch (fills the shuffle
buffers), and steady-state examples/s over --batches batches after --warmup batches.
"""
import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def measure(name, image_size, batch_size, warmup, batches, lengths):
  from pali.data import pipeline
  t0 = time.perf_counter()
  ds = pipeline.get_dataset(name, split="train", task_feature_lengths=lengths,
                            batch_size=batch_size, image_size=image_size, max_images=1,
                            shuffle=True, seed=0)
  t1 = time.perf_counter()
  it = ds.as_numpy_iterator()
  next(it)
  t2 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  t3 = time.perf_counter()
  for _ in range(batches):
    next(it)
  t4 = time.perf_counter()
  del it
  return {"name": name, "image_size": image_size, "batch_size": batch_size,
          "build_s": round(t1 - t0, 2), "first_batch_s": round(t2 - t1, 2),
          "examples_per_s": round(batches * batch_size / (t4 - t3), 1)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mixture", default="pali_synthetic_pretrain")
  p.add_argument("--image_sizes", type=int, nargs="+", default=[224, 64])
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--inputs_length", type=int, default=128)
  p.add_argument("--targets_length", type=int, default=128)
  p.add_argument("--per_task", action="store_true", help="also time each task of the mixture")
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args()

  import seqio
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import tasks  # noqa: F401
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  names = [args.mixture]
  if args.per_task:
    names += [t.name for t in seqio.get_mixture_or_task(args.mixture).tasks]
  rows = []
  for size in args.image_sizes:
    for name in names:
      rows.append(measure(name, size, args.batch_size, args.warmup, args.batches, lengths))
      r = rows[-1]
      print(f"{r['name']:<34} {size:>5}px  build {r['build_s']:>6.2f}s  first batch "
            f"{r['first_batch_s']:>6.2f}s  {r['examples_per_s']:>8.1f} examples/s", flush=True)
  machine = {"platform": platform.platform(), "python": platform.python_version(),
             "cpus": os.cpu_count(), "tensorflow": tf.__version__,
             "load_average": os.getloadavg()}
  print("\n| task / mixture | image px | build s | first batch s | examples/s |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['image_size']} | {r['build_s']} | {r['first_batch_s']} | "
          f"{r['examples_per_s']} |")
  print(f"\nmachine: {machine}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": rows, "machine": machine, "args": vars(args)}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
