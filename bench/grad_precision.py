r"""How far each matmul precision moves the gradient from float32's, on a benchmark shape.

  python bench/grad_precision.py                       # pali_small, 224 px, batch 8
  python bench/grad_precision.py --config gin_configs/models/pali_tiny.gin --image_size 64
  python bench/grad_precision.py --mixture pali_synthetic_pretrain \
      --checkpoint runs/x --modes mixed               # along a training run

One batch and one set of float32 parameters. The batch: random tokens and pixels, or with
`--mixture` a batch of a registered task or mixture (the first in unshuffled order, or
`--mixture_batch`). The parameters: a fresh initialisation, or with `--checkpoint` those of a
training checkpoint, so that the gap can be read along a run (at initialisation it is about
twice what it is after a hundred steps; BENCHMARKS.md). For each mode: the whole gradient's
relative L2 distance to the float32 gradient (`rel_l2`), its cosine, and the relative L2 of the
ViT, encoder and decoder parts. Modes are gin bindings of pali/models/matmul.py: 'mixed' (bf16
operands, float32 accumulation) and the same with the weights as bf16 hi + lo pairs in the
forward product ('split forward') or also in the input gradient ('split both').
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

def _split(where: str, layers: tuple[str, ...]) -> list[str]:
  return ["matmul.precision = 'mixed'", f"matmul.split_weights = '{where}'",
          f"matmul.split_layers = {layers!r}"]


MODES = {
    "float32": ["matmul.precision = 'default'"],
    "mixed": ["matmul.precision = 'mixed'"],
    "mixed, split forward": ["matmul.precision = 'mixed'", "matmul.split_weights = 'forward'"],
    "mixed, split both": ["matmul.precision = 'mixed'", "matmul.split_weights = 'both'"],
    # Split only the named dense layers (those that write to the residual stream, or some).
    "mixed, split out/wo": _split("forward", ("out", "wo")),
    "mixed, split value/out/wo": _split("forward", ("value", "out", "wo")),
    "mixed, split both value/out/wo": _split("both", ("value", "out", "wo")),
    "mixed, split wo": _split("forward", ("wo",)),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="gin_configs/models/pali_small.gin")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--input_len", type=int, default=32)
  p.add_argument("--target_len", type=int, default=32)
  p.add_argument("--mixture", default=None,
                 help="take a batch of this task or mixture instead of a random one")
  p.add_argument("--mixture_batch", type=int, default=0,
                 help="which batch of --mixture, counting from 0 (unshuffled order)")
  p.add_argument("--checkpoint", default=None, help="the parameters of this training checkpoint "
                 "(MODEL_DIR, its checkpoints/ or one step folder) instead of a fresh init")
  p.add_argument("--modes", nargs="+", default=None, choices=[m for m in MODES if m != "float32"],
                 help="only these modes (default: all)")
  p.add_argument("--json", default=None, help="write the results here")
  p.set_defaults(max_images=1)
  return p.parse_args(argv)


def _rel(a, b) -> float:
  import numpy as np
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _mixture_batch(args) -> dict:
  """Batch `args.mixture_batch` (unshuffled order) of `args.mixture` at the benchmark's
  shapes."""
  from pali.data import pipeline
  ds = pipeline.get_dataset(
      args.mixture, split="train", batch_size=args.batch, image_size=args.image_size,
      task_feature_lengths={"inputs": args.input_len, "targets": args.target_len},
      max_images=args.max_images, shuffle=False, seed=0, prefetch=False)
  return next(ds.skip(args.mixture_batch).as_numpy_iterator())


def _checkpoint_params(path: str, abstract):
  """The float32 parameters of the training checkpoint at `path`, on this process's device."""
  import jax
  import jax.numpy as jnp

  from pali import checkpoints, warm_start
  from pali.training import train_state
  directory, step = warm_start.find_checkpoint(path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          train_state.unbox_abstract(abstract))
  params = checkpoints.restore_params(directory, step, abstract)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def run(args) -> list[dict]:
  import gin
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench import train_step
  from pali.models import pali as pali_model
  from pali.training import losses

  gin.clear_config()
  gin.parse_config_files_and_bindings([os.path.join(common.REPO_ROOT, args.config)],
                                      ["DTYPE = 'float32'"], finalize_config=False)
  model = pali_model.build_model_for_image_size(args.image_size)
  batch = (_mixture_batch(args) if args.mixture
           else train_step.random_batch(args, model.config.t5.vocab_size))
  init = lambda r: model.init(r, batch)["params"]  # noqa: E731
  if args.checkpoint:
    params = _checkpoint_params(args.checkpoint, jax.eval_shape(init, jax.random.key(0)))
  else:
    params = jax.jit(init)(jax.random.key(0))

  def loss(p):
    logits = model.apply({"params": p}, batch)
    total, _ = losses.compute_loss(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"])
    return total / jnp.sum(batch["decoder_loss_weights"])

  grads = {}
  modes = ["float32"] + list(args.modes or [m for m in MODES if m != "float32"])
  for mode in modes:
    bindings = MODES[mode]
    # matmul reads these when the loss is traced.
    gin.parse_config(["matmul.precision = 'default'", "matmul.split_weights = 'none'",
                      "matmul.split_layers = ()"] + bindings)
    # A fresh function per mode: jit caches traces per function, blind to gin.
    g = jax.jit(jax.grad(lambda p: loss(p)))(params)
    grads[mode] = {k: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(v)]) for k, v in g.items()}
  ref = grads["float32"]
  whole = lambda g: np.concatenate([g[k] for k in sorted(g)])  # noqa: E731
  rows = []
  for mode, g in grads.items():
    if mode == "float32":
      continue
    a, b = whole(g), whole(ref)
    rows.append({"mode": mode, "rel_l2": _rel(a, b),
                 "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                 **{f"rel_l2_{k}": _rel(g[k], ref[k]) for k in ("vit", "encoder", "decoder")
                    if k in g}})
  return rows


def main(argv=None):
  args = parse_args(argv)
  rows = run(args)
  print(common.format_table(rows))
  machine = common.machine_info()
  print(common.machine_line(machine))
  common.write_json(args.json, {"benchmark": "grad_precision", "machine": machine,
                                "config": args.config, "batch": args.batch,
                                "mixture": args.mixture, "mixture_batch": args.mixture_batch,
                                "checkpoint": args.checkpoint,
                                "results": rows})
  return rows


if __name__ == "__main__":
  main()
