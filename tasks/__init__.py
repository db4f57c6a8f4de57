"""Importing `tasks` registers every seqio Task and Mixture of the project (idempotently).

- tasks.synthetic: the embedded synthetic datasets and the `pali_synthetic_pretrain` mixture
  (no downloads).
- tasks.stages: mixtures of the high-resolution stages (`pali_synthetic_ocr_detection`).
- tasks.real_data: TFDS-backed tasks (`coco_captions`, `coco_captions_split`,
  `coco2017_detection`, `c4_ul2`) for users who have the data prepared.

A team's own tasks live in its own module, registered the same way (see
pali.data.user_data.register_image_text_task and tests/custom_task_module.py), and are
loaded with `launch/tpu_train.py --module_import=their_module`.
"""
from tasks import real_data  # noqa: F401
from tasks import synthetic  # noqa: F401
from tasks import stages  # noqa: F401,E402
from tasks import learning  # noqa: F401,E402
