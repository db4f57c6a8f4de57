r"""Memory/FLOPs dry run: does a model fit a mesh of a given device, and how fast would it go?

  python launch/plan.py --gin_file=gin_configs/models/palix_55b.gin \
      --mesh=data:64,fsdp:16,tensor:4 --device=tpu_v4 --batch=1024 --image_size=224 \
      --input_len=128 --target_len=64

Nothing is allocated and no device of that kind is needed: shapes come from jax.eval_shape and
shardings from the rules table on an abstract mesh (pali/planning.py). Exit code 0 when the plan
fits, 1 when it does not.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launch_utils  # noqa: E402

launch_utils.set_process_environment()

from absl import app, flags  # noqa: E402

flags.DEFINE_multi_string("gin_file", [], "Model gin files (e.g. gin_configs/models/...).")
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'T5Config.d_ff = 8192'.")
flags.DEFINE_string("mesh", "data:1,fsdp:8,tensor:1", "Mesh sizes, e.g. data:64,fsdp:16,tensor:4.")
flags.DEFINE_string("device", "tpu_v4", "One of: tpu_v4, tpu_v5e, tpu_v5p, tpu_v6e, a100_40gb, "
                    "a100_80gb, h100, h200.")
flags.DEFINE_integer("batch", 256, "Global batch size.")
flags.DEFINE_integer("image_size", 224, "Image side in pixels.")
flags.DEFINE_integer("max_images", 1, "Images per example.")
flags.DEFINE_integer("input_len", 128, "Text encoder input length.")
flags.DEFINE_integer("target_len", 64, "Decoder target length.")
flags.DEFINE_enum("optimizer", "adafactor", ["adafactor", "adamw"], "Optimizer.")
flags.DEFINE_bool("remat", None, "Count activations with full remat (default: as the gin "
                  "config's remat_policy says).")
flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation assumed for the step time.")
flags.DEFINE_multi_string("frozen", [], "Frozen parameter regexes, e.g. '^vit/'.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import gin

  from pali import planning
  from pali.models import pali as pali_model
  import pali.partitioning  # noqa: F401  (registers logical_axis_rules for gin)

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in (repo, os.path.join(repo, "gin_configs")):
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings)
  if FLAGS.device not in planning.DEVICES:
    raise app.UsageError(f"--device={FLAGS.device!r}: use one of {sorted(planning.DEVICES)}.")
  result = planning.plan(
      pali_model.build_model().config, planning.parse_mesh(FLAGS.mesh), FLAGS.device,
      batch=FLAGS.batch, image_size=FLAGS.image_size, input_len=FLAGS.input_len,
      target_len=FLAGS.target_len, max_images=FLAGS.max_images, optimizer=FLAGS.optimizer,
      remat=FLAGS.remat, mfu=FLAGS.mfu, frozen_patterns=tuple(FLAGS.frozen))
  print(result.report())
  sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
  app.run(main)
