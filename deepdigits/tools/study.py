"""Runs that many worker processes share through an Optuna study: the sweep command's
grids (`--storage`) and the search command's samplers and pruners.

Each trial is one ordinary training run in its own workdir, so a trial is resumed,
evaluated, plotted and ensembled like any other run. The study lives in a database
(`sqlite:///DIR/study.db` on one machine; PostgreSQL or MySQL for workers on several) that
every worker started with the same `--storage` and `--study` reads and writes:

- a worker takes the next trial the study hands out (a grid point no worker has started,
  or a sampler's proposal), trains it, and asks again until none is left to start and
  none is running elsewhere;
- a running trial's worker writes a heartbeat every `heartbeat_seconds`; a trial whose
  heartbeat stops for twice that (its worker was killed or its machine lost) is failed
  by the next worker that looks, and a copy of it queued, which the next free worker
  takes and resumes from the run's last checkpoint;
- a trial stopped by a signal (SIGTERM, Ctrl-C) goes back to the queue at once;
- a trial whose run fails (a NaN, unreadable data) is failed for good, with its error.

The objective is the run's ranking metric at its final epoch (validation accuracy,
recalibrated where the run recalibrates; `sweep.RANKING_METRICS`); pruners see it after
every epoch.
"""

import json
import os
import time
import warnings
from typing import Any, Callable, Optional

from deepdigits import train
from deepdigits.errors import ConfigError, DeepDigitsError, WorkdirBusy
from deepdigits.metrics_log import MetricsLog
from deepdigits.preemption import Preempted

HEARTBEAT_SECONDS = 60
STUDY_ATTR = 'deepdigits'  # the study's user attribute that records what it runs
INSTALL_HINT = "pip install 'deepdigits[study]'"
OPEN_ATTEMPTS = 5
# What SQLAlchemy raises when another worker is creating the same database at that moment.
RACE_ERRORS = ('IntegrityError', 'OperationalError')


class PointFailed(Exception):
  """A trial's own run failed; its error is in the trial's user attributes."""


def import_optuna():
  """Optuna, quiet (the commands print their own lines), or a ConfigError naming the
  install."""
  try:
    import optuna  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f'--storage needs Optuna, which is not installed: {INSTALL_HINT}.'
                      ) from None
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
  return optuna


def shown_url(url: str) -> str:
  """The storage URL as messages show it: without its password."""
  try:
    import sqlalchemy  # pylint: disable=g-import-not-at-top
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except (not a URL at all: shown as given)
    return url


def open_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS):
  """The RDB storage at `url`, with heartbeats and stale trials queued again; one
  ConfigError line if it cannot be opened."""
  optuna = import_optuna()
  if heartbeat_seconds < 1:
    raise ConfigError(f'--heartbeat_seconds={heartbeat_seconds} must be >= 1.')
  if '://' not in url:
    raise ConfigError(f'--storage={url}: not a database URL; give e.g. '
                      'sqlite:///DIR/study.db (one machine) or '
                      'postgresql://USER@HOST/DB (workers on several machines).')
  if url.startswith('sqlite:///'):
    folder = os.path.dirname(os.path.abspath(url[len('sqlite:///'):]))
    if not os.path.isdir(folder):
      raise ConfigError(f'--storage={url}: the folder {folder} does not exist; create it '
                        'or give another path.')
  # Workers started together race to create a new database's tables (one of them then
  # fails on the schema's version row): the losers find the tables made and open them.
  for attempt in range(OPEN_ATTEMPTS):
    try:
      return optuna.storages.RDBStorage(
          url, heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    except Exception as e:  # pylint: disable=broad-except (SQLAlchemy's and drivers' own)
      if attempt + 1 < OPEN_ATTEMPTS and type(e).__name__ in RACE_ERRORS:
        time.sleep(0.5 * (attempt + 1))
        continue
      reason = ' '.join(str(e).split('\n')[0].split())[:200]
      raise ConfigError(f'--storage={shown_url(url)}: cannot open it ({type(e).__name__}: '
                        f'{reason}).') from None


def open_study(url: str, name: str, definition: dict, heartbeat_seconds: int,
               sampler=None, pruner=None):
  """The study `name` in the storage at `url`, created if new. `definition` (what the
  study runs: its kind, grid or space, base config) is recorded with it, and a worker
  started with another one is refused before any work. No pruner unless given (Optuna's
  default would prune a grid's points)."""
  optuna = import_optuna()
  definition = json.loads(json.dumps(definition))  # as the database gives it back
  study_storage = open_storage(url, heartbeat_seconds)
  try:
    study = optuna.create_study(
        storage=study_storage, study_name=name, sampler=sampler,
        pruner=pruner or optuna.pruners.NopPruner(), direction='maximize',
        load_if_exists=True)
  except Exception as e:  # pylint: disable=broad-except (a database that refuses)
    reason = ' '.join(str(e).split('\n')[0].split())[:200]
    raise ConfigError(f'--storage={shown_url(url)}: cannot open study {name!r} '
                      f'({type(e).__name__}: {reason}).') from None
  recorded = study.user_attrs.get(STUDY_ATTR)
  if recorded is None:
    study.set_user_attr(STUDY_ATTR, definition)
  elif recorded != definition:
    differences = sorted(k for k in set(recorded) | set(definition)
                         if recorded.get(k) != definition.get(k))
    raise ConfigError(
        f'study {name!r} in {shown_url(url)} runs another {"/".join(differences)} than this '
        'command: give the same command as its other workers, or another --study.')
  if study.direction != optuna.study.StudyDirection.MAXIMIZE:
    raise ConfigError(f'study {name!r} in {shown_url(url)} minimises its objective; it is '
                      'not a deepdigits study: give another --study.')
  return study


def original_number(frozen_trial) -> int:
  """The number of the trial a queued copy was made from (its own if it is none): the
  number that names the trial's workdir."""
  return frozen_trial.system_attrs.get('failed_trial', frozen_trial.number)


def frozen(study, trial):
  """The stored view of a running `trial` (its system attributes among others)."""
  return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def serve(study, more_to_start: Callable[[list], bool], objective,
          after_trial: Callable[[], Any], poll_seconds: float) -> None:
  """Runs trials of `study` one after another while one is queued or
  `more_to_start(trials)`, calling `after_trial()` after each (however it ended); while
  others' trials run, waits and looks again (they may go stale and come back queued);
  returns when nothing is queued, left or running."""
  optuna = import_optuna()
  state = optuna.trial.TrialState
  while True:
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    states = {t.state for t in trials}
    if state.WAITING in states or more_to_start(trials):
      try:
        run_one(study, objective)
      finally:
        after_trial()
    elif state.RUNNING in states:
      time.sleep(poll_seconds)
    else:
      return


def run_one(study, objective) -> None:
  """One trial through `study.optimize` (heartbeats, states); a trial stopped by
  anything but its own failure (a signal, a crash) is queued again at once."""
  optuna = import_optuna()
  started = []

  def tracked(trial):
    started.append(trial)
    return objective(trial)

  try:
    study.optimize(tracked, n_trials=1, catch=(PointFailed,))
  except BaseException:
    if started:
      trial = frozen(study, started[0])
      if trial.state == optuna.trial.TrialState.FAIL:
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)
    raise


