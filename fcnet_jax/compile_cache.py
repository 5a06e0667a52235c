"""The persistent XLA compilation cache of a run: a restarted or re-evaluated run loads its compiled programs.

`config.compile_cache_dir` chooses the directory:

  ""            (default) `<workdir>/xla_cache`, unless the environment variable JAX_COMPILATION_CACHE_DIR names
                one (an operator's choice for every job of a machine, e.g. the test suite's shared cache); off
                when the workdir does not exist (an evaluation of a missing workdir creates nothing in it);
  "none"        off: every process compiles;
  anything else that directory, local or remote (gs://…; jax reads and writes it through etils.epath).

The cache key covers the program, the jax/jaxlib versions, the device kind and the XLA flags, so one directory can
serve several configs and machines. Only compilations slower than `MIN_COMPILE_TIME_SECS` are stored (the train,
evaluation and init steps; not the many small eager kernels). jax reads the directory when it first compiles, so
`enable` must run before anything is compiled; a later call with another directory resets jax's cache object.
Importing this module does not import TensorFlow.
"""

import os
from typing import Optional

import jax
import ml_collections

WORKDIR_SUBDIR = "xla_cache"
OFF = "none"
ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
MIN_COMPILE_TIME_SECS = 1.0


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  """The cache directory `config.compile_cache_dir` selects for a run in `workdir`, or None when it is off."""
  value = config.get("compile_cache_dir", "")
  if not isinstance(value, str):
    raise ValueError(
      f"config.compile_cache_dir: expected a directory, '' (inside the workdir) or 'none', got {value!r}"
    )
  value = value.strip()
  if value.lower() == OFF:
    return None
  if value:
    return value
  if os.environ.get(ENV_DIR):
    return os.environ[ENV_DIR]
  if not workdir:
    raise ValueError("config.compile_cache_dir='' puts the cache inside the workdir, but no workdir was given")
  if "://" not in workdir and not os.path.isdir(workdir):
    return None
  return os.path.join(workdir, WORKDIR_SUBDIR)


def enable(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  """Points jax's persistent compilation cache at `cache_dir(config, workdir)` (or turns it off); returns the
  directory. Call once per process before the first compilation (main.py does, for both modes)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  directory = cache_dir(config, workdir)
  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if "://" not in directory:
    directory = os.path.abspath(directory)
  jax.config.update("jax_enable_compilation_cache", True)
  if jax.config.jax_compilation_cache_dir != directory:
    compilation_cache.reset_cache()  # jax keeps the directory it opened first; a new one needs a new cache object.
    compilation_cache.set_cache_dir(directory)
  # An operator's environment settings win over these thresholds (jax reads JAX_PERSISTENT_CACHE_* at start-up).
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
  return directory
