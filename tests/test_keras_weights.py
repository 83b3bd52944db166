"""The original Keras model's weights give the same predictions in DeepDigitsCNN.

The original Keras Sequential is built with Keras 3 on its JAX backend (no
TensorFlow), given random weights and BatchNorm statistics, saved in each format, and
its logits compared with the Flax model's on real MNIST test digits.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from deepdigits import inference, model_factory, rundir
from deepdigits.data import scale_images
from deepdigits.errors import CheckpointError, KerasWeightsError
from deepdigits.tools import export, keras_weights

os.environ['KERAS_BACKEND'] = 'jax'  # before keras is imported: no TensorFlow needed
keras = pytest.importorskip('keras')
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:keras.*')


def original_keras_model():
  """The DeepDigits_AI network exactly as the original Keras Sequential (the one
  definition of it, which the Keras export writes)."""
  return export.keras_sequential()


@pytest.fixture(scope='module')
def keras_files(tmp_path_factory, mnist):
  """The three saved forms of one random Keras model, its softmax outputs and logits
  on 100 real test digits."""
  keras.utils.set_random_seed(0)
  model = original_keras_model()
  rng = np.random.default_rng(0)
  weights = []
  for layer in model.layers:
    arrays = layer.get_weights()
    if isinstance(layer, keras.layers.BatchNormalization):
      n = arrays[0].shape
      arrays = [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                rng.uniform(0.5, 2.0, n)]  # gamma, beta, moving mean, moving variance
    elif arrays:
      arrays = [arrays[0], rng.normal(0, 0.1, arrays[1].shape)]  # Glorot kernel, bias
    weights += arrays
  model.set_weights([np.asarray(w, np.float32) for w in weights])
  assert model.count_params() == 2_624_394

  directory = tmp_path_factory.mktemp('keras')
  paths = {'weights.h5': str(directory / 'model.weights.h5'),
           'keras': str(directory / 'model.keras'), 'legacy h5': str(directory / 'model.h5')}
  model.save_weights(paths['weights.h5'])
  model.save(paths['keras'])
  model.save(paths['legacy h5'])

  images = mnist['test'].images[:100]
  x = np.asarray(scale_images(images))
  probabilities = model.predict(x, verbose=0)
  model.layers[-1].activation = keras.activations.linear
  logits = np.asarray(model(x, training=False))
  np.testing.assert_allclose(jax.nn.softmax(logits), probabilities, atol=1e-6)
  return {'paths': paths, 'images': images, 'logits': logits}


def test_a_keras_file_saved_by_a_process_that_built_other_models_reads_the_same(
    keras_files, tmp_path):
  """Keras then names the layers conv2d_4, ... in config.json, while the weights file
  keeps conv2d, ...: the arrays are found all the same."""
  first = keras_weights.load_keras_weights(keras_files['paths']['keras'])
  again = export.keras_sequential()  # a second model of this process: conv2d_4, ...
  again.set_weights(keras.saving.load_model(keras_files['paths']['keras']).get_weights())
  assert again.layers[0].name != 'conv2d'
  again.save(tmp_path / 'again.keras')
  for a, b in zip(jax.tree.leaves(first),
                  jax.tree.leaves(keras_weights.load_keras_weights(str(tmp_path / 'again.keras')))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('form', ['weights.h5', 'keras', 'legacy h5'])
def test_flax_logits_match_keras(keras_files, form):
  variables = keras_weights.load_keras_weights(keras_files['paths'][form])
  assert sum(x.size for x in jax.tree.leaves(variables)) == 2_624_394
  model = model_factory.make_model(tiny_config(''), differentiated=False)
  logits = model.apply(variables, scale_images(keras_files['images']), train=False)
  assert np.ptp(keras_files['logits']) > 0.5  # the comparison is not of near-constants
  np.testing.assert_allclose(logits, keras_files['logits'], atol=1e-4, rtol=1e-4)


def test_the_written_workdir_predicts_like_keras(keras_files, tmp_path):
  config = tiny_config('')
  variables = keras_weights.load_keras_weights(keras_files['paths']['keras'])
  path = keras_weights.write_workdir(variables, config, str(tmp_path))
  assert path == str(tmp_path / 'checkpoints' / '0')
  assert rundir.read_config(str(tmp_path)).to_dict() == config.to_dict()
  trained = inference.load_trained(str(tmp_path))
  logits = inference.predict_logits(trained, keras_files['images'], batch_size=48)
  np.testing.assert_allclose(logits, keras_files['logits'], atol=1e-4, rtol=1e-4)
  with pytest.raises(CheckpointError, match='already holds checkpoints'):
    keras_weights.write_workdir(variables, config, str(tmp_path))


def test_the_command_writes_a_workdir(keras_files, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.keras_weights', '--config=configs/default.py',
       f'--keras_weights={keras_files["paths"]["weights.h5"]}', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'to {tmp_path}/checkpoints/0' in result.stdout
  assert os.path.isfile(tmp_path / 'config.json')


def test_files_that_do_not_fit_are_one_clear_error(keras_files, tmp_path):
  def error(path):
    with pytest.raises(KerasWeightsError) as e:
      keras_weights.load_keras_weights(str(path))
    assert '\n' not in str(e.value)
    return str(e.value)

  assert 'no such file' in error(tmp_path / 'missing.h5')
  (tmp_path / 'notes.txt').write_text('hello')
  assert 'neither an HDF5 file' in error(tmp_path / 'notes.txt')
  with zipfile.ZipFile(tmp_path / 'other.keras', 'w') as archive:
    archive.writestr('config.json', '{}')
  assert 'a zip without model.weights.h5' in error(tmp_path / 'other.keras')
  with h5py.File(tmp_path / 'empty.h5', 'w') as h5:
    h5.create_group('something')
  assert 'not one Keras wrote' in error(tmp_path / 'empty.h5')

  wrong = tmp_path / 'wrong.weights.h5'
  shutil.copy(keras_files['paths']['weights.h5'], wrong)
  with h5py.File(wrong, 'r+') as h5:
    del h5['layers/dense_2/vars/0']
    h5['layers/dense_2/vars/0'] = np.zeros((256, 11), np.float32)
  assert error(wrong).endswith("Keras layer 'dense_2' (logits here) has a kernel of shape "
                               '(256, 11); DeepDigits needs (256, 10).')
  with h5py.File(wrong, 'r+') as h5:
    del h5['layers/conv2d_3']
  assert 'has 3 Conv2D layers (conv2d, conv2d_1, conv2d_2); DeepDigits has 4' in error(wrong)
