"""Sweeps and searches shared through an Optuna study: workers that split a grid, a
killed worker's point resumed by another, a pruner that stops the clearly worse trials,
and one-line errors for bad spaces and storages.

The workers run as subprocesses on one CPU device each (these tests are about sharing
work, not about devices), on the validated tiny config at learning rate 3e-3, so that
the grid's points and the search's good trials share one compiled step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, tiny_config, xla_flags
from deepdigits import rundir
from deepdigits.errors import ConfigError
from deepdigits.preemption import Preempted
from deepdigits.tools import search, study, sweep

optuna = pytest.importorskip('optuna')

ONE_DEVICE = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
SEEDS = (0, 1, 2, 3)  # the shared grid's points
# What a record holds that a resumed run must reproduce exactly (not its timings).
COMPUTED = ('epoch', 'step', 'train_loss', 'train_accuracy', 'validation_loss',
            'validation_accuracy', 'validation_accuracy_recalibrated', 'test_loss',
            'test_accuracy', 'test_accuracy_recalibrated')


def config_flags(data_dir: str, num_epochs: int = 1,
                 checkpoint_every_steps: int = 1) -> list[str]:
  """validated_config(data_dir, learning_rate=3e-3, ...) as overrides: 4 steps an epoch
  (one compiled step, whatever the epochs and checkpoints)."""
  return [f'--config.data_dir={data_dir}', '--config.batch_size=64',
          '--config.eval_batch_size=64', f'--config.num_epochs={num_epochs}',
          '--config.train_subset=256', '--config.validation_size=128',
          '--config.bn_recalibration_batches=2', '--config.learning_rate=3e-3',
          '--config.model_summary=False', '--config.progress=False',
          f'--config.checkpoint_every_steps={checkpoint_every_steps}']


def point_names(seeds) -> list[str]:
  return [f'seed={s}' for s in seeds]


def sweep_worker(data_dir: str, root, seeds=SEEDS, heartbeat_seconds: int = 1,
                 **popen) -> subprocess.Popen:
  """A worker of the study of the grid over `seeds` (one epoch a point, a checkpoint a
  step). A 1 s heartbeat lets a killed worker's trial go stale after 2 s."""
  return subprocess.Popen(
      [sys.executable, '-m', 'deepdigits.tools.sweep', '--config=configs/default.py',
       f'--workdir={root / "sweep"}', *config_flags(data_dir),
       '--grid', 'seed=' + ','.join(map(str, seeds)),
       f'--storage=sqlite:///{root / "study.db"}',
       f'--heartbeat_seconds={heartbeat_seconds}'],
      cwd=REPO, env=ONE_DEVICE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, **popen)


def wait_for_a_trained_step(worker: subprocess.Popen, root) -> None:
  """Until a point of the study in `root` has saved its first step; fails, with the
  worker's output, if the worker ends or 300 s pass first."""
  deadline = time.time() + 300
  while not list((root / 'sweep').glob('seed=*/checkpoints/1')):
    if worker.poll() is not None or time.time() > deadline:
      worker.kill()
      pytest.fail(f'the worker trained no step:\n{worker.communicate()[0][-3000:]}')
    time.sleep(0.05)


def finish(worker: subprocess.Popen) -> str:
  out, _ = worker.communicate(timeout=600)
  assert worker.returncode == 0, out[-3000:]
  return out


def trained_points(out: str) -> list[str]:
  """The points a worker's output says it trained: those it started, less those whose
  workdir it found locked by another worker (Optuna's grid sampler may hand a point
  out twice while workers race)."""
  points = [line.split(':')[0] for line in out.splitlines() if ': training in ' in line]
  for line in out.splitlines():
    if ': trained by another worker' in line:
      points.remove(line.split(':')[0])
  return points


def computed_records(workdir) -> list[dict]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [{k: r[k] for k in COMPUTED if k in r} for r in map(json.loads, lines)]


def load(root):
  return optuna.load_study(study_name=str(root / 'sweep'),
                           storage=f'sqlite:///{root / "study.db"}')


@pytest.fixture(scope='module')
def shared_grid(tiny_mnist_dir, tmp_path_factory):
  """Two workers on one SQLite study of a 4-point grid, the second started once the
  first has trained a step (so that the step compiles once, and the second loads it
  from the compilation cache while the first trains). Both stay alive: a 30 s
  heartbeat keeps a late one on a loaded machine from failing a live worker's trial as
  stale."""
  root = tmp_path_factory.mktemp('shared_grid')
  first = sweep_worker(tiny_mnist_dir, root, heartbeat_seconds=30)
  wait_for_a_trained_step(first, root)
  second = sweep_worker(tiny_mnist_dir, root, heartbeat_seconds=30)
  return root, finish(first), finish(second)


