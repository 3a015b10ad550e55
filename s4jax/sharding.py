"""The device mesh and the placement of states and batches on it.

One 1-D mesh axis 'data' over every device of every host. States are replicated; batches
are split along their leading axis. With `jax.jit` on such shardings, BatchNorm statistics
and every loss normaliser see the global batch (like SyncBN) with no extra code.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def host_to_global(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of a batch -> global jax.Arrays sharded over 'data'.

  Each process passes only its own rows (global_batch / process_count of them); on one host
  that is the whole batch.
  """
  sharding = batch_sharded(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in local_batch.items()
  }
