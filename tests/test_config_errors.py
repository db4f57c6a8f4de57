"""Bad configurations stop before anything compiles, with a message naming the value and fix."""
import os

import numpy as np
import pytest

from launch import launch_utils
from pali.training import trainer
from pali.training.validation import ConfigError

BASE = ["gin_configs/models/pali_tiny.gin", "gin_configs/runs/pretrain.gin"]


def _run(tmp_path, *bindings, macros=True):
  defaults = [f"MODEL_DIR = '{tmp_path / 'run'}'", "MIXTURE = 'pali_synthetic_pretrain'",
              "BATCH_SIZE = 8", "IMAGE_SIZE = 32", "TRAIN_STEPS = 1"] if macros else []
  launch_utils.parse_gin(BASE, defaults + list(bindings))
  return trainer.train()


def _fails(tmp_path, match, *bindings, **kw):
  with pytest.raises(ConfigError, match=match):
    _run(tmp_path, *bindings, **kw)


def test_unknown_gin_binding(tmp_path):
  _fails(tmp_path, "gin configuration is invalid.*no_such_param", "train.no_such_param = 3")


def test_missing_model_dir(tmp_path):
  with pytest.raises(ConfigError, match="MODEL_DIR is not set"):
    launch_utils.parse_gin(BASE, ["MIXTURE = 'pali_synthetic_pretrain'"])


def test_missing_mixture(tmp_path):
  with pytest.raises(ConfigError, match="MIXTURE is not set"):
    launch_utils.parse_gin(BASE, [f"MODEL_DIR = '{tmp_path}'"])


def test_mesh_that_does_not_divide_the_devices(tmp_path):
  _fails(tmp_path, r"data=3.*does not divide the 8 devices", "create_mesh.data = 3")


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  _fails(tmp_path, r"BATCH_SIZE=6 .*data-parallel size 8", "BATCH_SIZE = 6")


def test_image_size_not_divisible_by_patch(tmp_path):
  _fails(tmp_path, r"IMAGE_SIZE=36 is not divisible by the ViT patch size 8.*e.g. 32",
         "IMAGE_SIZE = 36")


def test_unknown_mixture(tmp_path):
  _fails(tmp_path, r"MIXTURE='no_such_mixture' is not a registered.*--module_import",
         "MIXTURE = 'no_such_mixture'")


def test_unwritable_model_dir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  _fails(tmp_path, r"MODEL_DIR=.*a_file/run.*not writable", f"MODEL_DIR = '{blocker / 'run'}'")


def test_init_from_that_does_not_exist(tmp_path):
  _fails(tmp_path, r"INIT_FROM=.*nowhere.*does not exist", f"INIT_FROM = '{tmp_path / 'nowhere'}'")


def test_vocab_size_smaller_than_the_tokenizer(tmp_path):
  _fails(tmp_path, r"VOCAB_SIZE=1000 .*smaller than the tokenizer's 2176 ids",
         "T5Config.vocab_size = 1000")


def test_unknown_module_import(tmp_path):
  with pytest.raises(ConfigError, match="no_such_module_xyz"):
    launch_utils.parse_gin(BASE, module_imports=["no_such_module_xyz"])


def test_nothing_loads_with_pickle():
  """External files (checkpoints, tokenizers, data) never go through pickle."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  offenders = []
  for folder in ("pali", "launch", "tasks"):
    for dirpath, _, files in os.walk(os.path.join(root, folder)):
      for name in files:
        if name.endswith(".py"):
          text = open(os.path.join(dirpath, name)).read()
          if "import pickle" in text or "allow_pickle=True" in text or "cloudpickle" in text:
            offenders.append(name)
  assert not offenders


def test_trains_on_a_task_registered_by_another_teams_module(tmp_path):
  """`--module_import=tests.custom_task_module` + `MIXTURE = 'custom_test_captions'`: the
  launcher's gin path imports the module, validates the task name and trains on it."""
  launch_utils.parse_gin(BASE, [
      f"MODEL_DIR = '{tmp_path}'", "MIXTURE = 'custom_test_captions'", "BATCH_SIZE = 8",
      "IMAGE_SIZE = 32", "TRAIN_STEPS = 2", "INPUT_LENGTH = 16", "TARGET_LENGTH = 16",
      "train.log_every = 1", "train.checkpoint_every = 2"],
      module_imports=["tests.custom_task_module"])
  result = trainer.train()
  assert result.step == 2
  assert np.isfinite(result.last_metrics["loss"])
