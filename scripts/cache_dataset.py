"""Writes a cache of preprocessed examples (ArrayRecord) for runs where preprocessing is slow.

    python scripts/cache_dataset.py --mixture pali_synthetic_pretrain --split train \
        --num_examples 20000 --image_size 224 --inputs_length 32 --targets_length 32 \
        --out /path/cache

then train from it with the gin lines

    train.dataset_fn = @cached_dataset
    cached_dataset.cache_dir = '/path/cache'

The lengths, image size and images per example must be the run's (the reader checks them).
The examples' random augmentation is frozen: see pali.data.cache.write_cache. Write once,
from one process; every host of the run reads its own shard of the same folder.
"""
import argparse
import importlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mixture", required=True, help="a registered seqio task or mixture")
  p.add_argument("--split", default="train")
  p.add_argument("--num_examples", type=int, required=True)
  p.add_argument("--image_size", type=int, required=True)
  p.add_argument("--max_images", type=int, default=1)
  p.add_argument("--inputs_length", type=int, required=True)
  p.add_argument("--targets_length", type=int, required=True)
  p.add_argument("--seed", type=int, default=0, help="seed of the draw from get_dataset")
  p.add_argument("--num_shards_out", type=int, default=None,
                 help="ArrayRecord files (default: one per 10,000 examples)")
  p.add_argument("--resize_method", default=None, choices=[None, "resize", "pad"])
  p.add_argument("--module_import", action="append", default=[],
                 help="a module that registers your own tasks (repeatable)")
  p.add_argument("--out", required=True, help="the cache folder")
  args = p.parse_args()

  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import tasks  # noqa: F401  (registers the project's mixtures)
  for module in args.module_import:
    importlib.import_module(module)
  from pali.data import cache

  t0 = time.perf_counter()
  spec = cache.write_cache(
      args.mixture, args.out, split=args.split, num_examples=args.num_examples,
      task_feature_lengths={"inputs": args.inputs_length, "targets": args.targets_length},
      image_size=args.image_size, max_images=args.max_images, seed=args.seed,
      num_shards_out=args.num_shards_out, resize_method=args.resize_method)
  seconds = time.perf_counter() - t0
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in spec["files"])
  print(f"wrote {spec['num_examples']} examples of {args.mixture!r} ({args.split}) to "
        f"{args.out} in {len(spec['files'])} files, {size / 2**20:.1f} MiB, {seconds:.1f} s "
        f"({spec['num_examples'] / seconds:.0f} examples/s)")


if __name__ == "__main__":
  main()
