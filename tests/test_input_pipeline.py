"""The epoch order, and the two feeds giving the train step the same batches."""

import itertools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from deepdigits import input_pipeline, model_factory, sharding, train, train_state
from deepdigits.data import Split


def test_epoch_order_is_a_permutation_set_by_seed_and_epoch_only():
  a = np.asarray(input_pipeline.epoch_order(0, 3, 1000))
  np.testing.assert_array_equal(np.sort(a), np.arange(1000))
  np.testing.assert_array_equal(a, input_pipeline.epoch_order(0, 3, 1000))
  assert (a != np.asarray(input_pipeline.epoch_order(0, 4, 1000))).any()
  assert (a != np.asarray(input_pipeline.epoch_order(1, 3, 1000))).any()
  np.testing.assert_array_equal(input_pipeline.epoch_order(5, 3, 10, shuffle=False),
                                np.arange(10))


@pytest.fixture(scope='module')
def split(mnist):
  """The tiny runs' training split (conftest.tiny_mnist_dir): with tiny_config, its
  train step is the one they compile, so the compilation cache serves both."""
  return Split(mnist['train'].images[:512], mnist['train'].labels[:512])


@pytest.mark.devices(8)
def test_device_feed_visits_every_example_once_per_epoch(split):
  """The in-jit slicing over an epoch yields each example exactly once, on 8 devices,
  each batch sharded over them."""
  mesh = sharding.make_mesh()
  feed = input_pipeline.DeviceFeed(mesh, split, batch_size=64)
  order = input_pipeline.epoch_order(0, 1, len(split))
  gather = jax.jit(lambda images, labels, order, step: input_pipeline.batch_from_order(
      images, labels, order, step, 64, feed.steps_per_epoch, mesh))
  seen_images, seen_labels = [], []
  for step in range(8, 16):  # the second epoch: the position is step % steps_per_epoch
    images, labels = gather(feed.images, feed.labels, order, step)
    assert images.shape == (64, 28, 28, 1) and images.dtype == np.uint8
    assert images.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
    seen_images.append(np.asarray(images))
    seen_labels.append(np.asarray(labels))
  seen_images, seen_labels = np.concatenate(seen_images), np.concatenate(seen_labels)
  expected = np.asarray(order)
  np.testing.assert_array_equal(seen_images, split.images[expected])
  np.testing.assert_array_equal(seen_labels, split.labels[expected])
  assert len({image.tobytes() for image in seen_images}) == len(
      {image.tobytes() for image in split.images})


def test_device_and_host_feeds_train_to_the_same_parameters(split):
  config = tiny_config('', batch_size=64)
  mesh = sharding.make_mesh()
  model = model_factory.make_model(config)
  order = input_pipeline.epoch_order(0, 0, len(split))
  results = {}
  for kind in input_pipeline.FEEDS:
    feed = input_pipeline.make_feed(kind, mesh, split, config.batch_size)
    state = train_state.create_train_state(config, model, mesh)
    step_fn = train.compile_train_step(config, model, mesh, state, feed)
    for data_args in itertools.islice(feed.epoch(order, 0), 3):  # the first 3 steps
      state, metrics = step_fn(state, *data_args)
    results[kind] = jax.device_get((state.params, metrics))
    assert int(state.step) == 3
  device, host = results['device'], results['host']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               device, host)


def test_a_feed_started_mid_epoch_gives_the_rest_of_the_epoch(split):
  """What a run resumed at a step inside an epoch is fed: the host feed's batches from
  that step on; the device feed's data for each remaining step (the step itself finds
  its batch from its own count)."""
  mesh = sharding.make_mesh()
  order = input_pipeline.epoch_order(0, 2, len(split))
  host = input_pipeline.HostFeed(mesh, split, batch_size=64)
  whole = [jax.device_get(batch) for batch in host.epoch(order, 0)]
  rest = [jax.device_get(batch) for batch in host.epoch(order, 5)]
  assert len(whole) == 8 and len(rest) == 3
  jax.tree.map(np.testing.assert_array_equal, rest, whole[5:])
  device = input_pipeline.DeviceFeed(mesh, split, batch_size=64)
  assert len(list(device.epoch(order, 5))) == 3
