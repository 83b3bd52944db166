"""main.py as a user runs it: config overrides, clear errors, and real training."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO


def run_main(*args, devices=8, timeout=600):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir):
  return [json.loads(line) for line in
          (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def test_overrides_take_effect(tiny_mnist_dir, tmp_path):
  result = run_main('--config=configs/mnist_tpu.py', f'--workdir={tmp_path}',
                    f'--config.data_dir={tiny_mnist_dir}', '--config.num_epochs=2',
                    '--config.batch_size=128', '--config.train_subset=256',
                    '--config.eval_batch_size=160', '--config.learning_rate=3e-3',
                    '--config.seed=1')
  assert result.returncode == 0, result.stderr[-2000:]
  records = read_metrics(tmp_path)
  assert [r['epoch'] for r in records] == [1, 2]
  assert [r['step'] for r in records] == [2, 4]  # 256 images / 128 per step
  assert records[-1]['test_examples'] == 300
  assert '2 epochs x 2 steps of 128 images' in result.stdout
  for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'epoch_seconds', 'train_images_per_second'):
    assert isinstance(records[-1][key], float), key
  assert 'epoch   2  step      4' in result.stdout


@pytest.mark.parametrize('override,message', [
    ('--config.learnin_rate=3e-3',
     '--config.learnin_rate is not a config field. Did you mean "learning_rate"'),
    ('--config=configs/no_such_config.py', 'configs/no_such_config.py'),
    ('--config.batch_size=abc', 'batch_size'),
    ('--config.num_epochs=-2', 'num_epochs=-2 must be > 0'),
    ('--config.num_epochs=0', 'num_epochs=0 must be > 0'),
    ('--config.seed=4294967296', 'seed=4294967296 must be in [0, 2**32)'),
    ('--config.batch_size=100', 'batch_size=100 does not divide by the 8 devices'),
    ('--config.data_dir=/nonexistent/mnist', "'/nonexistent/mnist' is not a directory"),
    ('--config.data_source=tfds', 'tensorflow-datasets could not load mnist'),
    ('--config.data_source=csv', "--config.data_source='csv': use one of ('idx', 'tfds')"),
])
def test_bad_input_stops_with_one_clear_error(override, message, tmp_path, tiny_mnist_dir):
  # An empty TFDS folder: offline, tensorflow-datasets has nothing to read.
  result = run_main('--config=configs/mnist_tpu.py', f'--workdir={tmp_path / "run"}',
                    f'--config.data_dir={tiny_mnist_dir}',
                    f'--config.tfds_data_dir={tmp_path / "tfds"}', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_end_to_end_on_real_mnist_reaches_95_percent(mnist_dir, tmp_path):
  # 128 steps of 64 images from the first 8,192 training images; all 10,000 test
  # images scored. A broken model or pipeline cannot reach 95%. One device, as a user
  # on this CPU runs it (the 8-device equivalence is tested in test_train.py).
  result = run_main('--config=configs/cpu_quick.py', f'--workdir={tmp_path}',
                    f'--config.data_dir={mnist_dir}', '--config.num_epochs=1',
                    '--config.train_subset=8192', '--config.batch_size=64', devices=1)
  assert result.returncode == 0, result.stderr[-2000:]
  (record,) = read_metrics(tmp_path)
  assert record['step'] == 128 and record['test_examples'] == 10_000
  assert record['test_accuracy_recalibrated'] >= 0.95, record
  assert (tmp_path / 'checkpoints' / '128').is_dir()
