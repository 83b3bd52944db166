"""`main.py --mode=evaluate` and `inference.evaluate_workdir`: a trained workdir's
checkpoint scored again gives the run's own numbers; a folder that is not one is one
clear line."""

import json
import re

import pytest
from test_main import run_main

from conftest import tiny_config
from deepdigits import config_checks, inference, model_factory, rundir
from deepdigits.errors import CheckpointError
from deepdigits.metrics_log import MetricsLog


@pytest.fixture
def run(tiny_validated_workdir):
  """A tiny run of 2 epochs, recalibrated, with a validation slice (so a best checkpoint)."""
  return tiny_validated_workdir


def test_the_command_prints_the_runs_final_numbers(run):
  result = run_main(f'--workdir={run}', '--mode=evaluate')
  assert result.returncode == 0, result.stderr[-2000:]
  record = MetricsLog(str(run)).records()[-1]
  assert f'{run}: latest checkpoint, step 8 (epoch 2)' in result.stdout
  printed = {}
  for split, loss, accuracy, errors, examples, stats in re.findall(
      r'^(test|validation) +loss (\S+)  accuracy (\S+)  errors (\d+) of (\d+)  '
      r'\((running|recalibrated) BatchNorm statistics\)$', result.stdout, re.M):
    suffix = '_recalibrated' if stats == 'recalibrated' else ''
    printed[f'{split}{suffix}'] = (float(loss), float(accuracy), int(errors), int(examples))
  assert sorted(printed) == ['test', 'test_recalibrated', 'validation',
                             'validation_recalibrated']
  for key, (loss, accuracy, errors, examples) in printed.items():
    split, _, suffix = key.partition('_')
    suffix = f'_{suffix}' if suffix else ''
    assert accuracy == round(record[f'{split}_accuracy{suffix}'], 4), key
    assert loss == round(record[f'{split}_loss{suffix}'], 4), key
    assert examples == record[f'{split}_examples'] == {'test': 300, 'validation': 128}[split]
    assert errors == round((1 - record[f'{split}_accuracy{suffix}']) * examples), key


def test_the_best_checkpoint_gives_the_numbers_of_its_epoch(run):
  records = MetricsLog(str(run)).records()
  best = [r for r in records if r.get('best_checkpoint')][-1]
  result = inference.evaluate_workdir(str(run), checkpoint='best')
  assert (result['step'], result['epoch'], result['checkpoint']) == (
      best['step'], best['epoch'], 'best')
  for key in ('test_accuracy', 'test_loss', 'test_accuracy_recalibrated',
              'validation_accuracy', 'validation_accuracy_recalibrated'):
    assert result[key] == pytest.approx(best[key], abs=1e-6), key
  assert result['test_errors'] == round((1 - best['test_accuracy']) * 300)
  assert result['test_examples'] == 300 and result['validation_examples'] == 128


@pytest.mark.parametrize('args,message', [
    (['--mode=evaluate'],
     "{dir}/config.json not found: '{dir}' is not the workdir of a training run."),
    ([], '--config is required to train (or give --mode=evaluate to score a trained '
         'workdir).'),
    (['--config=configs/cpu_quick.py', '--checkpoint=best'],
     '--checkpoint is for --mode=evaluate.'),
])
def test_a_folder_that_is_not_a_trained_run_is_one_clear_error(args, message, tmp_path):
  result = run_main(f'--workdir={tmp_path}', *args, devices=1, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip() == 'deepdigits: error: ' + message.format(dir=tmp_path)


@pytest.mark.parametrize('checkpoint,message', [
    ('latest', 'no {dir}/checkpoints; train there first.'),
    ('best', 'no {dir}/best_checkpoint (a best checkpoint is kept only with '
             '--config.validation_size > 0); train there first.'),
])
def test_a_workdir_with_nothing_trained_has_nothing_to_evaluate(checkpoint, message,
                                                                tmp_path):
  rundir.write_config(str(tmp_path), tiny_config(''))
  with pytest.raises(CheckpointError) as error:
    inference.evaluate_workdir(str(tmp_path), checkpoint=checkpoint)
  assert str(error.value) == message.format(dir=tmp_path)


def test_a_config_recorded_before_later_fields_reads_with_their_old_values(tmp_path):
  recorded = tiny_config('').to_dict()
  for field in list(rundir.LATER_FIELDS) + ['data_source']:
    del recorded[field]
  recorded['input_pipeline'] = recorded.pop('feed')  # the field's name before 'feed'
  recorded['input_pipeline'] = 'host'
  (tmp_path / rundir.CONFIG_NAME).write_text(json.dumps(recorded))
  config = rundir.read_config(str(tmp_path))
  assert config.bn_group_size == 0 and config.width_normalization == 0
  assert config.feed == 'host' and 'input_pipeline' not in config
  assert config.data_source == 'tfds'  # an empty data_dir meant tensorflow-datasets then
  assert config.download and config.data_mirrors
  config_checks.check_values(config)
  assert model_factory.make_model(config).bn_group_size == 0
