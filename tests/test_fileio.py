"""fcnet_jax.fileio: a reader never sees a torn file or directory, and a failed write loses nothing."""

import os

import pytest

from fcnet_jax import fileio


def _entries(folder):
  return sorted(os.listdir(folder))


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "sub" / "a.json"
  fileio.write_json(target, {"b": 1, "a": [1, 2]})
  fileio.write_json(target, {"c": 3})
  assert fileio.read_json(target) == {"c": 3}
  assert _entries(tmp_path / "sub") == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
  target = tmp_path / "a.txt"
  fileio.atomic_write(target, "old")
  with pytest.raises(RuntimeError):
    with fileio.atomic_output(target) as tmp:
      tmp.write_text("half")
      raise RuntimeError("killed")
  assert target.read_text() == "old" and _entries(tmp_path) == ["a.txt"]


def test_directory_replace_only_when_complete(tmp_path):
  target = tmp_path / "ckpt"
  with fileio.atomic_output(target, directory=True) as tmp:
    (tmp / "v1").write_text("1")
  with pytest.raises(FileExistsError, match="already exists"):
    with fileio.atomic_output(target, directory=True):
      pass
  with pytest.raises(RuntimeError):  # A failed replacement leaves the old directory as it was.
    with fileio.atomic_output(target, directory=True, replace=True) as tmp:
      (tmp / "v2").write_text("2")
      raise RuntimeError("disk full")
  assert _entries(target) == ["v1"] and _entries(tmp_path) == ["ckpt"]
  with fileio.atomic_output(target, directory=True, replace=True) as tmp:
    (tmp / "v2").write_text("2")
  assert _entries(target) == ["v2"] and _entries(tmp_path) == ["ckpt"]


def test_read_json_names_a_malformed_file(tmp_path):
  bad = tmp_path / "summary.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="summary.json is not valid JSON"):
    fileio.read_json(bad)