def test_two_workers_share_a_grid_and_train_each_point_exactly_once(shared_grid):
  root, first, second = shared_grid
  assert (sorted(trained_points(first) + trained_points(second)) == point_names(SEEDS)
         ), f'first worker:\n{first[-3000:]}\nsecond worker:\n{second[-3000:]}'
  assert trained_points(first) and trained_points(second)  # both took points
  state = optuna.trial.TrialState
  trials = load(root).get_trials()
  complete = [t for t in trials if t.state == state.COMPLETE]
  assert sorted({t.user_attrs['workdir'] for t in complete}) == point_names(SEEDS)
  # Any other trial is one that lost a race for a point to the worker training it.
  assert all(t.state == state.FAIL and 'busy' in t.user_attrs
             for t in trials if t.state != state.COMPLETE), trials
  for trial in complete:  # each trial's value is its run's final validation accuracy
    [record] = computed_records(root / 'sweep' / trial.user_attrs['workdir'])
    assert (record['epoch'], record['step']) == (1, 4)
    assert trial.value == record['validation_accuracy_recalibrated']
  rows = (root / 'sweep' / 'results.csv').read_text().splitlines()
  assert len(rows) == 5 and all(',done,' in row for row in rows[1:])


def test_a_point_handed_out_after_it_finished_is_not_trained_again(shared_grid,
                                                                 tiny_mnist_dir, tmp_path):
  """The shared grid's finished points under a new study (a copy of its folder, so a
  study of another name): each trial the sampler hands out finds its point finished and
  takes its final metric, as when workers race for a point that finishes meanwhile."""
  reference, _, _ = shared_grid
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  out = finish(sweep_worker(tiny_mnist_dir, tmp_path))
  assert trained_points(out) == []
  assert sorted(line.split(':')[0] for line in out.splitlines()
                if ': finished earlier, not trained again' in line) == point_names(SEEDS)
  trials = load(tmp_path).get_trials()
  assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
  for trial in trials:
    name = trial.user_attrs['workdir']
    records = computed_records(tmp_path / 'sweep' / name)
    assert records == computed_records(reference / 'sweep' / name), name
    assert trial.value == records[-1]['validation_accuracy_recalibrated']


def test_a_point_whose_workdir_another_worker_holds_is_left_to_that_worker(
    tiny_mnist_dir, tmp_path):
  """The other side of a race for a point: its workdir's lock is held (here by this
  process, as the worker training it would), so the trial fails as `busy`, the point
  is left pending to its holder, and nothing is written into its folder."""
  workdir = tmp_path / 'sweep' / 'seed=0'
  workdir.mkdir(parents=True)
  with rundir.locked(str(workdir)):
    out = finish(sweep_worker(tiny_mnist_dir, tmp_path, seeds=(0,)))
  assert trained_points(out) == []
  assert f"seed=0: trained by another worker (trial 0): another run (pid {os.getpid()})" in out
  [trial] = load(tmp_path).get_trials()
  assert trial.state == optuna.trial.TrialState.FAIL and 'busy' in trial.user_attrs
  assert os.listdir(workdir) == [rundir.LOCK_NAME]
  rows = (tmp_path / 'sweep' / 'results.csv').read_text().splitlines()
  assert len(rows) == 2 and ',pending,' in rows[1]


def test_a_killed_workers_point_is_resumed_by_a_restarted_worker_with_the_same_metrics(
    shared_grid, tiny_mnist_dir, tmp_path):
  """A study of two of the shared grid's points: the first worker is killed once its
  first point has saved step 1 of 4; a worker started after it trains both points."""
  reference, _, _ = shared_grid
  killed = sweep_worker(tiny_mnist_dir, tmp_path, SEEDS[:2])
  wait_for_a_trained_step(killed, tmp_path)
  killed.send_signal(signal.SIGKILL)
  out, _ = killed.communicate(timeout=60)
  [point] = trained_points(out)
  assert not (tmp_path / 'sweep' / point / 'checkpoints' / '4').exists()  # mid-point

  out = finish(sweep_worker(tiny_mnist_dir, tmp_path, SEEDS[:2]))
  points = point_names(SEEDS[:2])
  assert sorted(trained_points(out)) == points
  resumed = out.split(f'{point}: training in')[1].split(': training in')[0]
  assert 'resuming from the checkpoint at step' in resumed
  for name in points:
    assert (computed_records(tmp_path / 'sweep' / name) ==
            computed_records(reference / 'sweep' / name)), name
  states = [t.state for t in load(tmp_path).get_trials()]
  assert states.count(optuna.trial.TrialState.COMPLETE) == 2
  assert states.count(optuna.trial.TrialState.FAIL) == 1  # the stale one, queued again


