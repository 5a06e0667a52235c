"""fcnet_jax/compile_cache.py: which directory `config.compile_cache_dir` selects (in-process, nothing compiled).

That a second process really loads its programs from the cache instead of compiling them is checked on main.py
in tests/test_eval_paths.py (`test_second_evaluation_hits_the_workdir_compile_cache`), where two evaluations of
the shared trained workdir run anyway.
"""

import os

import pytest

from configs import tiny
from fcnet_jax import compile_cache


def _config(value):
  config = tiny.get_config()
  config.compile_cache_dir = value
  return config


def test_default_is_inside_the_workdir_unless_the_environment_names_one(tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  assert compile_cache.cache_dir(_config(""), str(tmp_path)) == str(tmp_path / "xla_cache")
  assert tiny.get_config().compile_cache_dir == ""  # The default of every config.
  monkeypatch.setenv(compile_cache.ENV_DIR, "/srv/shared_cache")
  assert compile_cache.cache_dir(_config(""), str(tmp_path)) == "/srv/shared_cache"
  # An explicit setting wins over the environment.
  assert compile_cache.cache_dir(_config("/data/cache"), str(tmp_path)) == "/data/cache"


def test_off_explicit_remote_and_missing_workdir(tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  assert compile_cache.cache_dir(_config("none"), str(tmp_path)) is None
  assert compile_cache.cache_dir(_config("None"), str(tmp_path)) is None
  assert compile_cache.cache_dir(_config("gs://bucket/xla"), str(tmp_path)) == "gs://bucket/xla"
  assert compile_cache.cache_dir(_config(""), "gs://bucket/run") == "gs://bucket/run/xla_cache"
  # Evaluating a workdir that does not exist must not create it for the cache.
  missing = str(tmp_path / "missing")
  assert compile_cache.cache_dir(_config(""), missing) is None
  assert not os.path.exists(missing)


def test_bad_values_name_the_field(tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  config = tiny.get_config()
  del config["compile_cache_dir"]
  config.compile_cache_dir = 3
  with pytest.raises(ValueError, match="config.compile_cache_dir"):
    compile_cache.cache_dir(config, str(tmp_path))
  with pytest.raises(ValueError, match="config.compile_cache_dir.*no workdir"):
    compile_cache.cache_dir(_config(""), "")
