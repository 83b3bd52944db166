"""main.py as a user runs it: config overrides, clear errors, and real training."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import DEVICES, REPO, xla_flags
from deepdigits import checkpointing, model_factory, rundir, sharding, train_state
from deepdigits.ops import batch_norm, onednn_conv


def run_main(*args, devices=None, test_compile=True, timeout=600):
  """main.py in a subprocess, on this process's devices unless `devices` fake CPU ones;
  compiled as the tests compile (conftest.TEST_COMPILE_FLAGS) unless not `test_compile`."""
  env = dict(os.environ)
  if devices or not test_compile:
    env['XLA_FLAGS'] = xla_flags(devices or DEVICES, test_compile)
  return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir):
  return [json.loads(line) for line in
          (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def test_overrides_take_effect(tiny_mnist_dir, tmp_path):
  # The train step of test_sweep.py's second point: compiled once for both.
  result = run_main('--config=configs/mnist_tpu.py', f'--workdir={tmp_path}',
                    f'--config.data_dir={tiny_mnist_dir}', '--config.num_epochs=2',
                    '--config.batch_size=64', '--config.train_subset=256',
                    '--config.eval_batch_size=64', '--config.learning_rate=3e-3',
                    '--config.seed=1')
  assert result.returncode == 0, result.stderr[-2000:]
  records = read_metrics(tmp_path)
  assert [r['epoch'] for r in records] == [1, 2]
  assert [r['step'] for r in records] == [4, 8]  # 256 images / 64 per step
  assert records[-1]['test_examples'] == 300
  assert '2 epochs x 4 steps of 64 images' in result.stdout
  assert ('DeepDigitsCNN: 2,624,394 numbers (2,621,898 trained parameters + 2,496 '
          'BatchNorm running statistics), dtype float32') in result.stdout
  # The record's fields, as docs/commands.md lists them (no validation slice and no
  # recalibration in this config, so none of their fields).
  assert set(records[-1]) == {
      'epoch', 'step', 'train_loss', 'train_l2_penalty', 'train_accuracy', 'test_loss',
      'test_accuracy', 'test_examples', 'epoch_seconds', 'train_seconds',
      'train_images_per_second', 'learning_rate', 'host_memory_mib'}
  for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'epoch_seconds', 'train_images_per_second'):
    assert isinstance(records[-1][key], float), key
  assert 0 <= records[-1]['train_accuracy'] <= 1 and 0 <= records[-1]['test_accuracy'] <= 1
  assert 'epoch   2  step      8' in result.stdout
  # The learning rate and the seed reached the run: recorded, and used.
  recorded = json.loads((tmp_path / 'config.json').read_text())
  assert (recorded['learning_rate'], recorded['seed']) == (3e-3, 1)
  assert records[-1]['learning_rate'] == 3e-3  # the schedule's value at the last step
  config = rundir.read_config(str(tmp_path))
  trained = checkpointing.restore_latest(
      checkpointing.make_manager(str(tmp_path), 3),
      train_state.abstract_train_state(config, model_factory.make_model(config),
                                       sharding.make_mesh()))
  seeded = lambda seed: jax.random.split(jax.random.PRNGKey(seed))[1]  # the dropout key
  np.testing.assert_array_equal(trained.rng, seeded(1))
  assert not np.array_equal(trained.rng, seeded(0))


IDX_HINT = ('Point --config.data_dir at a folder with the four MNIST IDX files '
            '(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, '
            't10k-labels-idx1-ubyte, each raw or .gz), or leave it empty to download them.')


# Each a path through main.py to its one line: flag parsing (a typo, a missing file, a
# value of the wrong type), the config's values, the devices, the data. (Every value
# check is tested in-process in test_train.py; the data's in test_data.py.)
@pytest.mark.parametrize('override,line', [
    ('--config.learnin_rate=3e-3', '--config.learnin_rate is not a config field. Did you '
     'mean "learning_rate" instead of "learnin_rate"?'),
    ('--config=configs/no_such_config.py', '--config=configs/no_such_config.py: no such '
     'file.'),
    ('--config.batch_size=abc', "flag --config.batch_size=abc: invalid literal for int() "
     "with base 10: 'abc' (--helpfull lists the flags)."),
    ('--config.num_epochs=-2', '--config.num_epochs=-2 must be > 0.'),
    ('--config.batch_size=100', 'batch_size=100 does not divide by the 8 devices; use a '
     'multiple of 8, e.g. --config.batch_size=96.'),
    ('--config.data_dir=/nonexistent/mnist', "data_dir '/nonexistent/mnist' is not a "
     f'directory. {IDX_HINT}'),
    ('--config.data_source=tfds', 'tensorflow-datasets could not load mnist (it is not '
     'prepared in the TFDS data folder, and preparing it needs TensorFlow, which is not '
     'installed). Use --config.data_source=idx (the default: the IDX files, downloaded '
     'if needed), or on a machine with network `pip install -e ".[tfds]"` lets '
     'tensorflow-datasets download and prepare it once.'),
])
def test_bad_input_stops_with_one_clear_error(override, line, tmp_path, tiny_mnist_dir):
  # An empty TFDS folder: offline, tensorflow-datasets has nothing to read. Eight
  # devices, for the batch size that does not divide by them.
  result = run_main('--config=configs/mnist_tpu.py', f'--workdir={tmp_path / "run"}',
                    f'--config.data_dir={tiny_mnist_dir}',
                    f'--config.tfds_data_dir={tmp_path / "tfds"}', override, devices=8)
  assert result.returncode == 1
  assert result.stderr.strip() == f'deepdigits: error: {line}'
  if override != '--config.data_source=tfds':  # its check is reading the TFDS folder
    assert not (tmp_path / 'run').exists()  # stopped before the workdir was made


def test_a_bad_config_is_reported_before_the_data_is_read_or_the_workdir_made(tmp_path):
  """A bad value, a data folder that is not one and a workdir that does not exist yet:
  the config's error comes first, and nothing is created."""
  result = run_main('--config=configs/mnist_tpu.py', f'--workdir={tmp_path / "new" / "run"}',
                    f'--config.data_dir={tmp_path / "no_data"}',
                    '--config.learning_rate=-1.0', devices=1, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip() == 'deepdigits: error: --config.learning_rate=-1.0 must be > 0.'
  assert os.listdir(tmp_path) == []


def test_end_to_end_on_real_mnist_reaches_95_percent(mnist_dir, tmp_path):
  # 128 steps of 64 images from the first 8,192 training images; all 10,000 test
  # images scored. A broken model or pipeline cannot reach 95%. One device and XLA's
  # default compile, as a user on this CPU runs it (the 8-device equivalence is tested
  # in test_train.py).
  result = run_main('--config=configs/cpu_quick.py', f'--workdir={tmp_path}',
                    f'--config.data_dir={mnist_dir}', '--config.num_epochs=1',
                    '--config.train_subset=8192', '--config.batch_size=64', devices=1,
                    test_compile=False)
  assert result.returncode == 0, result.stderr[-2000:]
  # With the oneDNN convolutions built, `auto` trains conv1-2 with them here (one CPU
  # device), conv3 too where they are AVX-512 kernels, and the rest as Winograd tiles.
  if onednn_conv.is_available() or os.environ.get('DEEPDIGITS_REQUIRE_ONEDNN'):
    conv3 = 'onednn' if onednn_conv.has_avx512_kernels() else 'winograd'
    bn = 'native' if batch_norm.kernel_problem() else 'kernel'
    assert (f', conv onednn,onednn,{conv3},winograd, pool strided_views, ReLU-BatchNorm {bn} '
            '(evaluation: conv native') in result.stdout
  (record,) = read_metrics(tmp_path)
  assert record['step'] == 128 and record['test_examples'] == 10_000
  assert record['test_accuracy_recalibrated'] >= 0.95, record
  assert (tmp_path / 'checkpoints' / '128').is_dir()
