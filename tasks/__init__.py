"""Importing `tasks` registers every seqio Task and Mixture of the project (idempotently).

- tasks.synthetic: the embedded synthetic datasets and the `pali_synthetic_pretrain` mixture.
- tasks.stages: mixtures of the high-resolution stages (`pali_synthetic_ocr_detection`).
"""
from tasks import synthetic  # noqa: F401
from tasks import stages  # noqa: F401,E402
