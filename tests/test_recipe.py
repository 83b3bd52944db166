"""The improved recipe's parts: augmentation, the schedule, label smoothing, the moving
average of the weights."""

import functools
import importlib

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage

from conftest import REPO, tiny_config
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
from deepdigits.model import DeepDigitsCNN


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


def test_the_affine_map_and_the_elastic_distortion_are_one_resampling(images):
  """Each output pixel p reads the input at A(p + d(p)) (A the image's affine pull map,
  d its displacement field), bilinearly, once: scipy's map_coordinates at those points
  in float64 is the reference. Resampling twice (affine, then elastic) blurs the digit
  twice and is far from it."""
  key, batch = jax.random.PRNGKey(5), images.shape[0]
  moved = augment.augment_batch(key, images, 2.0, 10.0, 0.1, elastic_alpha=34.0,
                                elastic_sigma=5.0)
  matrices = jax.vmap(augment.random_affine, in_axes=(0, None, None, None, None))(
      jax.random.split(key, batch), 2.0, 10.0, 0.1, 28)
  elastic_keys = jax.random.split(jax.random.fold_in(key, augment.ELASTIC_STREAM), batch)
  fields = jax.vmap(augment.displacement_field, in_axes=(0, None, None, None))(
      elastic_keys, (28, 28), 34.0, 5.0)
  rows, cols = np.mgrid[:28, :28].astype(np.float64)
  expected = np.empty((batch, 28, 28))
  for i in range(batch):
    matrix, field = np.asarray(matrices[i], np.float64), np.asarray(fields[i, ..., 0], np.float64)
    y, x = rows + field[0], cols + field[1]
    source = [matrix[0, 0] * y + matrix[0, 1] * x + matrix[0, 3],
              matrix[1, 0] * y + matrix[1, 1] * x + matrix[1, 3]]
    expected[i] = scipy.ndimage.map_coordinates(np.asarray(images[i, ..., 0], np.float64),
                                                source, order=1, mode='grid-constant')
  np.testing.assert_allclose(moved[..., 0], expected, atol=1e-4)
  twice = jax.vmap(lambda k, image: dm_pix.elastic_deformation(
      k, image, 34.0, 5.0, order=1, mode='constant', cval=0.0))(
          elastic_keys, augment.augment_batch(key, images, 2.0, 10.0, 0.1))
  assert float(np.abs(np.asarray(twice[..., 0]) - expected).max()) > 0.1
  # Alone, the distortion is dm-pix's own (the same field from the same key).
  np.testing.assert_array_equal(
      augment.augment_batch(key, images, elastic_alpha=34.0, elastic_sigma=5.0),
      jax.vmap(lambda k, image: dm_pix.elastic_deformation(
          k, image, 34.0, 5.0, order=1, mode='constant', cval=0.0))(elastic_keys, images))


def test_elastic_probability_distorts_that_share_of_the_images(mnist):
  """With probability 0.5, about half of 256 images are distorted (within 4 standard
  deviations of 128); the others get their affine map alone."""
  images = scale_images(jnp.asarray(mnist['test'].images[:256]))
  key = jax.random.PRNGKey(7)
  affine_only = augment.augment_batch(key, images, 2.0, 10.0, 0.1)
  undistorted = lambda moved: np.asarray(
      jnp.abs(moved - affine_only).max(axis=(1, 2, 3)) < 1e-4)
  half = augment.augment_batch(key, images, 2.0, 10.0, 0.1, elastic_alpha=34.0,
                               elastic_sigma=5.0, elastic_probability=0.5)
  assert 96 <= int(undistorted(half).sum()) <= 160, int(undistorted(half).sum())
  every = augment.augment_batch(key, images, 2.0, 10.0, 0.1, elastic_alpha=34.0,
                                elastic_sigma=5.0)
  assert not undistorted(every).any()
  # The images chosen are distorted as they are with probability 1.
  chosen = ~undistorted(half)
  np.testing.assert_allclose(half[chosen], every[chosen], atol=1e-6)


def test_the_last_clean_epochs_train_on_the_images_as_they_are(images):
  config = tiny_config('', augment_max_shift=2.0, augment_elastic_alpha=34.0,
                       num_epochs=12, augment_clean_epochs=2)
  options = train.StepOptions.from_config(config, steps_per_epoch=10)
  assert options.clean_from_step == 100  # the first step of epoch 11
  inputs = jax.jit(functools.partial(train.augmented_inputs, options))
  key = jax.random.PRNGKey(0)
  assert float(jnp.abs(inputs(key, images, 99) - images).max()) > 0.1
  for step in (100, 119):
    np.testing.assert_array_equal(inputs(key, images, step), images)
  # Without clean epochs every step is augmented, with the same moves.
  always = train.StepOptions.from_config(tiny_config('', augment_max_shift=2.0,
                                                     augment_elastic_alpha=34.0))
  assert always.clean_from_step == -1
  np.testing.assert_allclose(train.augmented_inputs(always, key, images, 100),
                             inputs(key, images, 99), atol=1e-5)


