"""Test-only caption tasks whose validation splits are not a multiple of an eval batch.

Imported by tests/test_evaluator.py and, as `--module_import=tests.eval_tasks`, by the
launcher subprocesses of tests/test_multihost_eval.py. Captioning is deterministic (no seeded
preprocessor), so 1 and 2 hosts see identical examples.
"""
from pali.data import preprocessors as pp
from pali.data import synthetic
from tasks.common import TAIL, add_mixture, add_task

CAPTION_20 = "eval_test_shapes_caption_20"  # batch 8: 8 + 8 + a partial 4
CAPTION_9 = "eval_test_shapes_caption_9"    # 2 hosts: shards of 5 and 4
MIXTURE = "eval_test_captions"
SIZES = {CAPTION_20: 20, CAPTION_9: 9}

for _name, _n in SIZES.items():
  add_task(_name, synthetic.index_source({"train": 64, "validation": _n}),
           [synthetic.render_shapes, pp.caption, pp.prepare_images, *TAIL],
           shuffle_buffer_size=8)
add_mixture(MIXTURE, [(CAPTION_20, 1.0), (CAPTION_9, 1.0)])
