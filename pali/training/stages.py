"""Gin helpers that let one set of stage files name their folders and continue the schedule.

  RUN_ROOT = 'gs://bucket/palix'          # every stage writes RUN_ROOT/<stage name>
  MODEL_DIR = @model_dir/stage_dir()
  model_dir/stage_dir.name = 'stage2_448'
  INIT_FROM = @init_from/stage_dir()
  init_from/stage_dir.name = 'stage1_224'
  learning_rate_schedule.step_offset = @stage_step_offset()
  stage_step_offset.previous_stages = [%STAGE1_STEPS]
"""
from __future__ import annotations

import os
from typing import Sequence

import gin

from pali.training.validation import ConfigError


@gin.configurable
def stage_dir(root: str = gin.REQUIRED, name: str = gin.REQUIRED) -> str:
  """`root/name`: a stage's MODEL_DIR, or (for INIT_FROM) the previous stage's."""
  if not root:
    raise ConfigError("RUN_ROOT is not set: add --gin.RUN_ROOT=\"'/path/to/runs'\" (each stage "
                     "then uses RUN_ROOT/<stage name>), or set MODEL_DIR and INIT_FROM directly.")
  return os.path.join(root, name)


@gin.configurable
def stage_step_offset(previous_stages: Sequence[int] = ()) -> int:
  """Steps run by the stages before this one: the schedule continues where they stopped."""
  return int(sum(previous_stages))
