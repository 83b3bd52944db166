"""Data parallelism with `jax.jit`: a 1-D device mesh, batches split along it.

The same code serves 1 CPU, 8 TPU cores or many hosts: each process feeds only the
rows of a global batch that belong to its own devices, and
`jax.make_array_from_process_local_data` assembles the global array.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepdigits.errors import ConfigError

DATA_AXIS = 'data'
# The host dispatches at most this many steps ahead of the devices: enough to hide
# dispatch, and it bounds queued work (XLA:CPU's in-process collectives over many fake
# devices deadlock, starving their thread pool, when dozens of steps are queued).
MAX_STEPS_IN_FLIGHT = 2


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process (GSPMD 'auto' sharding: jit
  propagates the batch sharding through the network)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (parameters, optimizer state, BatchNorm statistics)."""
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch_size: int, mesh: Mesh, name: str = 'batch_size') -> None:
  """Global batches must split evenly over the devices."""
  if batch_size % mesh.size:
    raise ConfigError(f'{name}={batch_size} does not divide by the {mesh.size} devices; '
                      f'use a multiple of {mesh.size}, e.g. '
                      f'--config.{name}={max(mesh.size, batch_size // mesh.size * mesh.size)}.')


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch_size if idx[0].stop is None else idx[0].stop
           for idx in index_map.values()]
  rows = slice(min(starts), max(stops))
  if rows.stop - rows.start != global_batch_size // jax.process_count():
    raise ValueError('this process\'s devices do not hold one contiguous block of the batch')
  return rows


def global_batch(mesh: Mesh, *local_arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Global arrays sharded over the batch axis, built from this process's rows."""
  sharding = batch_sharding(mesh)
  return tuple(
      jax.make_array_from_process_local_data(
          sharding, a, (a.shape[0] * jax.process_count(),) + a.shape[1:])
      for a in local_arrays)


def sharded_batches(mesh: Mesh, arrays: tuple[np.ndarray, ...], index_batches):
  """Yields global batches of `arrays` (host numpy) for each row of `index_batches`.

  Each process gathers only its own rows of every global batch (a vectorised take),
  so hosts never hold another host's slice on device.
  """
  index_batches = np.asarray(index_batches)
  rows = process_rows(mesh, index_batches.shape[1])
  for indices in index_batches:
    local = indices[rows]
    yield global_batch(mesh, *(np.take(a, local, axis=0) for a in arrays))


# One dispatch per batch for the whole tree, not one per leaf (BatchNorm moments: 12).
_tree_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)


def sum_over_batches(mesh: Mesh, batch_fn, arrays: tuple[np.ndarray, ...], index_batches):
  """The tree sum of `batch_fn(*global_batch)` over every row of `index_batches`, with at
  most MAX_STEPS_IN_FLIGHT batches queued ahead of the devices."""
  total = None
  for i, batch in enumerate(sharded_batches(mesh, arrays, index_batches)):
    result = batch_fn(*batch)
    total = result if total is None else _tree_add(total, result)
    if i % MAX_STEPS_IN_FLIGHT == 0:
      jax.block_until_ready(total)
  return total
