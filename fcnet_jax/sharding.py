"""Device mesh and shardings: data parallelism over all devices of all hosts with `jax.jit` (no pmap).

The batch is sharded over the "data" axis; parameters, optimiser state and BatchNorm statistics are replicated.
Under jit, BatchNorm's batch statistics are therefore global across devices (XLA inserts the all-reduce).
"""

from typing import Any, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


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