def _blob_images(count: int, row: int, col: int) -> jax.Array:
  """`count` black 28x28 images, each with a 2x2 square of ink at (row, col)."""
  images = np.zeros((count, 28, 28, 1), np.float32)
  images[:, row:row + 2, col:col + 2] = 1.0
  return jnp.asarray(images)


def _centres_of_mass(images) -> np.ndarray:
  """Each image's centre of mass, (y, x) in pixels."""
  ink = np.asarray(images, np.float64)[..., 0]
  rows, cols = np.mgrid[:28, :28]
  total = ink.sum(axis=(1, 2))
  return np.stack([(ink * rows).sum(axis=(1, 2)) / total,
                   (ink * cols).sum(axis=(1, 2)) / total], axis=-1)


def test_shifts_stay_within_max_shift_on_each_axis():
  blobs = _blob_images(64, 13, 13)  # ink at the centre, (13.5, 13.5)
  moved = augment.augment_batch(jax.random.PRNGKey(0), blobs, max_shift=2.0)
  shift = _centres_of_mass(moved) - _centres_of_mass(blobs)
  assert np.abs(shift).max() <= 2.0 + 1e-4  # bilinear resampling keeps the centre of mass
  assert np.abs(shift).max(axis=0).min() > 1.8  # the whole range is drawn, on both axes
  assert (shift < -1).any() and (shift > 1).any()  # both ways


@pytest.mark.parametrize('kind', ['rotation', 'zoom'])
def test_rotations_and_zooms_stay_within_their_ranges_about_the_centre(kind):
  """A blob 9 pixels right of the image centre turns by at most max_rotation degrees
  about the centre, or moves away from it or towards it by at most max_zoom."""
  blobs = _blob_images(64, 13, 22)  # ink at (13.5, 22.5)
  ranges = {'rotation': dict(max_rotation=15.0), 'zoom': dict(max_zoom=0.15)}[kind]
  moved = augment.augment_batch(jax.random.PRNGKey(1), blobs, **ranges)
  dy, dx = (_centres_of_mass(moved) - 13.5).T
  angle, radius = np.degrees(np.arctan2(dy, dx)), np.hypot(dy, dx)
  if kind == 'rotation':
    np.testing.assert_allclose(radius, 9.0, atol=0.1)  # turned about the centre
    assert np.abs(angle).max() <= 15.0 + 0.5  # 0.5 degrees: resampling's blur, 0.08 pixel
    assert np.abs(angle).max() > 13.5 and angle.min() < 0 < angle.max()
  else:
    np.testing.assert_allclose(angle, 0.0, atol=0.5)  # along the radius only
    assert np.abs(radius / 9.0 - 1).max() <= 0.15 + 0.01
    assert (radius / 9.0 > 1.12).any() and (radius / 9.0 < 0.88).any()  # both ways


def test_each_affine_map_is_a_rotation_and_a_zoom_then_a_shift():
  """With all three ranges: the map's linear part is a rotation by an angle within
  max_rotation over a zoom within max_zoom (no shear, no stretch along one axis)."""
  keys = jax.random.split(jax.random.PRNGKey(4), 256)
  matrices = np.asarray(jax.vmap(lambda k: augment.random_affine(k, 2.0, 15.0, 0.15, 28))(
      keys), np.float64)
  linear = matrices[:, :2, :2]
  np.testing.assert_allclose(linear[:, 0, 0], linear[:, 1, 1], atol=1e-6)
  np.testing.assert_allclose(linear[:, 0, 1], -linear[:, 1, 0], atol=1e-6)
  zoom = 1 / np.hypot(linear[:, 0, 0], linear[:, 0, 1])
  angle = np.degrees(np.arctan2(linear[:, 0, 1], linear[:, 0, 0]))
  assert zoom.min() >= 0.85 - 1e-6 and zoom.max() <= 1.15 + 1e-6
  assert zoom.min() < 0.87 and zoom.max() > 1.13
  assert np.abs(angle).max() <= 15 + 1e-4 and angle.min() < -13 and angle.max() > 13
  np.testing.assert_array_equal(matrices[:, 2:, :], np.broadcast_to(np.eye(4)[2:], (256, 2, 4)))


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
  # Bit for bit optax's own; and in a program, the same with the peak an input of the
  # program (as the compiled train step takes it) as with the peak a constant in it.
  counts = jnp.arange(1001)
  np.testing.assert_array_equal(
      schedule(counts), optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000)(counts))
  constant_peak = jax.jit(lambda: schedule(counts))()
  traced_peak = jax.jit(
      lambda peak: train_state.learning_rate_schedule(config, 100, peak)(counts))
  np.testing.assert_array_equal(traced_peak(jnp.float32(1e-3)), constant_peak)
  constant = train_state.learning_rate_schedule(tiny_config('', learning_rate=3e-3), 100)
  assert float(constant(0)) == float(constant(999)) == 3e-3


# Jitted once for both cases, as the train step runs them (label_smoothing an input).
LOSS_FN = jax.jit(functools.partial(train.loss_fn, DeepDigitsCNN(), 1e-3))  # L2 weight 1e-3
EVALUATION_LOGITS = jax.jit(functools.partial(DeepDigitsCNN().apply, train=False))


