"""A trained run leaves as a StableHLO artifact, a Keras file and an ONNX model, each
giving this codebase's predictions when loaded by a process that imports jax, Keras or
onnxruntime only."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from deepdigits import inference, rundir
from deepdigits.data import read_idx_split
from deepdigits.errors import ConfigError
from deepdigits.tools import export, keras_weights

os.environ['KERAS_BACKEND'] = 'jax'  # before keras is imported: no TensorFlow needed
pytest.importorskip('keras', reason="the Keras export needs Keras 3 (pip install -e '.[export]')")
for module in ('jax2onnx', 'onnxruntime'):
  pytest.importorskip(module, reason="the ONNX export needs jax2onnx and its tests "
                      "onnxruntime (pip install -e '.[dev]')")
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:keras.*')

# Loads the three files with jax, Keras and onnxruntime alone and prints their outputs as
# JSON: the test digits in, logits (StableHLO, ONNX) and probabilities (Keras) out.
OUTSIDE = '''
import json, os, sys
os.environ['KERAS_BACKEND'] = 'jax'
import jax, keras, numpy as np, onnxruntime
images = np.load(sys.argv[3])
session = onnxruntime.InferenceSession(sys.argv[4])
onnx_logits = [session.run(['logits'], {'images': batch})[0] for batch in (images[:37], images)]
onnx_input = session.get_inputs()[0]
exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
logits = [np.asarray(exported.call(images[:37])), np.asarray(exported.call(images))]
model = keras.saving.load_model(sys.argv[2])
probabilities = model.predict(images.astype(np.float32) / 255.0, verbose=0)
assert not any(m.startswith('deepdigits') for m in sys.modules), 'deepdigits was imported'
print(json.dumps({'logits_37': logits[0].tolist(), 'logits': logits[1].tolist(),
                  'probabilities': probabilities.tolist(),
                  'input': str(exported.in_avals[0]),
                  'onnx_logits_37': onnx_logits[0].tolist(), 'onnx_logits': onnx_logits[1].tolist(),
                  'onnx_input': [onnx_input.name, onnx_input.type, onnx_input.shape]}))
'''


@pytest.fixture(scope='module')
def exported(tiny_trained_workdir, tiny_mnist_dir, tmp_path_factory):
  directory = tmp_path_factory.mktemp('export')
  paths = {'stablehlo': str(directory / 'model.jax'), 'keras': str(directory / 'model.keras'),
           'onnx': str(directory / 'model.onnx')}
  lines = {fmt: export.export_workdir(tiny_trained_workdir, fmt, path)
           for fmt, path in paths.items()}
  images = read_idx_split(tiny_mnist_dir, 'test').images
  np.save(directory / 'images.npy', images)
  result = subprocess.run([sys.executable, '-c', OUTSIDE, paths['stablehlo'], paths['keras'],
                           str(directory / 'images.npy'), paths['onnx']], cwd=directory,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  outside = json.loads(result.stdout.strip().splitlines()[-1])
  trained = inference.load_trained(tiny_trained_workdir)  # recalibrated, as the run was
  return {'paths': paths, 'lines': lines, 'outside': outside, 'trained': trained,
          'ours': inference.predict_logits(trained, images), 'workdir': tiny_trained_workdir}


def test_the_stablehlo_artifact_runs_with_jax_alone_on_any_batch_size(exported):
  outside, ours = exported['outside'], exported['ours']
  assert outside['input'] == 'uint8[batch,28,28,1]'  # the batch dimension symbolic
  # Float32 rounding apart (one device there, eight here, other batch sizes): 1e-4.
  np.testing.assert_allclose(outside['logits'], ours, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outside['logits_37'], ours[:37], rtol=1e-4, atol=1e-4)
  assert (np.argmax(outside['logits'], -1) == ours.argmax(-1)).all()
  assert exported['lines']['stablehlo'] == (
      f'wrote the latest checkpoint of {exported["workdir"]} (step 16) as stablehlo to '
      f'{exported["paths"]["stablehlo"]}')


def test_the_onnx_model_runs_in_onnxruntime_on_any_batch_size(exported):
  outside, ours = exported['outside'], exported['ours']
  assert outside['onnx_input'] == ['images', 'tensor(uint8)', ['N', 28, 28, 1]]
  np.testing.assert_allclose(outside['onnx_logits'], ours, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outside['onnx_logits_37'], ours[:37], rtol=1e-4, atol=1e-4)
  assert (np.argmax(outside['onnx_logits'], -1) == ours.argmax(-1)).all()
  assert exported['lines']['onnx'].endswith(f'as onnx to {exported["paths"]["onnx"]}')


def test_the_keras_file_predicts_as_we_do_and_reads_back_to_the_same_weights(exported):
  probabilities = jax.nn.softmax(exported['ours'].astype(np.float64))
  np.testing.assert_allclose(exported['outside']['probabilities'], probabilities, atol=1e-5)
  back = keras_weights.load_keras_weights(exported['paths']['keras'])
  trained = exported['trained']
  for ours, theirs in ((trained.params, back['params']),
                       (trained.batch_stats, back['batch_stats'])):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_array_equal(np.asarray(a), b)  # the recalibrated statistics too


def test_bad_requests_are_one_clear_error(tiny_trained_workdir, tmp_path):
  with pytest.raises(ConfigError, match=r'^--out=.*model\.h5: a Keras model file must end '
                                        r'in \.keras\.$'):
    export.export_workdir(tiny_trained_workdir, 'keras', str(tmp_path / 'model.h5'))
  missing = tmp_path / 'missing' / 'model.jax'
  with pytest.raises(ConfigError) as error:
    export.export_workdir(tiny_trained_workdir, 'stablehlo', str(missing))
  assert str(error.value) == (f'--out={missing}: the folder {missing.parent} does not '
                              'exist; create it first.')
  with pytest.raises(ConfigError, match=r'^--format=tflite: use one of stablehlo, keras, '
                                        r'onnx\.$'):
    export.export_workdir(tiny_trained_workdir, 'tflite', str(tmp_path / 'model.tflite'))
  widths = tmp_path / 'widths'  # the run's weights, recorded as trained on 14-pixel widths
  (widths / 'checkpoints').mkdir(parents=True)
  config = rundir.read_config(tiny_trained_workdir)
  config.width_normalization = 14
  rundir.write_config(str(widths), config)
  shutil.copytree(f'{tiny_trained_workdir}/checkpoints', widths / 'checkpoints',
                  dirs_exist_ok=True)
  with pytest.raises(ConfigError, match='rescaled to 14 pixels wide'):
    export.export_workdir(str(widths), 'stablehlo', str(tmp_path / 'model.jax'))
  assert not (tmp_path / 'model.jax').exists()


def test_the_command_writes_the_file(tiny_trained_workdir, tmp_path):
  out = tmp_path / 'model.jax'
  result = subprocess.run([sys.executable, '-m', 'deepdigits.tools.export',
                           f'--workdir={tiny_trained_workdir}', '--format=stablehlo',
                           f'--out={out}'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == (f'wrote the latest checkpoint of {tiny_trained_workdir} '
                                   f'(step 16) as stablehlo to {out}')
  assert out.stat().st_size > 10_000_000  # the 2.6M float32 weights inside
