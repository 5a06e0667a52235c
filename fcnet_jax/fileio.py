"""Writing files so that a reader never sees half of one, and paths that may be local or remote.

Every file this project writes for later reading (JSON results, the resolved config, converted shards, the
converter's summary, benchmark reports) goes through `atomic_write`: the bytes go to a temporary name beside the
target, which is then renamed over it. A job killed mid-write leaves the old file (or none), never a torn one.
Directories are built the same way (`atomic_output(..., directory=True)`). Paths go through `etils.epath`, which
also serves remote file systems (gs://…) where a backend for them is installed; there a "rename" is a copy and a
delete, still never a partial target.
"""

import contextlib
import json
from typing import Any, Iterator, Mapping, Union
import uuid

from etils import epath

PathLike = Union[str, epath.PathLike]


def as_path(path: PathLike, *parts: str) -> epath.Path:
  """`path` (joined with `parts`) as a path that may be local or remote (gs://…)."""
  try:
    return epath.Path(path, *parts)
  except KeyError as e:  # etils' registry of URL schemes: "https://…" and the like.
    raise ValueError(f"{path}: unsupported path scheme {e}; use a local path or a gs:// (cloud storage) path") from None


@contextlib.contextmanager
def atomic_output(path: PathLike, *, directory: bool = False, replace: bool = False) -> Iterator[epath.Path]:
  """Yields a temporary path beside `path`; when the block succeeds, it is renamed to `path`.

  A file replaces an existing `path`. A directory (`directory=True`: created empty for the block to fill) must
  not exist yet unless `replace`: then the old one is moved aside only once the new one is complete, and deleted
  after the new one is in place. On an exception the temporary file or directory is removed and `path` is left
  as it was.
  """
  path = as_path(path)
  if directory and path.exists() and not replace:
    raise FileExistsError(f"{path} already exists; remove it or choose another output directory")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  if directory:
    tmp.mkdir()
  try:
    yield tmp
    if directory:
      old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
      if path.exists():
        path.rename(old)
      tmp.rename(path)
      if old.exists():
        old.rmtree()
    else:
      tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.rmtree() if tmp.is_dir() else tmp.unlink()


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
  """Writes `data` to `path` (str as UTF-8) through a temporary sibling and a rename; parents are created."""
  with atomic_output(path) as tmp:
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: PathLike, payload: Mapping[str, Any]) -> None:
  """`payload` as indented, key-sorted JSON (a trailing newline), written atomically."""
  atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: PathLike) -> Any:
  """The parsed JSON of `path`; a malformed file is a ValueError naming it."""
  try:
    return json.loads(as_path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None
