"""Device mesh and shardings: data parallelism over all devices of all hosts with `jax.jit` (no pmap).

The batch is sharded over the "data" axis; parameters, optimiser state and BatchNorm statistics are replicated.
Under jit, BatchNorm's batch statistics are therefore global across devices (XLA inserts the all-reduce).

Several processes: every process compiles the same program, and the first run of a program that talks to devices
of other processes connects to them (on CPUs, Gloo waits at most 30 s for the others to show up, and jaxlib has no
setting for it). A process that finished compiling well before another would time out there. `compile_together`
therefore compiles a jitted function ahead of time, then waits at a barrier of JAX's coordination service (no device
collective, a generous timeout) until every process has compiled it too.
"""

import itertools
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
# How long a process waits for the others to finish compiling (`compile_together`); compiling R101's step for a
# large mesh takes minutes, and a slow process is better waited for than failed.
COMPILE_BARRIER_TIMEOUT_S = 1800
_barrier_count = itertools.count()


def create_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def use_mesh(mesh: Mesh):
  """The mesh as the context of jitted code (`jax.set_mesh`, jax ≥ 0.7; the Mesh itself on older versions)."""
  return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> Mapping[str, jax.Array]:
  """Host-local NumPy arrays (this process's part of the batch) → one globally sharded array per field."""
  sharding = batch_sharding(mesh)
  local_devices = len(mesh.local_devices)
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "US":  # strings never reach the device
      continue
    if value.shape[0] % local_devices:
      raise ValueError(
        f"batch field {name!r}: per-process batch {value.shape[0]} is not divisible by the "
        f"{local_devices} local devices (config.batch_size / config.eval_batch_size)"
      )
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host-local values (identical on every process) → arrays replicated over every device of the mesh.

  `jax.device_put` only reaches this process's devices, so with several processes each one contributes its copy
  to the global array instead.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated_sharding(mesh))
  # Python scalars (TrainState.step starts as int 0) become arrays first; typed PRNG keys stay keys.
  tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)
  return multihost_utils.host_local_array_to_global_array(tree, mesh, P())


def sync_processes(name: str, timeout_s: float = COMPILE_BARRIER_TIMEOUT_S) -> None:
  """Returns when every process has called it with the same `name` (in the same order); a no-op for one process.

  A barrier of JAX's coordination service (started by `jax.distributed.initialize`), not a device collective, so
  it needs no compiled program and waits up to `timeout_s` seconds rather than Gloo's 30.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
      f"{jax.process_count()} processes but no jax.distributed client; call jax.distributed.initialize"
    )
  # A barrier id serves once: number them (every process calls in the same order).
  client.wait_at_barrier(f"fcnet_jax_{name}_{next(_barrier_count)}", int(timeout_s * 1000))


def compile_together(jitted: Any, *args: Any, name: str) -> Any:
  """`jitted` compiled for `args` (`jitted.lower(*args).compile()`), returned once every process has compiled it.

  Call it where the program is first needed, with the arguments of its first call; the returned executable takes
  arguments of the same shapes and shardings. With one process it only compiles.
  """
  start = time.time()
  compiled = jitted.lower(*args).compile()
  compiled_at = time.time()
  sync_processes(f"compiled_{name}")
  if jax.process_count() > 1:
    logging.info(
      "Compiled %s in %.1f s, then waited %.1f s for the other processes.", name, compiled_at - start,
      time.time() - compiled_at,
    )  # fmt: skip
  return compiled
