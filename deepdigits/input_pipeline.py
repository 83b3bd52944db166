"""Feeding the train step: each epoch's order, and the batches that follow it.

Two feeds give the train step the very same global batches:
- 'device' (the default): the uint8 training split is put on every device once (MNIST
  is 47 MB); each epoch's order is drawn on the device and the jitted step slices its
  batch out of it by index, so nothing crosses from the host per step but the dispatch.
- 'host': each process gathers its own rows of every batch from host memory and sends
  them (`sharding.sharded_batches`); for data that does not fit on the devices.
"""

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from deepdigits import sharding
from deepdigits.data import Split

FEEDS = ('device', 'host')


@functools.partial(jax.jit, static_argnums=(2, 3))
def _epoch_order(seed, epoch, num_examples: int, shuffle: bool) -> jax.Array:
  if not shuffle:
    return jnp.arange(num_examples, dtype=jnp.int32)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def epoch_order(seed: int, epoch: int, num_examples: int, shuffle: bool = True) -> jax.Array:
  """The order of the training examples in an epoch, computed on the device: a
  permutation that is a function of (seed, epoch) only, so a resumed run sees the same
  order as an uninterrupted one."""
  return _epoch_order(jnp.uint32(seed), jnp.uint32(epoch), num_examples, shuffle)


def run_epoch_order(config, epoch: int, num_examples: int) -> jax.Array:
  """`epoch_order` for a run's config (its seed and shuffle fields)."""
  return epoch_order(config.seed, epoch, num_examples, config.shuffle)


def epoch_index_batches(order, batch_size: int) -> np.ndarray:
  """The order as host indices [steps, batch_size]; the last partial batch is dropped
  (it would differ every epoch when shuffling)."""
  order = np.asarray(jax.device_get(order))
  steps = len(order) // batch_size
  return order[:steps * batch_size].reshape(steps, batch_size)


def batch_from_order(images, labels, order, step, batch_size: int, steps_per_epoch: int,
                     mesh: Mesh):
  """Inside jit: the global batch of train step `step` (the position in the epoch is
  step % steps_per_epoch), gathered from the device-resident split, sharded over the
  mesh's batch axis (each device gathers only its own rows)."""
  start = (step % steps_per_epoch) * batch_size
  indices = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
  indices = jax.lax.with_sharding_constraint(indices, sharding.batch_sharding(mesh))
  return (jax.lax.with_sharding_constraint(images[indices], sharding.batch_sharding(mesh)),
          labels[indices])


class DeviceFeed:
  """The whole training split replicated on every device; the step slices its batch."""
  kind = 'device'

  def __init__(self, mesh: Mesh, split: Split, batch_size: int):
    self.mesh, self.batch_size = mesh, batch_size
    self.num_examples = len(split)
    self.steps_per_epoch = len(split) // batch_size
    replicated = sharding.replicated(mesh)
    self.images, self.labels = (
        jax.make_array_from_callback(a.shape, replicated, lambda index, a=a: a[index])
        for a in (split.images, split.labels))

  def arg_specs(self):
    """Shapes, dtypes and shardings of the step's data arguments (for AOT compiling)."""
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                 for a in (self.images, self.labels)) + (
        jax.ShapeDtypeStruct((self.num_examples,), jnp.int32,
                             sharding=sharding.replicated(self.mesh)),)

  def epoch(self, order: jax.Array, first_step: int) -> Iterator[tuple]:
    """The data arguments of the epoch's steps from `first_step` (within the epoch) on;
    the step itself finds its batch from its own step count."""
    for _ in range(first_step, self.steps_per_epoch):
      yield self.images, self.labels, order


class HostFeed:
  """Each process sends its own rows of every global batch from host memory."""
  kind = 'host'

  def __init__(self, mesh: Mesh, split: Split, batch_size: int):
    self.mesh, self.split, self.batch_size = mesh, split, batch_size
    self.num_examples = len(split)
    self.steps_per_epoch = len(split) // batch_size

  def arg_specs(self):
    batch = sharding.batch_sharding(self.mesh)
    return (jax.ShapeDtypeStruct((self.batch_size,) + self.split.images.shape[1:],
                                 jnp.uint8, sharding=batch),
            jax.ShapeDtypeStruct((self.batch_size,), jnp.int32, sharding=batch))

  def epoch(self, order: jax.Array, first_step: int) -> Iterator[tuple]:
    index_batches = epoch_index_batches(order, self.batch_size)
    yield from sharding.sharded_batches(
        self.mesh, (self.split.images, self.split.labels), index_batches[first_step:])


def make_feed(kind: str, mesh: Mesh, split: Split, batch_size: int):
  return {'device': DeviceFeed, 'host': HostFeed}[kind](mesh, split, batch_size)