@pytest.fixture(scope='module')
def network_variables():
  return jax.jit(lambda key: DeepDigitsCNN().init(key, jnp.zeros((1, 28, 28, 1)),
                                                  train=False))(jax.random.PRNGKey(0))


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_the_loss_is_smoothed_cross_entropy_plus_keras_l2(images, mnist, label_smoothing,
                                                          network_variables):
  """train.loss_fn against the formula in numpy, on the network's own training-mode
  logits: targets (1 - a) * one_hot + a / 10, plus 0.001 * the sum of squares of the
  three regularised kernels."""
  variables = network_variables
  params = variables['params']
  labels = jnp.asarray(mnist['test'].labels[:32])
  loss, (cross_entropy, l2, logits, _) = LOSS_FN(
      label_smoothing, params, variables['batch_stats'], jax.random.PRNGKey(1), images,
      labels)
  # Training mode: batch statistics and dropout, not the evaluation network.
  assert not np.allclose(logits, EVALUATION_LOGITS(variables, images), atol=1e-3)
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  targets = (1 - label_smoothing) * np.eye(10)[np.asarray(labels)] + label_smoothing / 10
  expected_cross_entropy = -(targets * log_p).sum(1).mean()
  expected_l2 = 1e-3 * sum(np.square(np.asarray(params[name]['kernel'], np.float64)).sum()
                           for name in ('conv4', 'dense1', 'dense2'))
  np.testing.assert_allclose(cross_entropy, expected_cross_entropy, rtol=1e-5)
  np.testing.assert_allclose(l2, expected_l2, rtol=1e-5)
  np.testing.assert_allclose(loss, expected_cross_entropy + expected_l2, rtol=1e-5)


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
                    {'warmup_epochs': 5.0}, {'augment_elastic_probability': 0.0},
                    {'augment_elastic_probability': 1.5}, {'augment_clean_epochs': -1},
                    {'augment_clean_epochs': 1}):  # tiny_config trains 1 epoch
    with pytest.raises(ConfigError):
      config_checks.check_values(tiny_config('', **overrides))


def test_a_run_with_the_whole_recipe_evaluates_the_averaged_weights(tiny_mnist_dir, tmp_path):
  config = tiny_config(tiny_mnist_dir, augment_max_shift=2.0, augment_max_rotation=10.0,
                       augment_max_zoom=0.1, augment_elastic_alpha=34.0,
                       label_smoothing=0.1, lr_schedule='cosine',
                       warmup_epochs=0.5, ema_decay=0.99, num_epochs=2,
                       train_subset=256, bn_recalibration_batches=2)
  record = train.train_and_evaluate(config, str(tmp_path))
  assert record['learning_rate'] < 1e-4  # cosine decayed to about 0 at the last step
  trained = inference.load_trained(str(tmp_path))
  raw = inference.load_trained(str(tmp_path), recalibrate=False)
  test = inference.load_datasets(config)['test']
  # The averaged weights with recalibrated statistics, and with their running averages.
  for loaded, key in ((trained, 'test_accuracy_recalibrated'), (raw, 'test_accuracy')):
    logits = inference.predict_logits(loaded, test.images)
    np.testing.assert_allclose(np.mean(logits.argmax(-1) == test.labels), record[key],
                               atol=1e-6)
  # The averaged weights differ from the last trained ones.
  state = checkpointing.restore_latest(
      checkpointing.make_manager(str(tmp_path), 3),
      train_state.abstract_train_state(config, model_factory.make_model(config),
                                       sharding.make_mesh()))
  difference = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.ema['params'],
                            state.params)
  assert max(jax.tree.leaves(difference)) > 1e-4
  jax.tree.map(np.testing.assert_array_equal, trained.params, state.ema['params'])
  jax.tree.map(np.testing.assert_array_equal, raw.batch_stats, state.ema['batch_stats'])


def shipped_configs() -> dict:
  """Every config in configs/, by name, as main.py's --config=configs/NAME.py loads it."""
  return {path.stem: importlib.import_module(f'configs.{path.stem}').get_config()
          for path in sorted((REPO / 'configs').glob('*.py')) if path.stem != '__init__'}


def test_every_shipped_config_passes_the_checks_and_has_the_default_fields():
  configs = shipped_configs()
  assert {'default', 'mnist_best', 'mnist_tpu', 'cpu_quick'} <= set(configs)
  fields = set(configs['default'].keys())
  for name, config in configs.items():
    config_checks.check_values(config)
    assert set(config.keys()) == fields, name  # each derives from the default


def test_the_elastic_config_is_the_best_one_with_gentle_distortion_and_a_clean_epoch():
  configs = shipped_configs()
  best, elastic = configs['mnist_best'].to_dict(), configs['mnist_elastic'].to_dict()
  changed = {k: (best[k], elastic[k]) for k in best if best[k] != elastic[k]}
  assert changed == {'augment_elastic_alpha': (0.0, 20.0),
                     'augment_elastic_sigma': (4.0, 5.0), 'augment_clean_epochs': (0, 1)}