def test_a_search_with_the_median_pruner_prunes_the_clearly_worse_trials(
    shared_grid, tiny_mnist_dir, tmp_path):
  """Random choices of learning rate 3e-3 or 1e-6 (the sampler's seed 0 draws 1e-6,
  3e-3, 1e-6, 1e-6); after the first finished trial the median pruner stops every
  1e-6 trial after its first epoch."""
  del shared_grid  # its compiled step, shared through the compilation cache
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.search', '--config=configs/default.py',
       f'--workdir={tmp_path}',
       *[f for f in config_flags(tiny_mnist_dir, num_epochs=2, checkpoint_every_steps=0)
         if 'learning_rate' not in f],
       '--space', 'learning_rate=choice:3e-3,1e-6', '--trials=4', '--sampler=random',
       '--sampler_seed=0', '--pruner=median', '--startup_trials=1'],
      cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  trials = optuna.load_study(study_name=str(tmp_path),
                             storage=f'sqlite:///{tmp_path / "study.db"}').get_trials()
  state = optuna.trial.TrialState
  assert [(t.params['learning_rate'], t.state) for t in trials] == [
      (1e-6, state.COMPLETE), (3e-3, state.COMPLETE), (1e-6, state.PRUNED),
      (1e-6, state.PRUNED)]
  for trial in trials:
    workdir = tmp_path / f'trial={trial.number}'
    records = computed_records(workdir)
    assert [r['epoch'] for r in records] == ([1] if trial.state == state.PRUNED else [1, 2])
    assert trial.intermediate_values == {
        r['epoch']: r['validation_accuracy_recalibrated'] for r in records}
    # A pruned trial stops with a checkpoint of its last epoch.
    assert (workdir / 'checkpoints' / str(records[-1]['step'])).is_dir()
  assert trials[1].value > trials[0].value  # validation, never test, is the objective
  assert trials[1].value == computed_records(tmp_path / 'trial=1')[-1][
      'validation_accuracy_recalibrated']
  table = (tmp_path / 'results.md').read_text()
  assert table.count('| pruned at epoch 1 |') == 2
  first_row = table.split('| --- |')[-1].splitlines()[1]
  assert first_row.startswith('| 0.003 | 2 |') and first_row.endswith('| trial=1 |')


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize('spec,message', [
    ('learning_rate', "--space 'learning_rate': expected 'field=uniform:LOW:HIGH'"),
    ('learning_rate=1e-3', "--space 'learning_rate=1e-3': expected"),
    ('learnin_rate=uniform:0:1', '--space learnin_rate: not a config field. Did you '
                                 'mean "learning_rate"?'),
    ('learning_rate=normal:0:1', "--space learning_rate: 'normal' is not a kind of range"),
    ('learning_rate=uniform:1e-3', "--space learning_rate: expected 'uniform:LOW:HIGH'"),
    ('learning_rate=uniform:a:1', "--space learning_rate: 'a' is not a float"),
    ('learning_rate=uniform:1:1', 'the range 1.0..1.0 is empty'),
    ('learning_rate=loguniform:0:1', 'a loguniform range needs LOW > 0, not 0.0'),
    ('batch_size=uniform:64:128.5', "--space batch_size: '128.5' is not a int"),
    ('shuffle=uniform:0:1', 'config.shuffle is a bool; a uniform range needs an int or '
                            'float field'),
    ('batch_size=choice:64,,128', "an empty value in '64,,128'"),
    ('batch_size=choice:64,064', 'the values 64, 064 are the same value'),
])
def test_malformed_spaces_are_one_clear_error(spec, message):
  with pytest.raises(ConfigError) as e:
    search.parse_space([spec], tiny_config(''))
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_spaces_parse_to_typed_ranges():
  space = search.parse_space(
      ['learning_rate=loguniform:1e-4:1e-2', 'label_smoothing=uniform:0:0.2',
       'batch_size=choice:128,256,512', 'seed=uniform:0:9'], tiny_config(''))
  assert space == [search.Dimension('learning_rate', 'loguniform', 1e-4, 1e-2),
                   search.Dimension('label_smoothing', 'uniform', 0.0, 0.2),
                   search.Dimension('batch_size', 'choice', choices=(128, 256, 512)),
                   search.Dimension('seed', 'uniform', 0, 9)]
  assert isinstance(space[3].low, int)