def run_trial(trial, point, metric: Callable[[dict], Optional[float]],
              say: Callable[[str], None]) -> float:
  """Trains `point` (a sweep.Point: name, config, workdir) as `trial`: resumes its
  workdir, reports `metric` after every epoch (first the epochs a resumed run already
  has) and stops where the study's pruner says. Returns the final epoch's metric."""
  optuna = import_optuna()
  trial.set_user_attr('workdir', point.name)
  for record in MetricsLog(point.workdir).records():
    if (value := metric(record)) is not None:
      trial.report(value, record['epoch'])

  def on_epoch(record: dict) -> bool:
    value = metric(record)
    if value is None:
      return False
    trial.report(value, record['epoch'])
    return record['epoch'] < point.config.num_epochs and trial.should_prune()

  say(f'{point.name}: training in {point.workdir} (trial {trial.number})')
  try:
    record = train.train_and_evaluate(point.config, point.workdir, on_epoch)
  except Preempted:
    raise
  except WorkdirBusy as e:  # a worker that lost a race for the same grid point
    trial.set_user_attr('busy', str(e))
    say(f'{point.name}: trained by another worker (trial {trial.number}): {e}')
    raise PointFailed(str(e)) from None
  except DeepDigitsError as e:
    trial.set_user_attr('error', str(e))
    say(f'deepdigits: error: {point.name}: {e}')
    raise PointFailed(str(e)) from None
  if record.get('epoch', 0) < point.config.num_epochs:
    trial.set_user_attr('pruned_at_epoch', record['epoch'])
    say(f'{point.name}: pruned after epoch {record["epoch"]} (trial {trial.number})')
    raise optuna.TrialPruned()
  value = metric(record)
  if value is None:
    raise ConfigError(f'{point.name}: its final epoch has no metric to optimise.')
  return value


def statuses(points: list, trials: list, is_finished: Callable[[Any], bool]) -> dict:
  """Each point's status for the results tables, from its workdir and its latest trial:
  'done', 'running', 'queued', 'pruned at epoch K', 'failed: ...' or 'pending'."""
  optuna = import_optuna()
  state = optuna.trial.TrialState
  latest = {}
  for trial in sorted(trials, key=lambda t: t.number):
    if 'workdir' in trial.user_attrs and 'busy' not in trial.user_attrs:
      latest[trial.user_attrs['workdir']] = trial
  status = {}
  for point in points:
    trial = latest.get(point.name)
    if is_finished(point):
      status[point.name] = 'done'
    elif trial is None:
      status[point.name] = 'pending'
    elif trial.state == state.PRUNED:
      status[point.name] = f'pruned at epoch {trial.user_attrs.get("pruned_at_epoch")}'
    elif trial.state == state.FAIL and 'error' in trial.user_attrs:
      status[point.name] = f'failed: {trial.user_attrs["error"]}'
    elif trial.state == state.WAITING or trial.state == state.FAIL:
      status[point.name] = 'queued'
    else:
      status[point.name] = 'running'
  return status
