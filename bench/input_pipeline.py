"""Input pipeline throughput: examples/s of the synthetic mixture (and, with --per_task, of
each of its tasks) on this machine. A benchmark, not a test.

    python bench/input_pipeline.py --image_sizes 224 64 --json /tmp/input_pipeline.json
    python bench/input_pipeline.py --image_sizes 224 --cache_dir /tmp/cache --cache_examples 2000

Per configuration: dataset construction time, time to the first batch (fills the shuffle
buffers), and steady-state examples/s over --batches batches after --warmup batches.
--cache_dir also times reading a cache of preprocessed examples (pali.data.cache) through
`cached_dataset`, beside the tf.data pipeline; a missing cache is first written there with
--cache_examples examples (and the write is timed).
"""
import argparse
import functools
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def measure(name, image_size, batch_size, warmup, batches, lengths, cache_dir=None):
  from pali.data import cache, pipeline
  make = pipeline.get_dataset
  if cache_dir:
    make = functools.partial(cache.cached_dataset, cache_dir=cache_dir)
  t0 = time.perf_counter()
  ds = make(name, split="train", task_feature_lengths=lengths, batch_size=batch_size,
            image_size=image_size, max_images=1, shuffle=True, seed=0)
  t1 = time.perf_counter()
  it = ds.as_numpy_iterator()
  next(it)
  t2 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  t3, c3 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  t4, c4 = time.perf_counter(), time.process_time()
  del it
  return {"name": name, "source": "cache" if cache_dir else "tf.data",
          "image_size": image_size, "batch_size": batch_size,
          "build_s": round(t1 - t0, 2), "first_batch_s": round(t2 - t1, 2),
          "examples_per_s": round(batches * batch_size / (t4 - t3), 1),
          # CPU time of the whole process (all threads) per example: on a shared machine
          # this, not examples/s, is what compares sources.
          "cpu_ms_per_example": round(1000 * (c4 - c3) / (batches * batch_size), 2)}


def _print(r):
  print(f"{r['name']:<34} {r['source']:<8} {r['image_size']:>5}px  build {r['build_s']:>6.2f}s  "
        f"first batch {r['first_batch_s']:>6.2f}s  {r['examples_per_s']:>8.1f} examples/s  "
        f"{r['cpu_ms_per_example']:>6.2f} CPU ms/example",
        flush=True)


def _ensure_cache(name, cache_dir, image_size, lengths, num_examples):
  """Writes the cache if it is missing; returns [timing of the write] or []."""
  from pali.data import cache
  if os.path.exists(os.path.join(cache_dir, "train.spec.json")):
    return []
  t0 = time.perf_counter()
  spec = cache.write_cache(name, cache_dir, split="train", num_examples=num_examples,
                           task_feature_lengths=lengths, image_size=image_size)
  seconds = time.perf_counter() - t0
  mib = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in spec["files"]) / 2**20
  return [{"image_size": image_size, "num_examples": num_examples, "seconds": round(seconds, 1),
           "examples_per_s": round(num_examples / seconds, 1), "mib": round(mib, 1)}]


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
  p.add_argument("--cache_dir", default=None,
                 help="also read a cache here (per image size: DIR/<mixture>_<size>px)")
  p.add_argument("--cache_examples", type=int, default=2000,
                 help="examples to write when the cache is missing")
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
  rows, writes = [], []
  for size in args.image_sizes:
    for name in names:
      rows.append(measure(name, size, args.batch_size, args.warmup, args.batches, lengths))
      _print(rows[-1])
    if args.cache_dir:
      cache_dir = os.path.join(args.cache_dir, f"{args.mixture}_{size}px")
      writes += _ensure_cache(args.mixture, cache_dir, size, lengths, args.cache_examples)
      rows.append(measure(args.mixture, size, args.batch_size, args.warmup, args.batches,
                          lengths, cache_dir=cache_dir))
      _print(rows[-1])
  machine = {"platform": platform.platform(), "python": platform.python_version(),
             "cpus": os.cpu_count(), "tensorflow": tf.__version__,
             "load_average": os.getloadavg()}
  print("\n| task / mixture | source | image px | build s | first batch s | examples/s | "
        "CPU ms/example |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['source']} | {r['image_size']} | {r['build_s']} | "
          f"{r['first_batch_s']} | {r['examples_per_s']} | {r['cpu_ms_per_example']} |")
  for w in writes:
    print(f"cache write: {w['num_examples']} examples at {w['image_size']} px in {w['seconds']} s "
          f"({w['examples_per_s']} examples/s), {w['mib']} MiB")
  print(f"\nmachine: {machine}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": rows, "cache_writes": writes, "machine": machine,
                 "args": vars(args)}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
