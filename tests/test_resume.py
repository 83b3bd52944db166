"""A start on an existing workdir: the same run goes on, another one is refused before any
work, and commands that only read never change the workdir."""

import json
import shutil

import pytest

from conftest import tiny_config
from deepdigits import inference, rundir, train
from deepdigits.errors import ConfigError
from deepdigits.tools import ensemble


@pytest.fixture(scope='module')
def finished(tiny_mnist_dir, tmp_path_factory):
  """A finished one-epoch run (8 steps) and its config."""
  workdir = tmp_path_factory.mktemp('finished')
  config = tiny_config(tiny_mnist_dir)
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


def snapshot(workdir):
  return ((workdir / 'config.json').read_text(), (workdir / 'metrics.jsonl').read_text(),
          sorted(p.name for p in (workdir / 'checkpoints').iterdir()))


@pytest.mark.parametrize('field,value,phrase', [
    ('batch_size', 32, 'batch_size=64 there, 32 now'),
    ('seed', 1, 'seed=0 there, 1 now'),
    ('learning_rate', 3e-3, 'learning_rate=0.001 there, 0.003 now'),
    ('augment_max_shift', 2.0, 'augment_max_shift=0.0 there, 2.0 now'),
])
def test_another_config_on_a_trained_workdir_is_refused(finished, field, value, phrase):
  workdir, config = finished
  before = snapshot(workdir)
  other = config.copy_and_resolve_references()
  other[field] = value
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(other, str(workdir))
  assert str(error.value) == (
      f'{workdir} holds a run of another config ({phrase}): resume it with the config it '
      'was trained with (its config.json), or use a new --workdir.')
  assert snapshot(workdir) == before  # nothing written, nothing trained


def test_fields_that_do_not_change_the_math_may_change(finished, tmp_path):
  workdir, config = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  other = config.copy_and_resolve_references()
  other.progress, other.eval_batch_size, other.max_to_keep = False, 32, 5
  other.data_dir = other.data_dir + '/.'  # another spelling of the same folder
  record = train.train_and_evaluate(other, str(copy))  # finished: returns its record
  assert record == json.loads((copy / 'metrics.jsonl').read_text().splitlines()[-1])
  assert json.loads((copy / 'config.json').read_text())['eval_batch_size'] == 32


def test_a_finished_run_started_again_compiles_and_changes_nothing(finished, tmp_path,
                                                                  monkeypatch, capsys):
  workdir, config = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  before = snapshot(copy)
  def no_compile(*args, **kwargs):
    raise AssertionError('a finished run compiled its train step')
  monkeypatch.setattr(train, 'compile_train_step', no_compile)
  record = train.train_and_evaluate(config, str(copy))
  assert record == json.loads((copy / 'metrics.jsonl').read_text().splitlines()[-1])
  assert 'training is complete (step 8); nothing to do' in capsys.readouterr().out
  assert snapshot(copy) == before


def test_more_epochs_extend_a_constant_schedule(finished, tmp_path):
  workdir, config = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  longer = config.copy_and_resolve_references()
  longer.num_epochs = 2
  train.train_and_evaluate(longer, str(copy))
  records = [json.loads(line) for line in (copy / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['epoch'], r['step']) for r in records] == [(1, 8), (2, 16)]
  assert json.loads((copy / 'config.json').read_text())['num_epochs'] == 2


def test_fewer_epochs_than_trained_says_so(finished):
  workdir, config = finished
  shorter = config.copy_and_resolve_references()
  # A record of a second epoch stands for a run that trained two.
  records = (workdir / 'metrics.jsonl').read_text()
  try:
    (workdir / 'metrics.jsonl').write_text(
        records + json.dumps({**json.loads(records), 'epoch': 2, 'step': 16}) + '\n')
    shorter.num_epochs = 1
    with pytest.raises(ConfigError, match=(
        f'{workdir} has already trained 2 epochs, more than --config.num_epochs=1: give '
        'at least 2, score it with --mode=evaluate, or use a new --workdir.')):
      train.train_and_evaluate(shorter, str(workdir))
  finally:
    (workdir / 'metrics.jsonl').write_text(records)


def test_another_length_of_a_cosine_schedule_is_refused(tmp_path):
  recorded = rundir.recorded_config(tiny_config('', lr_schedule='cosine', num_epochs=12))
  config = tiny_config('', lr_schedule='cosine', num_epochs=20)
  problem = rundir.num_epochs_problem(str(tmp_path), recorded, config)
  assert problem == (
      '--config.num_epochs=20 would change the length of the cosine learning-rate schedule '
      f'that {tmp_path} was trained on (12 epochs), so the run could not go on along the '
      'same curve: keep num_epochs, or use a new --workdir')
  assert rundir.num_epochs_problem(
      str(tmp_path), recorded, tiny_config('', lr_schedule='cosine', num_epochs=12)) is None
  constant = rundir.recorded_config(tiny_config('', num_epochs=12))
  assert rundir.num_epochs_problem(str(tmp_path), constant,
                                   tiny_config('', num_epochs=20)) is None


def test_another_length_of_a_run_with_clean_last_epochs_is_refused(tmp_path):
  """Its unaugmented epochs are the last ones: more epochs would move them."""
  clean = lambda epochs: tiny_config('', augment_max_shift=2.0, augment_clean_epochs=2,
                                     num_epochs=epochs)
  problem = rundir.num_epochs_problem(str(tmp_path), rundir.recorded_config(clean(12)),
                                      clean(20))
  assert problem == (
      '--config.num_epochs=20 would move the last 2 unaugmented epochs '
      f'(augment_clean_epochs) of the run in {tmp_path} (12 epochs): keep num_epochs, or '
      'use a new --workdir')
  assert rundir.num_epochs_problem(str(tmp_path), rundir.recorded_config(clean(12)),
                                   clean(12)) is None


def test_evaluate_only_reads_the_workdir(finished, tmp_path, capsys):
  """--mode=evaluate with an unreadable latest checkpoint: it scores the previous one and
  leaves the workdir as it was (config.json, the checkpoint folders)."""
  workdir, config = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.copytree(copy / 'checkpoints' / '8', copy / 'checkpoints' / '16')
  for path in (copy / 'checkpoints' / '16').rglob('*'):
    if path.is_file() and 'ocdbt' in str(path):
      path.write_bytes(b'garbage')
  before = snapshot(copy)
  other = config.copy_and_resolve_references()
  other.eval_batch_size = 32
  result = inference.evaluate_workdir(str(copy), config=other)
  assert result['step'] == 8
  assert f'checkpoint {copy}/checkpoints/16 is unreadable' in capsys.readouterr().out
  assert snapshot(copy) == before
  assert not (copy / 'corrupt_checkpoints').exists()


def test_the_same_run_under_two_paths_is_one_member(finished, tmp_path):
  workdir, _ = finished
  (tmp_path / 'link').symlink_to(workdir)
  for twice in ([str(workdir), str(tmp_path / 'link')],
                [str(workdir), str(workdir) + '/', str(workdir) + '/.']):
    with pytest.raises(ConfigError, match='is given twice'):
      ensemble.expand_workdirs(twice)
