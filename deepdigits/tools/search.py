"""Hyperparameter search on Optuna: `python -m deepdigits.tools.search --config=...
--workdir=DIR --space 'learning_rate=loguniform:1e-4:1e-2' --space
'label_smoothing=uniform:0:0.2' --space 'batch_size=choice:128,256,512' --trials=20`.

A sampler (`--sampler=tpe`, the default, or `random`) proposes each trial's values; the
trial trains in `DIR/trial=N` as an ordinary run; a pruner (`--pruner=median`) stops a
trial whose validation accuracy after an epoch is below the median of the earlier
trials' at that epoch. The search maximises the validation accuracy (recalibrated where
the run recalibrates), never the test accuracy, so it needs a held-out slice
(`validation_size` > 0). The study is kept in `--storage` (default `DIR/study.db`):
the same command started again, here or on other machines sharing DIR, is another
worker of the same search (`deepdigits.tools.study`), and a stopped one goes on.
`DIR/results.csv` and `DIR/results.md` table every trial, best first.
"""

import dataclasses
import math
import os
from typing import Any, Callable, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

from deepdigits import checkpointing, config_checks, rundir, sharding, storage
from deepdigits.cli import loaded_config, run_command
from deepdigits.errors import ConfigError
from deepdigits.tools import study, sweep

KINDS = ('uniform', 'loguniform', 'choice')
SAMPLERS = ('tpe', 'random')
PRUNERS = ('median', 'none')
STUDY_DB = 'study.db'


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One field's range: uniform or loguniform in [low, high], or a choice of values."""
  field: str
  kind: str
  low: Any = None
  high: Any = None
  choices: tuple = ()

  def suggest(self, trial, kind: type) -> Any:
    if self.kind == 'choice':
      return trial.suggest_categorical(self.field, list(self.choices))
    suggest = trial.suggest_int if kind is int else trial.suggest_float
    return suggest(self.field, self.low, self.high, log=self.kind == 'loguniform')

  def extremes(self) -> list[Any]:
    """The values the config checks see before any work: the bounds, or every choice."""
    return list(self.choices) if self.kind == 'choice' else [self.low, self.high]


def parse_dimension(spec: str, config: ml_collections.ConfigDict) -> Dimension:
  """'field=uniform:LOW:HIGH', 'field=loguniform:LOW:HIGH' or 'field=choice:V1,V2,...',
  typed by the config field; a ConfigError names what is wrong."""
  field, equals, text = spec.partition('=')
  field = field.strip()
  kind, colon, arguments = text.partition(':')
  kind = kind.strip()
  if not equals or not field or not colon:
    raise ConfigError(f"--space {spec!r}: expected 'field=uniform:LOW:HIGH', "
                      "'field=loguniform:LOW:HIGH' or 'field=choice:V1,V2,...'.")
  sweep.config_field('--space', field, config)
  value_type = type(config[field])
  if kind == 'choice':
    return Dimension(field, kind, choices=tuple(
        sweep.parse_values('--space', field, arguments, value_type)))
  if kind not in KINDS:
    raise ConfigError(f'--space {field}: {kind!r} is not a kind of range; use one of '
                      f'{", ".join(KINDS)}.')
  if value_type not in (int, float):
    raise ConfigError(f'--space {field}: config.{field} is a {value_type.__name__}; a '
                      f'{kind} range needs an int or float field (use choice:... for it).')
  bounds = arguments.split(':')
  if len(bounds) != 2 or not all(b.strip() for b in bounds):
    raise ConfigError(f"--space {field}: expected '{kind}:LOW:HIGH', got {text!r}.")
  low, high = (sweep.parse_value('--space', field, b.strip(), value_type) for b in bounds)
  if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
    raise ConfigError(f'--space {field}: the range {low}..{high} is empty; LOW must be '
                      'below HIGH.')
  if kind == 'loguniform' and low <= 0:
    raise ConfigError(f'--space {field}: a loguniform range needs LOW > 0, not {low}.')
  return Dimension(field, kind, low, high)


def parse_space(specs: list[str], config: ml_collections.ConfigDict) -> list[Dimension]:
  """Every --space, parsed, each field once."""
  if not specs:
    raise ConfigError("give at least one --space, e.g. 'learning_rate=loguniform:1e-4:1e-2'.")
  space = [parse_dimension(spec, config) for spec in specs]
  fields = [d.field for d in space]
  if len(set(fields)) != len(fields):
    twice = next(f for f in fields if fields.count(f) > 1)
    raise ConfigError(f'--space {twice}: given twice; give each field one range.')
  return space


def check_search(config: ml_collections.ConfigDict, space: list[Dimension],
                 num_trials: int) -> None:
  """Before any work: a validation slice to optimise, a trial count, and the config at
  each dimension's extremes (bounds or choices, the others at their base values)."""
  if config.validation_size <= 0:
    raise ConfigError('a search optimises the validation accuracy, never the test '
                      'accuracy: hold out a slice with --config.validation_size=5000.')
  if num_trials < 1:
    raise ConfigError(f'--trials={num_trials} must be >= 1.')
  mesh = sharding.make_mesh()
  config_checks.validate(config, mesh)
  for dimension in space:
    for value in dimension.extremes():
      try:
        config_checks.validate(sweep.point_config(config, {dimension.field: value}), mesh)
      except ConfigError as e:
        raise ConfigError(f'--space {dimension.field}={value}: {e}') from None


