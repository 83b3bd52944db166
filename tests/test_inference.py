"""A trained workdir reloads into a model whose predictions match the run's evaluation."""


import numpy as np
import pytest

from conftest import tiny_config
from deepdigits import inference, rundir, train
from deepdigits.data import read_idx_split
from deepdigits.errors import CheckpointError, ConfigError


def test_load_trained_reproduces_the_runs_test_accuracy(tiny_mnist_dir, tmp_path):
  config = tiny_config(tiny_mnist_dir, bn_recalibration_batches=4)
  record = train.train_and_evaluate(config, str(tmp_path))
  assert rundir.read_config(str(tmp_path)).to_dict() == config.to_dict()

  test = read_idx_split(tiny_mnist_dir, 'test')
  for recalibrate, key in ((True, 'test_accuracy_recalibrated'), (False, 'test_accuracy')):
    trained = inference.load_trained(str(tmp_path), recalibrate=recalibrate)
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
