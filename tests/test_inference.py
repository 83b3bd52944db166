"""A trained workdir reloads into a model whose predictions match the run's evaluation."""


import numpy as np
import pytest

from conftest import tiny_config
from deepdigits import inference, rundir
from deepdigits.data import read_idx_split
from deepdigits.errors import CheckpointError, ConfigError
from deepdigits.metrics_log import MetricsLog


def test_load_trained_reproduces_the_runs_test_accuracy(tiny_mnist_dir, tiny_trained_workdir):
  workdir = tiny_trained_workdir
  config = tiny_config(tiny_mnist_dir, num_epochs=2, bn_recalibration_batches=4)
  assert rundir.read_config(workdir).to_dict() == config.to_dict()
  record = MetricsLog(workdir).records()[-1]

  test = read_idx_split(tiny_mnist_dir, 'test')
  for recalibrate, key in ((True, 'test_accuracy_recalibrated'), (False, 'test_accuracy')):
    trained = inference.load_trained(workdir, recalibrate=recalibrate)
    assert trained.step == record['step']
    logits = inference.predict_logits(trained, test.images, batch_size=48)
    assert logits.shape == (len(test), 10)
    accuracy = np.mean(logits.argmax(-1) == test.labels)
    np.testing.assert_allclose(accuracy, record[key], atol=1e-6)


def test_a_folder_that_is_not_a_trained_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(ConfigError, match='config.json not found'):
    inference.load_trained(str(tmp_path))
  rundir.write_config(str(tmp_path), tiny_config(''))
  with pytest.raises(CheckpointError, match='checkpoints; train there first'):
    inference.load_trained(str(tmp_path))
