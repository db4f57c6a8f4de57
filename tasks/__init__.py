"""Importing `tasks` registers every seqio Task and Mixture of the project (idempotently).

- tasks.synthetic: the embedded synthetic datasets and the `pali_synthetic_pretrain` mixture.
"""
from tasks import synthetic  # noqa: F401
