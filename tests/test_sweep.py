"""Sweeps: grids checked before any work, one workdir per point, ranked tables, and a
re-run that skips finished points."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from deepdigits import rundir, train
from deepdigits.errors import ConfigError, DeepDigitsError, NonFiniteError
from deepdigits.preemption import Preempted
from deepdigits.tools import sweep


def test_grid_points_are_the_cartesian_product_with_readable_names():
  grid = sweep.parse_grid(['learning_rate=1e-3,3e-3', 'batch_size=128,512',
                           'shuffle=false', 'data_dir=a/b'], tiny_config(''))
  assert grid == [('learning_rate', [1e-3, 3e-3]), ('batch_size', [128, 512]),
                  ('shuffle', [False]), ('data_dir', ['a/b'])]
  points = sweep.grid_points(grid)
  assert [sweep.point_name(p) for p in points] == [
      f'learning_rate={lr},batch_size={bs},shuffle=False,data_dir=a%2Fb'
      for lr in ('0.001', '0.003') for bs in (128, 512)]
  config = sweep.point_config(tiny_config(''), points[1])
  assert (config.learning_rate, config.batch_size) == (1e-3, 512)
  assert isinstance(sweep.parse_grid(['learning_rate=1'], config)[0][1][0], float)


@pytest.mark.parametrize('specs,message', [
    (['learning_rate'], "--grid 'learning_rate': expected 'field=value1,value2,...'"),
    (['=1,2'], "expected 'field=value1,value2,...'"),
    (['learnin_rate=1e-3'], '--grid learnin_rate: not a config field. Did you mean '
                            '"learning_rate"?'),
    (['batch_size=128,abc'], "--grid batch_size: 'abc' is not a int"),
    (['learning_rate=fast'], "'fast' is not a float"),
    (['shuffle=maybe'], "'maybe' is not a bool"),
    (['batch_size='], '--grid batch_size: no values after "="'),
    (['batch_size=128,,512'], "--grid batch_size: an empty value in '128,,512'"),
    (['learning_rate=1e-3,0.001'], 'the values 1e-3, 0.001 are the same value'),
    (['seed=1', 'seed=2'], '--grid seed: given twice'),
    ([], 'give at least one --grid'),
])
def test_malformed_grids_are_one_clear_error(specs, message):
  with pytest.raises(ConfigError) as e:
    sweep.parse_grid(specs, tiny_config(''))
  assert message in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.devices(8)
def test_every_point_is_checked_before_anything_runs(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a: calls.append(a))
  for specs, message in (
      (['learning_rate=1e-3,-1'], 'point learning_rate=-1.0: --config.learning_rate=-1.0 '
                                  'must be > 0'),
      (['batch_size=64,100'], 'point batch_size=100: batch_size=100 does not divide by '
                              'the 8 devices')):
    with pytest.raises(ConfigError, match=message):
      sweep.run_sweep(tiny_config(''), str(tmp_path), specs, say=lambda _: None)
  assert not calls
  assert not os.listdir(tmp_path)


def test_a_rerun_from_another_folder_or_with_other_output_fields_is_the_same_config(
    tmp_path, monkeypatch):
  """config.json records data folders as absolute paths; the same command, a relative
  --config.data_dir and another --config.progress must still match it."""
  data_dir = tmp_path / 'mnist'
  data_dir.mkdir()
  monkeypatch.chdir(tmp_path)
  config = tiny_config('mnist')
  rundir.prepare(str(tmp_path / 'run'))
  rundir.write_config(str(tmp_path / 'run'), config)
  recorded = rundir.read_config(str(tmp_path / 'run')).to_dict()
  assert recorded['data_dir'] == str(data_dir)
  config.progress = not config.progress
  assert rundir.config_differences(recorded, rundir.recorded_config(config)) == []
  config.learning_rate *= 2
  assert rundir.config_differences(recorded, rundir.recorded_config(config)) == [
      f'learning_rate={recorded["learning_rate"]!r} there, '
      f'{config.learning_rate!r} now']


def test_a_point_recorded_before_later_config_fields_is_the_same_config(tmp_path):
  config = tiny_config('')
  point = tmp_path / 'seed=0'
  rundir.prepare(str(point))
  recorded = rundir.recorded_config(config)
  for field in rundir.LATER_FIELDS:
    del recorded[field]
  (point / rundir.CONFIG_NAME).write_text(json.dumps(recorded))
  [planned] = sweep.plan(config, str(tmp_path), ['seed=0'])
  assert planned.workdir == str(point)
  config.learning_rate *= 2
  with pytest.raises(ConfigError, match='was run with another config .learning_rate='):
    sweep.plan(config, str(tmp_path), ['seed=0'])


def row(lr, **metrics):
  return {'learning_rate': lr, 'epochs': 1, 'seconds': 10.0, 'status': 'done',
          'workdir': f'learning_rate={lr}', **metrics}


def test_tables_rank_by_validation_and_fall_back_to_test_with_a_note():
  rows = [row(1, validation_accuracy=0.5, test_accuracy=0.9),
          row(2, validation_accuracy=0.7, test_accuracy=0.8),
          {**row(3), 'status': 'failed: NaN', 'epochs': 0}]
  csv_text, md = sweep.format_tables(rows, ['learning_rate'])
  assert [r['learning_rate'] for r in csv.DictReader(csv_text.splitlines())] == ['2', '1', '3']
  assert md.startswith('Ranked by validation_accuracy (the held-out validation slice)')
  assert '| 2 | 1 | 0.7000 | 0.8000 | 10 | done | learning_rate=2 |' in md

  rows = [row(1, test_accuracy=0.8, test_accuracy_recalibrated=0.95),
          row(2, test_accuracy=0.9, test_accuracy_recalibrated=0.93)]
  csv_text, md = sweep.format_tables(rows, ['learning_rate'])
  assert [r['learning_rate'] for r in csv.DictReader(csv_text.splitlines())] == ['1', '2']
  assert md.startswith('Ranked by test_accuracy_recalibrated, best first: there is no '
                       'validation slice')
  assert 'not honest model selection' in md
  assert csv_text.splitlines()[0] == ('learning_rate,epochs,test_accuracy,'
                                      'test_accuracy_recalibrated,seconds,status,workdir')


def test_a_tiny_sweep_runs_each_point_once_ranks_them_and_resumes_them(
    tiny_mnist_dir, tmp_path, monkeypatch, capsys):
  config = tiny_config(tiny_mnist_dir, train_subset=256, validation_size=128)
  specs = ['learning_rate=1e-3,3e-3']  # the second: test_main.py's override too
  rows = sweep.run_sweep(config, str(tmp_path), specs, say=lambda _: None)
  names = ['learning_rate=0.001', 'learning_rate=0.003']
  for name in names:
    assert os.path.isdir(tmp_path / name / 'checkpoints' / '4')  # 256 images / 64
  records = {name: sweep.MetricsLog(str(tmp_path / name)).records() for name in names}
  assert all([r['epoch'] for r in rs] == [1] for rs in records.values())
  ranked = sorted(names, key=lambda n: -records[n][-1]['validation_accuracy'])
  assert [r['workdir'] for r in rows] == ranked
  table = list(csv.DictReader((tmp_path / 'results.csv').read_text().splitlines()))
  assert [r['workdir'] for r in table] == ranked
  for r in table:
    record = records[r['workdir']][-1]
    assert float(r['validation_accuracy']) == record['validation_accuracy']
    assert float(r['test_accuracy']) == record['test_accuracy']
    assert r['epochs'] == '1' and r['status'] == 'done'
  assert (tmp_path / 'results.md').read_text().startswith('Ranked by validation_accuracy')

  # Re-running skips both points: nothing is trained, no metrics line is added.
  mtimes = {n: os.path.getmtime(tmp_path / n / 'metrics.jsonl') for n in names}
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a: calls.append(a))
  lines = []
  assert sweep.run_sweep(config, str(tmp_path), specs, say=lines.append) == rows
  assert not calls
  assert sum('finished earlier, skipped' in line for line in lines) == 2
  assert mtimes == {n: os.path.getmtime(tmp_path / n / 'metrics.jsonl') for n in names}

  monkeypatch.undo()

  # More epochs extend the same points. A SIGTERM in the first point's new epoch stops
  # the sweep there, its checkpoint saved and the tables written on the way out.
  config.num_epochs = 2
  update = train.EpochProgress.update
  def update_then_terminate(progress, metrics, steps=1):
    update(progress, metrics, steps)
    if not stopped:
      stopped.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
  stopped = []
  monkeypatch.setattr(train.EpochProgress, 'update', update_then_terminate)
  with pytest.raises(Preempted, match=r'stopped by SIGTERM at step 7; the checkpoint is '
                                       r'saved in .*learning_rate=0.001/checkpoints/7\.'):
    sweep.run_sweep(config, str(tmp_path), specs, say=lambda _: None)
  monkeypatch.undo()
  table = list(csv.DictReader((tmp_path / 'results.csv').read_text().splitlines()))
  assert [r['status'] for r in table] == ['stopped at epoch 1'] * 2  # of 2 epochs now
  # Run again: the stopped point resumes mid-epoch and the other one extends (that a
  # resumed run ends as a straight one does is tested in test_checkpointing.py).
  sweep.run_sweep(config, str(tmp_path), specs, say=lambda _: None)
  out = capsys.readouterr().out
  assert 'resuming from the checkpoint at step 7' in out
  assert 'resuming from the checkpoint at step 4' in out
  for name in names:
    assert [(r['epoch'], r['step']) for r in sweep.MetricsLog(str(tmp_path / name)).records()
            ] == [(1, 4), (2, 8)]
  table = list(csv.DictReader((tmp_path / 'results.csv').read_text().splitlines()))
  assert [(r['epochs'], r['status']) for r in table] == [('2', 'done')] * 2

  # Another config refuses the old folders.
  config.seed = 1
  with pytest.raises(ConfigError, match=r'learning_rate=0.001 was run with another config '
                                        r'\(seed=0 there, 1 now\)'):
    sweep.run_sweep(config, str(tmp_path), specs, say=lambda _: None)


def test_a_failing_point_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
  ran = []

  def fake_train(config, workdir):
    ran.append(config.learning_rate)
    if config.learning_rate > 1:
      raise NonFiniteError('the loss became NaN at step 3')

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  with pytest.raises(DeepDigitsError, match=r'1 of 3 points failed \(learning_rate=10.0\)'):
    sweep.run_sweep(tiny_config(''), str(tmp_path), ['learning_rate=10,1e-3,1e-2'],
                    say=lambda _: None)
  assert ran == [10.0, 1e-3, 1e-2]
  table = list(csv.DictReader((tmp_path / 'results.csv').read_text().splitlines()))
  assert table[0]['status'] == 'failed: the loss became NaN at step 3'


def test_the_command_stops_on_a_bad_grid_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.sweep', '--config=configs/cpu_quick.py',
       f'--workdir={tmp_path}', '--grid', 'learning_rate=1e-3', '--grid', 'batchsize=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'deepdigits: error: --grid batchsize: not a config field. Did you mean "batch_size"?')
  assert 'Traceback' not in result.stderr
