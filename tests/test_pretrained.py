"""A checkpoint that rebuilds itself (fcnet_jax/run_config.py, fcnet_jax/pretrained.py) on the shared trained run.

The config.json that training wrote must load (`run_config.load`) into exactly the configuration the run was
started with (configs/tiny.py plus the command line's overrides, rebuilt here from the same flags), tuples and
all, with the tokenizer settings beside it. The errors a user meets are checked for what they say: an old workdir
without config.json names --config; a configuration that does not match lists the differing fields; a step that
does not exist lists the steps there are; a directory that holds no model says what it expected. Nothing here
compiles a model: errors are raised before any restore, and the restore of a missing step fails on resolution.
"""

import ast
import json
import os
import shutil

import pytest

from configs import tiny
from fcnet_jax import fileio
from fcnet_jax import pretrained
from fcnet_jax import run_config
from fcnet_jax import tokenizer
import train_worker


def _flag_value(text: str):
  """A --config.x=VALUE as ml_collections' config_flags reads it: bools, Python literals, else the string."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _config_of(run) -> object:
  """configs/tiny.py with every --config.* override of `run`'s main.py command line applied."""
  config = tiny.get_config()
  for arg in run.command(run.workdir):
    if not arg.startswith("--config."):
      continue
    field, value = arg[len("--config.") :].split("=", 1)
    *parents, name = field.split(".")
    parent = config
    for key in parents:
      parent = parent[key]
    parent[name] = _flag_value(value)
  return config


def test_training_saves_the_config_it_ran_with(trained_tiny_workdir):
  saved = run_config.load(trained_tiny_workdir.workdir)
  expected = _config_of(trained_tiny_workdir)
  assert saved.to_dict() == expected.to_dict()
  assert saved.model.vision_layers == (1, 1, 1, 1)  # Tuples come back as tuples, not JSON lists.
  assert saved.data.eval_splits == train_worker.TRAINED_SPLITS
  assert saved.learning_rate == train_worker.TRAINED_LEARNING_RATE and saved.model.freeze_backbone_bn
  document = fileio.read_json(run_config.path(trained_tiny_workdir.workdir))
  assert document["format"] == run_config.FORMAT
  assert document["tokenizer"] == {
    "name": "clip-bpe",
    "vocab_size": 49408,
    "context_length": expected.model.context_length,
    "sot": tokenizer.SOT_TOKEN,
    "eot": tokenizer.EOT_TOKEN,
    "pad": tokenizer.PAD_TOKEN,
  }


def test_save_load_round_trip(tmp_path):
  config = tiny.get_config()
  config.model.neck_dims = (8, 16, 32)
  config.data.eval_splits = ("val", "testB")
  run_config.save(config, tmp_path)
  assert run_config.load(tmp_path).to_dict() == config.to_dict()


def test_fields_added_later_get_the_behaviour_from_before_they_existed(tmp_path):
  config = tiny.get_config()
  run_config.save(config, tmp_path)
  document = json.loads((tmp_path / run_config.CONFIG_FILE).read_text())
  del document["config"]["data"]["device_letterbox"], document["config"]["model"]["backbone"]
  (tmp_path / run_config.CONFIG_FILE).write_text(json.dumps(document))
  loaded = run_config.load(tmp_path)
  assert loaded.data.device_letterbox is False and config.data.device_letterbox is True  # Its default changed.
  assert loaded.model.backbone == config.model.backbone == "clip_resnet"
  assert loaded.to_dict().keys() == config.to_dict().keys()


def test_old_workdir_without_config_names_the_flag(trained_tiny_workdir, tmp_path):
  old = tmp_path / "old"
  shutil.copytree(trained_tiny_workdir.workdir, old, ignore=shutil.ignore_patterns("plugins", "events.*"))
  os.remove(old / run_config.CONFIG_FILE)
  with pytest.raises(FileNotFoundError, match=r"config\.json does not exist.*--config="):
    pretrained.load(old)
  with pytest.raises(FileNotFoundError, match="--config="):
    run_config.load(old)


def test_mismatching_config_lists_the_fields(trained_tiny_workdir):
  given = _config_of(trained_tiny_workdir)
  given.model.hidden_dim = 48
  given.data.letterbox = "cris"
  given.learning_rate = 0.5  # Not a model field: allowed to differ.
  with pytest.raises(ValueError) as error:
    pretrained.load(trained_tiny_workdir.workdir, config=given)
  message = str(error.value)
  assert "does not match" in message
  assert "model.hidden_dim: 32 (saved) vs 48 (given)" in message
  assert "data.letterbox: 'integer' (saved) vs 'cris' (given)" in message
  assert "learning_rate" not in message


def test_missing_step_lists_the_steps(trained_tiny_workdir):
  with pytest.raises(ValueError) as error:
    pretrained.load(trained_tiny_workdir.workdir, 3)
  message = str(error.value)
  steps = train_worker.checkpoint_steps(trained_tiny_workdir.workdir, "checkpoints")
  assert steps == [2, 4]
  assert "no checkpoint at step 3" in message and all(str(s) in message for s in steps), message


def test_not_a_model_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a training workdir .* nor an exported model"):
    pretrained.load(tmp_path)
  assert not pretrained.is_exported(tmp_path) and not pretrained.is_workdir(tmp_path)
