"""Ensembles: the mean of softmax probabilities scored exactly, members found from a seeds
folder, one test set for all, and the command on two tiny trained runs."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from deepdigits import inference, preprocess, rundir
from deepdigits.data import load_datasets, read_idx_split
from deepdigits.errors import ConfigError
from deepdigits.metrics_log import MetricsLog
from deepdigits.tools import ensemble


def test_the_mean_of_probabilities_can_be_right_where_every_member_is_wrong():
  labels = np.array([0, 1, 2, 2])
  probs_a = np.array([[.6, .3, .1], [.5, .4, .1], [.1, .1, .8], [.5, .1, .4]])
  probs_b = np.array([[.35, .45, .2], [.1, .8, .1], [.2, .1, .7], [.1, .5, .4]])
  # Logits are log-probabilities up to a constant per row: softmax must undo it.
  logits_a = np.log(probs_a) + np.array([[3.], [-7.], [0.], [100.]])
  result = ensemble.combine([logits_a, np.log(probs_b)], labels)
  a, b = result['members']
  assert (a['errors'], b['errors'], a['accuracy'], b['accuracy']) == (2, 2, 0.5, 0.5)
  # Means [.475, .375, .15], [.3, .6, .1], [.15, .1, .75], [.3, .3, .4]: all right,
  # the last although both members are wrong there.
  assert result['ensemble']['accuracy'] == 1.0 and result['ensemble']['errors'] == 0
  assert result['ensemble']['examples'] == 4
  expected_loss = -np.mean(np.log([.475, .6, .75, .4]))
  assert result['ensemble']['loss'] == pytest.approx(expected_loss, rel=1e-12)
  assert a['loss'] == pytest.approx(-np.mean(np.log([.6, .4, .8, .4])), rel=1e-12)


def test_confident_members_give_a_finite_loss():
  labels = np.array([1])
  result = ensemble.combine([np.array([[0., -2000.]]), np.array([[-2000., 0.]])], labels)
  assert result['members'][0]['loss'] == 2000.0
  assert result['ensemble']['loss'] == pytest.approx(math.log(2), rel=1e-12)


@pytest.fixture
def runs(tiny_seeds_folder):
  """Two tiny runs (seeds 0 and 1) in one folder, recalibrated, with a validation slice."""
  return tiny_seeds_folder['root']


def test_a_folder_stands_for_its_workdirs(runs, tmp_path):
  members = [str(runs / 'seed=0'), str(runs / 'seed=1')]
  assert ensemble.expand_workdirs([str(runs)]) == members
  assert ensemble.expand_workdirs(members) == members
  assert ensemble.default_output(members) == str(runs / 'ensemble.json')
  with pytest.raises(ConfigError, match='is neither a training workdir'):
    ensemble.expand_workdirs([str(tmp_path)])
  with pytest.raises(ConfigError, match='seed=0 is given twice'):
    ensemble.expand_workdirs([str(runs), members[0]])


def test_members_must_share_the_test_set(runs, tmp_path, mnist_dir):
  other = tmp_path / 'other'
  shutil.copytree(runs / 'seed=0' / 'checkpoints', other / 'checkpoints')
  config = rundir.read_config(str(runs / 'seed=0'))
  config.data_dir = mnist_dir  # the full test set, not the tiny one
  rundir.write_config(str(other), config)
  with pytest.raises(ConfigError, match=r'is scored on another test set than .*seed=0 '
                                        r'\(10,000 and 300 images'):
    ensemble.evaluate_ensemble([str(runs / 'seed=0'), str(other)], say=lambda _: None)


def test_the_command_scores_members_and_their_mean(runs, tiny_mnist_dir):
  result = subprocess.run([sys.executable, '-m', 'deepdigits.tools.ensemble', str(runs)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  saved = json.loads((runs / 'ensemble.json').read_text())
  assert saved['checkpoint'] == 'latest'
  assert 'ensemble of 2 (latest checkpoints' in result.stdout

  test = read_idx_split(tiny_mnist_dir, 'test')
  probs = []
  for member in saved['members']:
    # Each member's accuracy is its run's own (recalibrated) test accuracy.
    record = MetricsLog(member['workdir']).records()[-1]
    assert member['accuracy'] == pytest.approx(record['test_accuracy_recalibrated'],
                                               abs=1e-9)
    assert member['errors'] == round((1 - member['accuracy']) * 300)
    assert member['step'] == record['step'] == 4
    logits = inference.predict_logits(inference.load_trained(member['workdir']),
                                      test.images)
    exp = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs.append(exp / exp.sum(-1, keepdims=True))
  mean = np.mean(probs, axis=0)
  expected_errors = int(np.sum(mean.argmax(-1) != test.labels))
  assert saved['ensemble']['errors'] == expected_errors
  assert saved['ensemble']['accuracy'] == (300 - expected_errors) / 300
  assert saved['ensemble']['examples'] == 300
  assert saved['ensemble']['loss'] == pytest.approx(
      -np.mean(np.log(mean[np.arange(300), test.labels])), rel=1e-5)
  assert f'{saved["ensemble"]["accuracy"]:.4f}, {expected_errors:,} errors of 300' in (
      result.stdout)

  # Both held out the same 128 training images: they are scored there too.
  validation = load_datasets(inference.load_trained(saved['members'][0]['workdir']).config)[
      'validation']
  assert len(validation) == 128
  probs = []
  for member in saved['members']:
    record = MetricsLog(member['workdir']).records()[-1]
    assert member['validation']['accuracy'] == pytest.approx(
        record['validation_accuracy_recalibrated'], abs=1e-9)
    logits = inference.predict_logits(inference.load_trained(member['workdir']),
                                      validation.images)
    exp = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs.append(exp / exp.sum(-1, keepdims=True))
  expected_errors = int(np.sum(np.mean(probs, axis=0).argmax(-1) != validation.labels))
  assert saved['validation']['errors'] == expected_errors
  assert saved['validation']['examples'] == 128
  assert f'on the validation slice: accuracy {(128 - expected_errors) / 128:.4f}' in (
      result.stdout)


def test_members_without_a_common_validation_slice_get_no_validation_scores(runs, tmp_path):
  other = tmp_path / 'other'
  shutil.copytree(runs / 'seed=1' / 'checkpoints', other / 'checkpoints')
  config = rundir.read_config(str(runs / 'seed=1'))
  config.validation_size = 64  # another slice: the last 64 training images
  rundir.write_config(str(other), config)
  said = []
  result = ensemble.evaluate_ensemble([str(runs / 'seed=0'), str(other)], say=said.append)
  assert result['validation'] is None
  assert 'validation' not in result['members'][0]
  assert any('did not hold out the same validation slice' in line for line in said)
  assert result['ensemble']['examples'] == 300
  assert 'val. acc' not in ensemble.format_result(result)


def test_members_with_normalised_widths_each_see_their_own_images(runs, tmp_path,
                                                                   tiny_mnist_dir):
  other = tmp_path / 'width14'  # seed 1's weights, recorded as trained on 14-pixel widths
  shutil.copytree(runs / 'seed=1' / 'checkpoints', other / 'checkpoints')
  config = rundir.read_config(str(runs / 'seed=1'))
  config.width_normalization = 14
  rundir.write_config(str(other), config)
  result = ensemble.evaluate_ensemble([str(runs / 'seed=0'), str(other)],
                                      say=lambda _: None)
  test = read_idx_split(tiny_mnist_dir, 'test')
  trained = inference.load_trained(str(other))
  seen = inference.predict_logits(trained, preprocess.normalize_width(test.images, 14))
  unseen = inference.predict_logits(trained, test.images)
  assert not np.array_equal(seen.argmax(-1), unseen.argmax(-1))  # the test can tell
  assert result['members'][1]['errors'] == int(np.sum(seen.argmax(-1) != test.labels))
  # The validation slice is the same as stored, so the pair is scored on it too.
  assert result['validation'] is not None and result['validation']['examples'] == 128


def test_the_command_stops_on_a_folder_without_runs(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'deepdigits.tools.ensemble', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"deepdigits: error: '{tmp_path}' is neither a training workdir (no config.json) "
      'nor a folder of them (a seeds or sweep folder).')
