"""The improved recipe's parts: augmentation, the schedule, label smoothing, the moving
average of the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from deepdigits import (
  augment,
  checkpointing,
  config_checks,
  inference,
  model_factory,
  sharding,
  train,
  train_state,
)
from deepdigits.data import scale_images
from deepdigits.errors import ConfigError


@pytest.fixture(scope='module')
def images(mnist):
  return scale_images(jnp.asarray(mnist['test'].images[:32]))


def test_augmentation_keeps_shape_dtype_range_and_is_set_by_the_key(images):
  key = jax.random.PRNGKey(0)
  moved = augment.augment_batch(key, images, 2.0, 10.0, 0.1)
  assert moved.shape == images.shape and moved.dtype == images.dtype
  assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0
  np.testing.assert_array_equal(moved, augment.augment_batch(key, images, 2.0, 10.0, 0.1))
  other = augment.augment_batch(jax.random.PRNGKey(1), images, 2.0, 10.0, 0.1)
  assert float(jnp.abs(other - moved).mean()) > 0.01
  # Each image is moved on its own, not the whole batch alike.
  changes = jnp.abs(moved - images).mean(axis=(1, 2, 3))
  assert float(changes.min()) > 0 and len(np.unique(np.asarray(changes))) > 16


def test_augmentation_off_returns_the_images_untouched(images):
  assert augment.augment_batch(jax.random.PRNGKey(0), images) is images


@pytest.mark.parametrize('kind', ['shift', 'rotation', 'zoom'])
def test_each_augmentation_alone_changes_images(images, kind):
  ranges = {'max_shift': 0.0, 'max_rotation': 0.0, 'max_zoom': 0.0}
  ranges[f'max_{kind}'] = {'shift': 2.0, 'rotation': 15.0, 'zoom': 0.15}[kind]
  moved = augment.augment_batch(jax.random.PRNGKey(0), images, **ranges)
  assert float(jnp.abs(moved - images).mean()) > 0.01
  # Ink is moved, not made or lost (up to what leaves the frame and resampling).
  np.testing.assert_allclose(moved.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)),
                             rtol=0.35)


def test_elastic_distortion_alone_changes_each_image_by_its_key(images):
  moved = augment.augment_batch(jax.random.PRNGKey(0), images, elastic_alpha=34.0,
                                elastic_sigma=4.0)
  assert moved.shape == images.shape and moved.dtype == images.dtype
  assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0
  assert float(jnp.abs(moved - images).mean()) > 0.01
  changes = jnp.abs(moved - images).mean(axis=(1, 2, 3))
  assert len(np.unique(np.asarray(changes))) > 16
  np.testing.assert_array_equal(moved, augment.augment_batch(
      jax.random.PRNGKey(0), images, elastic_alpha=34.0, elastic_sigma=4.0))
  # A local warp that stretches and squeezes strokes, but makes or loses no digit.
  ink_ratio = moved.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
  assert abs(float(ink_ratio.mean()) - 1) < 0.1 and float(jnp.abs(ink_ratio - 1).max()) < 0.5


def test_elastic_distortion_keeps_the_affine_maps_of_runs_without_it(images):
  """It draws from its own stream: a vanishing distortion leaves the affine result."""
  key = jax.random.PRNGKey(3)
  affine_only = augment.augment_batch(key, images, 2.0, 10.0, 0.1)
  with_tiny_warp = augment.augment_batch(key, images, 2.0, 10.0, 0.1, elastic_alpha=1e-4)
  # (The border row or column can fall just outside the frame and turn black.)
  np.testing.assert_allclose(with_tiny_warp[:, 1:-1, 1:-1], affine_only[:, 1:-1, 1:-1],
                             atol=1e-3)
  assert float(jnp.abs(affine_only - images).mean()) > 0.01


def test_whole_pixel_shift_moves_the_digit_exactly(images):
  """With a shift range that can only give (+1, -1) here, the pull map is exact."""
  matrix = augment.random_affine(jax.random.PRNGKey(0), 0.0, 0.0, 0.0, 28)
  np.testing.assert_allclose(matrix, np.eye(4), atol=1e-7)
  shift = jnp.array([[1, 0, 0, -1.0], [0, 1, 0, 1.0], [0, 0, 1, 0], [0, 0, 0, 1]])
  import dm_pix  # pylint: disable=g-import-not-at-top
  moved = dm_pix.affine_transform(images[0], shift, order=1, mode='constant', cval=0.0)
  np.testing.assert_allclose(moved[1:, :-1], images[0][:-1, 1:], atol=1e-6)


def test_cosine_schedule_values():
  config = tiny_config('', lr_schedule='cosine', learning_rate=1e-3, num_epochs=10,
                       warmup_epochs=1.0)
  schedule = train_state.learning_rate_schedule(config, steps_per_epoch=100)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(50), 5e-4, rtol=1e-6)  # half-way up the warm-up
  np.testing.assert_allclose(schedule(100), 1e-3, rtol=1e-6)  # the peak
  # Cosine from the peak at step 100 to 0 at step 1000: half-way is half the peak.
  np.testing.assert_allclose(schedule(550), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(1000), 0.0, atol=1e-12)
  constant = train_state.learning_rate_schedule(tiny_config('', learning_rate=3e-3), 100)
  assert float(constant(0)) == float(constant(999)) == 3e-3


def test_label_smoothing_loss_matches_the_formula():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 2])
  log_p = jax.nn.log_softmax(logits)
  alpha = 0.1
  targets = (1 - alpha) * jax.nn.one_hot(labels, 3) + alpha / 3
  expected = -(targets * log_p).sum(-1).mean()
  got = optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(labels, 3), alpha)).mean()
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_ema_is_the_analytic_average_of_a_toy_sequence():
  decay = 0.9
  values = [3.0, -1.0, 4.0, 1.0, 5.0, -9.0, 2.0, 6.0, 5.0, 3.0, 5.0, 8.0, 9.0, 7.0]
  average = {'w': jnp.array(0.0)}  # the initial weights
  expected = 0.0
  for step, value in enumerate(values):
    average = train.ema_update(average, {'w': jnp.array(value)}, decay, step)
    rate = min(decay, (1 + step) / (10 + step))
    expected = rate * expected + (1 - rate) * value
  np.testing.assert_allclose(average['w'], expected, rtol=1e-6)
  # By hand for the first two: rates 1/10 and 2/11.
  first = train.ema_update({'w': 0.0}, {'w': 3.0}, decay, 0)['w']
  np.testing.assert_allclose(first, 0.9 * 3.0, rtol=1e-6)


def test_recipe_fields_are_checked():
  for overrides in ({'ema_decay': 1.0}, {'label_smoothing': -0.1}, {'augment_max_zoom': 1.5},
                    {'lr_schedule': 'linear'}, {'augment_max_shift': -1.0},
                    {'augment_elastic_alpha': -1.0},
                    {'augment_elastic_alpha': 34.0, 'augment_elastic_sigma': 0.0},
                    {'warmup_epochs': 5.0}):
    with pytest.raises(ConfigError):
      config_checks.check_values(tiny_config('', **overrides))


def test_a_run_with_the_whole_recipe_evaluates_the_averaged_weights(tiny_mnist_dir, tmp_path):
  config = tiny_config(tiny_mnist_dir, augment_max_shift=2.0, augment_max_rotation=10.0,
                       augment_max_zoom=0.1, augment_elastic_alpha=34.0,
                       label_smoothing=0.1, lr_schedule='cosine',
                       warmup_epochs=0.5, ema_decay=0.99, num_epochs=2,
                       train_subset=256)
  record = train.train_and_evaluate(config, str(tmp_path))
  assert record['learning_rate'] < 1e-4  # cosine decayed to about 0 at the last step
  trained = inference.load_trained(str(tmp_path))
  raw = inference.load_trained(str(tmp_path), recalibrate=False)
  test = inference.load_datasets(config)['test']
  logits = inference.predict_logits(trained, test.images)
  np.testing.assert_allclose(np.mean(logits.argmax(-1) == test.labels),
                             record['test_accuracy'], atol=1e-6)
  assert raw.params is not None
  # The averaged weights differ from the last trained ones.
  state = checkpointing.restore_latest(
      checkpointing.make_manager(str(tmp_path), 3),
      train_state.create_train_state(config, model_factory.make_model(config),
                                       sharding.make_mesh()))
  difference = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.ema['params'],
                            state.params)
  assert max(jax.tree.leaves(difference)) > 1e-4
  jax.tree.map(np.testing.assert_array_equal, trained.params, state.ema['params'])