def trial_point(config: ml_collections.ConfigDict, workdir: str, number: int,
                values: dict) -> sweep.Point:
  name = f'trial={number}'
  return sweep.Point(values, name, sweep.point_config(config, values),
                     storage.join(workdir, name))


def make_sampler(name: str, seed: Optional[int]):
  optuna = study.import_optuna()
  if name == 'tpe':
    return optuna.samplers.TPESampler(seed=seed)
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  raise ConfigError(f'--sampler={name}: use one of {", ".join(SAMPLERS)} (grids: the '
                    'sweep command with --storage).')


def make_pruner(name: str, startup_trials: int):
  optuna = study.import_optuna()
  if name == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
  if name == 'none':
    return optuna.pruners.NopPruner()
  raise ConfigError(f'--pruner={name}: use one of {", ".join(PRUNERS)}.')


def trial_points(config, workdir: str, trials: list) -> list[sweep.Point]:
  """One point per trial that has values (a queued copy shares its original's)."""
  points = {}
  for trial in sorted(trials, key=lambda t: t.number):
    if trial.params:
      number = study.original_number(trial)
      points[number] = trial_point(config, workdir, number, dict(trial.params))
  return [points[n] for n in sorted(points)]


def run_search(config: ml_collections.ConfigDict, workdir: str, specs: list[str],
               num_trials: int, sampler: str = 'tpe', pruner: str = 'median',
               startup_trials: int = 5, sampler_seed: Optional[int] = None,
               storage_url: Optional[str] = None, study_name: Optional[str] = None,
               heartbeat_seconds: int = study.HEARTBEAT_SECONDS,
               say: Callable[[str], None] = print) -> list[dict]:
  """Runs trials of the search until `num_trials` have been started (by this worker
  or others) and none is running; writes the tables; returns their rows, best first."""
  space = parse_space(specs, config)
  check_search(config, space, num_trials)
  if storage_url is None:
    if storage.is_remote(workdir):
      raise ConfigError(f'--workdir {workdir} is not on a local disk, so it cannot hold '
                        "the study's database: give --storage (e.g. postgresql://...).")
    storage_url = f'sqlite:///{os.path.join(storage.absolute(workdir), STUDY_DB)}'
  rundir.prepare(workdir)
  name = study_name or storage.resolved(workdir)
  definition = {'kind': 'search', 'space': [dataclasses.asdict(d) for d in space],
                'config': sweep.comparable_config(config)}
  shared = study.open_study(storage_url, name, definition, heartbeat_seconds,
                            sampler=make_sampler(sampler, sampler_seed),
                            pruner=make_pruner(pruner, startup_trials))
  types = {d.field: type(config[d.field]) for d in space}

  def objective(trial):
    values = {d.field: d.suggest(trial, types[d.field]) for d in space}
    point = trial_point(config, workdir,
                        study.original_number(study.frozen(shared, trial)), values)
    return study.run_trial(trial, point, checkpointing_metric, say)

  def started(trials) -> int:
    return len({study.original_number(t) for t in trials})

  def write_tables():
    trials = shared.get_trials(deepcopy=False)
    points = trial_points(config, workdir, trials)
    if points:
      status = study.statuses(points, trials,
                              lambda p: sweep.finished_record(p) is not None)
      return sweep.write_results(workdir, points, status)
    return [], ''

  say(f'search: {num_trials} trials in study {name!r} of {study.shown_url(storage_url)}')
  study.serve(shared, lambda trials: started(trials) < num_trials, objective,
              write_tables, heartbeat_seconds)
  rows, table = write_tables()
  say(table.rstrip())
  return rows


def checkpointing_metric(record: dict) -> Optional[float]:
  """The validation accuracy the search maximises (as the best checkpoint does)."""
  value = checkpointing.selection_metric(record)
  return None if value < 0 else value


# ---------------------------------------------------------------- command


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags, defined only when run as a command (absl flags are global)."""
  flags.DEFINE_string('workdir', None, 'Search folder: one subfolder per trial, the '
                      'results tables and (by default) the study database.')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_multi_string('space', None, "A field and its range: 'field=uniform:LOW:HIGH'"
                            ", 'field=loguniform:LOW:HIGH' or 'field=choice:V1,V2,...'; "
                            'repeat for more fields.')
  flags.DEFINE_integer('trials', None, 'How many trials the search runs, over all its '
                       'workers.')
  flags.DEFINE_enum('sampler', 'tpe', SAMPLERS, "Optuna's sampler: TPE or random.")
  flags.DEFINE_enum('pruner', 'median', PRUNERS, 'Stop a trial whose validation accuracy '
                    "after an epoch is below the median of earlier trials' (median), or "
                    'never (none).')
  flags.DEFINE_integer('startup_trials', 5, 'Trials that finish before the pruner stops '
                       'any.')
  flags.DEFINE_integer('sampler_seed', None, "The sampler's seed (with several workers, "
                       'give each its own or none).')
  sweep.define_study_flags()
  flags.mark_flags_as_required(['config', 'workdir', 'space', 'trials'])


def main():
  sweep.refuse_fields_also_overridden('--space', FLAGS.space)
  run_search(loaded_config(), FLAGS.workdir, FLAGS.space, FLAGS.trials,
             sampler=FLAGS.sampler, pruner=FLAGS.pruner,
             startup_trials=FLAGS.startup_trials, sampler_seed=FLAGS.sampler_seed,
             storage_url=FLAGS.storage, study_name=FLAGS.study,
             heartbeat_seconds=FLAGS.heartbeat_seconds,
             say=lambda line: print(line, flush=True))


if __name__ == '__main__':
  define_flags()
  run_command(main)