@pytest.mark.parametrize('specs,overrides,trials,message', [
    (['learning_rate=uniform:1e-4:1e-2'], {}, 4,
     'a search optimises the validation accuracy, never the test accuracy: hold out a '
     'slice with --config.validation_size=5000.'),
    (['learning_rate=uniform:1e-4:1e-2'], {'validation_size': 128}, 0,
     '--trials=0 must be >= 1.'),
    pytest.param(['batch_size=choice:64,100'], {'validation_size': 128}, 4,
                 '--space batch_size=100: batch_size=100 does not divide by the 8 devices',
                 marks=pytest.mark.devices(8)),
    (['label_smoothing=uniform:0:1.5'], {'validation_size': 128}, 4,
     '--space label_smoothing=1.5: --config.label_smoothing=1.5'),
    (['learning_rate=uniform:1e-4:1e-2', 'learning_rate=uniform:0.1:1'],
     {'validation_size': 128}, 4, '--space learning_rate: given twice'),
    ([], {'validation_size': 128}, 4, 'give at least one --space'),
])
def test_a_search_checks_its_space_and_config_before_any_work(specs, overrides, trials,
                                                              message, tmp_path):
  with pytest.raises(ConfigError) as e:
    search.run_search(tiny_config('', **overrides), str(tmp_path / 'search'), specs,
                      trials, say=lambda _: None)
  assert message in str(e.value)
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'search').exists()


def test_a_worker_with_another_grid_or_config_is_refused(tmp_path):
  url = f'sqlite:///{tmp_path / "study.db"}'
  config = tiny_config(str(tmp_path))
  definition = {'kind': 'grid', 'grid': {'seed': [0, 1]},
                'config': sweep.comparable_config(config)}
  created = study.open_study(url, 'grid', definition, heartbeat_seconds=1)
  assert isinstance(created.pruner, optuna.pruners.NopPruner)  # a grid's points run out
  study.open_study(url, 'grid', definition, heartbeat_seconds=1)  # the same: joins
  other_config = tiny_config(str(tmp_path), learning_rate=0.1)
  for other, what in (({**definition, 'grid': {'seed': [0, 1, 2]}}, 'grid'),
                      ({**definition, 'config': sweep.comparable_config(other_config)},
                       'config')):
    with pytest.raises(ConfigError, match=f"study 'grid' in {url} runs another {what} "
                                          'than this command: give the same command as '
                                          'its other workers, or another --study.'):
      study.open_study(url, 'grid', other, heartbeat_seconds=1)


def test_workers_that_create_one_new_database_at_once_all_open_it(tmp_path):
  """Optuna's first open of a database creates its tables; workers started together
  race to do it (without the retry, one of six threads failed in each of 5 tries)."""
  for attempt in range(3):
    url = f'sqlite:///{tmp_path / f"study{attempt}.db"}'
    barrier, errors = threading.Barrier(6), []

    def open_it(url=url, barrier=barrier, errors=errors):
      barrier.wait()
      try:
        study.open_storage(url, heartbeat_seconds=1)
      except ConfigError as e:
        errors.append(str(e))

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    assert not errors


def test_a_stopped_trial_is_queued_again_and_a_failed_one_is_not(tmp_path):
  """What run_one does with a trial whose worker is stopped (a signal: Preempted) and
  with one whose own run fails (PointFailed), on a study of its own, without training:
  the first is queued again at once, the second is not."""
  shared = study.open_study(f'sqlite:///{tmp_path / "study.db"}', 'runs', {'kind': 'test'},
                            heartbeat_seconds=1)

  def stopped(trial):
    trial.suggest_float('learning_rate', 1e-3, 1e-2)
    raise Preempted('stopped by SIGTERM at step 3', signal.SIGTERM)

  def failed(trial):
    trial.set_user_attr('error', 'the loss became NaN')
    raise study.PointFailed('the loss became NaN')

  with pytest.raises(Preempted):
    study.run_one(shared, stopped)
  state = optuna.trial.TrialState
  first, copy = shared.get_trials()
  assert (first.state, copy.state) == (state.FAIL, state.WAITING)
  assert copy.params == first.params and study.original_number(copy) == 0
  study.run_one(shared, failed)  # takes the queued copy first; its failure is its own
  first, copy = shared.get_trials()  # and no copy of it is queued
  assert copy.state == state.FAIL and copy.user_attrs == {'error': 'the loss became NaN'}
  assert copy.params == first.params


@pytest.mark.parametrize('url,message', [
    ('study.db', '--storage=study.db: not a database URL; give e.g. sqlite:///DIR/study.db'),
    ('sqlite:////no/such/folder/study.db', 'the folder /no/such/folder does not exist'),
    ('nosuchdb://host/x', '--storage=nosuchdb://host/x: cannot open it (NoSuchModuleError'),
])
def test_a_bad_storage_is_one_clear_error(url, message):
  with pytest.raises(ConfigError) as e:
    study.open_storage(url, heartbeat_seconds=1)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_the_search_command_stops_on_a_bad_space_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.search', '--config=configs/mnist_best.py',
       f'--workdir={tmp_path / "search"}', '--space', 'learning_rate=loguniform:0:1',
       '--trials=4'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'deepdigits: error: --space learning_rate: a loguniform range needs LOW > 0, not '
      '0.0.')
  assert not (tmp_path / 'search').exists()
