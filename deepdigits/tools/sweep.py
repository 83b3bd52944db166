"""Hyperparameter sweeps: `python -m deepdigits.tools.sweep --config=... --workdir=DIR
--grid 'learning_rate=1e-3,3e-3' --grid 'batch_size=128,512'`.

The cartesian product of the grids, one workdir per point (`DIR/learning_rate=0.001,
batch_size=128`), each trained in turn by `train.train_and_evaluate`, then the results
tabled in `DIR/results.csv` and `DIR/results.md`, best first. Points run in this process,
one after another: the start-up of JAX and the compilation cache are paid once, and
each point's error is caught and reported on its own row while the others go on. A
crash of the process is covered by resumption: the same command skips the finished
points and resumes a half-finished one from its checkpoint.

Every grid and every point's config is checked before anything trains.
"""

import csv
import dataclasses
import difflib
import io
import itertools
import urllib.parse
from typing import Any, Callable, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

from deepdigits import checkpointing, config_checks, rundir, sharding, storage, train
from deepdigits.cli import loaded_config, run_command
from deepdigits.errors import ConfigError, DeepDigitsError
from deepdigits.metrics_log import MetricsLog
from deepdigits.preemption import Preempted
from deepdigits.tools import study

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
# The metric the table is ranked by: the first of these that any point reports.
# Validation first (honest model selection), recalibrated BatchNorm statistics first
# when the run uses them (they are what `inference.load_trained` predicts with).
RANKING_METRICS = ('validation_accuracy_recalibrated', 'validation_accuracy',
                   'test_accuracy_recalibrated', 'test_accuracy')
METRIC_COLUMNS = ('validation_accuracy', 'validation_accuracy_recalibrated',
                  'test_accuracy', 'test_accuracy_recalibrated')
TRUE_WORDS, FALSE_WORDS = ('true', '1', 'yes'), ('false', '0', 'no')

Grid = list[tuple[str, list[Any]]]  # (field, values) in the order given


# ---------------------------------------------------------------- grids and points


def parse_value(flag: str, field: str, text: str, kind: type) -> Any:
  """text as a value of the field's type, or a ConfigError naming both."""
  try:
    if kind is bool:
      if text.lower() in TRUE_WORDS + FALSE_WORDS:
        return text.lower() in TRUE_WORDS
      raise ValueError
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      return text
  except ValueError:
    raise ConfigError(f'{flag} {field}: {text!r} is not a {kind.__name__} (the type of '
                      f'config.{field}).') from None
  raise ConfigError(f'{flag} {field}: config.{field} is a {kind.__name__}; only int, '
                    'float, bool and str fields can be swept.')


def config_field(flag: str, field: str, config: ml_collections.ConfigDict) -> str:
  """field, if the config has it; else a ConfigError with the closest field's name."""
  if field not in config:
    close = difflib.get_close_matches(field, list(config.keys()), n=1)
    hint = f' Did you mean "{close[0]}"?' if close else ''
    raise ConfigError(f'{flag} {field}: not a config field.{hint}')
  return field


def parse_values(flag: str, field: str, values_text: str, kind: type) -> list[Any]:
  """'v1,v2,...' as distinct values of `kind`; a ConfigError for an empty or repeated
  one."""
  texts = [t.strip() for t in values_text.split(',')]
  if not values_text.strip():
    raise ConfigError(f'{flag} {field}: no values after "=".')
  if '' in texts:
    raise ConfigError(f'{flag} {field}: an empty value in {values_text!r}.')
  values = [parse_value(flag, field, t, kind) for t in texts]
  repeated = [t for t, v in zip(texts, values) if values.count(v) > 1]
  if repeated:
    raise ConfigError(f'{flag} {field}: the values {", ".join(repeated)} are the '
                      'same value.')
  return values


def parse_grid(specs: list[str], config: ml_collections.ConfigDict) -> Grid:
  """`['field=v1,v2', ...]` as [(field, [typed values])]; a ConfigError names the first
  malformed spec."""
  if not specs:
    raise ConfigError("give at least one --grid 'field=value1,value2'.")
  grid, fields = [], set()
  for spec in specs:
    field, equals, values_text = spec.partition('=')
    field = field.strip()
    if not equals or not field:
      raise ConfigError(f"--grid {spec!r}: expected 'field=value1,value2,...'.")
    config_field('--grid', field, config)
    if field in fields:
      raise ConfigError(f'--grid {field}: given twice; list all its values in one '
                        '--grid.')
    fields.add(field)
    grid.append((field, parse_values('--grid', field, values_text, type(config[field]))))
  return grid


def grid_points(grid: Grid) -> list[dict[str, Any]]:
  """The cartesian product, the last grid varying fastest."""
  fields = [field for field, _ in grid]
  return [dict(zip(fields, values))
          for values in itertools.product(*(values for _, values in grid))]


def format_value(value: Any) -> str:
  """A value as it appears in a point's name: short, stable, safe in a path."""
  if isinstance(value, str):
    return urllib.parse.quote(value, safe='')
  return repr(value)


def point_name(point: dict[str, Any]) -> str:
  """The point's folder name, e.g. 'learning_rate=0.001,batch_size=128'."""
  return ','.join(f'{field}={format_value(value)}' for field, value in point.items())


def point_config(config: ml_collections.ConfigDict,
                 point: dict[str, Any]) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  for field, value in point.items():
    config[field] = value
  return config


@dataclasses.dataclass
class Point:
  """One point of the sweep and where it runs."""
  values: dict[str, Any]
  name: str
  config: ml_collections.ConfigDict
  workdir: str


def plan(config: ml_collections.ConfigDict, workdir: str,
         specs: list[str]) -> list[Point]:
  """Every point, checked: grids, configs, device divisibility, and that an existing
  point folder was run with the same config. Raises ConfigError before any work."""
  grid = parse_grid(specs, config)
  mesh = sharding.make_mesh()
  points = []
  for values in grid_points(grid):
    name = point_name(values)
    cfg = point_config(config, values)
    try:
      config_checks.validate(cfg, mesh)
    except ConfigError as e:
      raise ConfigError(f'point {name}: {e}') from None
    point_dir = storage.join(workdir, name)
    if storage.is_file(storage.join(point_dir, rundir.CONFIG_NAME)):
      recorded = rundir.read_config(point_dir).to_dict()
      differences = rundir.config_differences(recorded, rundir.recorded_config(cfg))
      if differences:
        raise ConfigError(
            f'{point_dir} was run with another config ({"; ".join(differences[:3])}); '
            'use a new --workdir, or delete that folder to run the point again.')
      if rundir.has_trained(point_dir) and (
          problem := rundir.num_epochs_problem(point_dir, recorded, cfg)):
        raise ConfigError(f'point {name}: {problem}.')
    points.append(Point(values, name, cfg, point_dir))
  return points


# ---------------------------------------------------------------- running


def finished_record(point: Point) -> Optional[dict]:
  """The metrics of the point's final epoch if it is complete (recorded and its
  checkpoint written), else None."""
  for record in MetricsLog(point.workdir).records():
    if (record['epoch'] == point.config.num_epochs and storage.is_dir(
        storage.join(point.workdir, checkpointing.LATEST, str(record['step'])))):
      return record
  return None


def run_points(workdir: str, points: list[Point], say: Callable[[str], None],
               on_progress: Callable[[dict[str, str]], Any]) -> dict[str, str]:
  """Trains every unfinished point in turn under workdir's lock; returns each point's
  status ('done' or 'failed: ...'). `on_progress(status)` runs after every point but
  the last, and on the way out of a stop (tables readable while the points run; the
  caller writes the final ones). A point that fails is reported and the others go on;
  preemption stops them all."""
  rundir.prepare(workdir)
  status = {p.name: 'pending' for p in points}
  with rundir.locked(workdir):
    try:
      for i, point in enumerate(points, 1):
        header = f'sweep: point {i}/{len(points)} {point.name}'
        if finished_record(point) is not None:
          status[point.name] = 'done'
          say(f'{header}: finished earlier, skipped')
          continue
        say(f'{header}: training in {point.workdir}')
        try:
          train.train_and_evaluate(point.config, point.workdir)
          status[point.name] = 'done'
        except Preempted:
          raise
        except DeepDigitsError as e:
          status[point.name] = f'failed: {e}'
          say(f'deepdigits: error: point {point.name}: {e}')
        if i < len(points):
          on_progress(status)
    except BaseException:
      on_progress(status)
      raise
  return status


def failed_points_error(points: list[Point], status: dict[str, str],
                        table: str) -> Optional[DeepDigitsError]:
  """The error naming the failed points, or None if every point is done."""
  failed = [p.name for p in points if status[p.name].startswith('failed')]
  if not failed:
    return None
  return DeepDigitsError(f'{len(failed)} of {len(points)} points failed '
                         f'({", ".join(failed)}); see {table}.')


def ranking_value(record: dict) -> Optional[float]:
  """A run's record's value of the first RANKING_METRICS it has (what a shared sweep's
  study maximises), or None."""
  return next((record[m] for m in RANKING_METRICS if m in record), None)


def comparable_config(config: ml_collections.ConfigDict) -> dict:
  """The config fields that change what a point computes (as `rundir.check_resume`
  compares them): the workers of one study must agree on these."""
  return {k: v for k, v in rundir.recorded_config(config).items()
          if k not in rundir.RESUMABLE_FIELDS + rundir.FOLDER_FIELDS}


def run_shared_points(config: ml_collections.ConfigDict, workdir: str,
                      points: list[Point], specs: list[str], storage_url: str,
                      study_name: Optional[str], heartbeat_seconds: int,
                      say: Callable[[str], None]) -> dict[str, str]:
  """The points as an Optuna study over `storage_url` (a GridSampler), which any number
  of workers running the same command share (`deepdigits.tools.study`); returns each
  point's status once none is left to start or running."""
  optuna = study.import_optuna()
  grid = parse_grid(specs, config)
  name = study_name or storage.resolved(workdir)
  shared = study.open_study(
      storage_url, name, {'kind': 'grid', 'grid': dict(grid),
                          'config': comparable_config(config)}, heartbeat_seconds,
      sampler=optuna.samplers.GridSampler(dict(grid)))
  rundir.prepare(workdir)  # once the study is open: a bad storage leaves nothing behind
  by_name = {p.name: p for p in points}

  def objective(trial):
    values = {field: trial.suggest_categorical(field, values) for field, values in grid}
    point = by_name[point_name(values)]
    # Optuna's grid sampler may hand a point out again while workers race (its docs
    # say so): one running elsewhere is refused by its workdir's lock (run_trial), and
    # one finished meanwhile gives its final metric without training again.
    if (record := finished_record(point)) is not None:
      trial.set_user_attr('workdir', point.name)
      say(f'{point.name}: finished earlier, not trained again (trial {trial.number})')
      return ranking_value(record)
    return study.run_trial(trial, point, ranking_value, say)

  def started_all(trials) -> bool:
    started = {t.system_attrs.get('grid_id') for t in trials}
    return len(started & set(range(len(points)))) == len(points)

  def status() -> dict[str, str]:
    return study.statuses(points, shared.get_trials(deepcopy=False),
                          lambda p: finished_record(p) is not None)

  say(f'sweep: {len(points)} points in study {name!r} of {study.shown_url(storage_url)}')
  study.serve(shared, lambda trials: not started_all(trials), objective,
              lambda: write_results(workdir, points, status()), heartbeat_seconds)
  return status()


def run_sweep(config: ml_collections.ConfigDict, workdir: str, specs: list[str],
              say: Callable[[str], None] = print, storage_url: Optional[str] = None,
              study_name: Optional[str] = None,
              heartbeat_seconds: int = study.HEARTBEAT_SECONDS) -> list[dict]:
  """Runs every unfinished point and writes the tables after each; returns the rows,
  best first. Without `storage_url` the points run in turn in this process; with it,
  in a study that other workers share. A point that fails is reported on its row and
  the others go on; a DeepDigitsError at the end says which failed. Preemption stops
  the sweep."""
  points = plan(config, workdir, specs)
  if storage_url:
    status = run_shared_points(config, workdir, points, specs, storage_url, study_name,
                               heartbeat_seconds, say)
  else:
    status = run_points(workdir, points, say,
                        lambda status: write_results(workdir, points, status))
  rows, table = write_results(workdir, points, status)
  say(table.rstrip())
  error = failed_points_error(points, status, storage.join(workdir, RESULTS_MD))
  if error:
    raise error
  return rows


# ---------------------------------------------------------------- results


def run_row(records: list[dict], num_epochs: int, status: str,
            metrics: tuple[str, ...]) -> tuple[dict, list[dict]]:
  """What a sweep's and a seeds' row share, from a run's metrics.jsonl records: the
  epochs done (up to num_epochs), `metrics` of the last of them, the epochs' wall
  seconds and the status; also returns the records counted."""
  records = [r for r in records if r['epoch'] <= num_epochs]
  last = records[-1] if records else {}
  row = {'epochs': last.get('epoch', 0)}
  row.update({m: last[m] for m in metrics if m in last})
  row['seconds'] = sum(r.get('epoch_seconds', 0.0) for r in records)
  if status == 'pending' and records:
    status = f'stopped at epoch {last["epoch"]}'
  row['status'] = status
  return row, records


def result_row(point: Point, records: list[dict], status: str) -> dict:
  """A table row: the grid values, then the metrics of the latest epoch up to
  num_epochs, the seconds the epochs took, the status and the folder."""
  row, _ = run_row(records, point.config.num_epochs, status, METRIC_COLUMNS)
  return {**point.values, **row, 'workdir': point.name}


def format_cell(value: Any, metrics: tuple[str, ...], column: str, empty: str = '') -> str:
  """A table cell: metrics to 4 decimals, seconds whole, the rest as they are."""
  if value is None:
    return empty
  if column in metrics:
    return f'{value:.4f}'
  if column == 'seconds':
    return f'{value:.0f}'
  return str(value)


def markdown_rows(columns: list[str], rows: list[list[str]]) -> list[str]:
  """A Markdown table's lines: the header, the rule, then each row of cells."""
  return (['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)] +
          ['| ' + ' | '.join(cells) + ' |' for cells in rows])


def ranking_metric(rows: list[dict]) -> Optional[str]:
  return next((m for m in RANKING_METRICS if any(m in row for row in rows)), None)


def rank(rows: list[dict]) -> tuple[list[dict], Optional[str]]:
  """Rows best first by the ranking metric (rows without it last, in grid order)."""
  metric = ranking_metric(rows)
  if metric is None:
    return list(rows), None
  return sorted(rows, key=lambda row: -row.get(metric, float('-inf'))), metric


def ranking_note(metric: Optional[str]) -> str:
  if metric is None:
    return 'No point has finished an epoch yet.'
  if metric.startswith('validation'):
    return f'Ranked by {metric} (the held-out validation slice), best first.'
  return (f'Ranked by {metric}, best first: there is no validation slice '
          '(validation_size=0), so this ranks by the test set, which is fine for a look '
          'but not honest model selection; hold out a slice with '
          '--config.validation_size=5000 for that.')


def _columns(rows: list[dict], grid_fields: list[str]) -> list[str]:
  metrics = [m for m in METRIC_COLUMNS if any(m in row for row in rows)]
  return grid_fields + ['epochs'] + metrics + ['seconds', 'status', 'workdir']


def format_tables(rows: list[dict], grid_fields: list[str]) -> tuple[str, str]:
  """(results.csv, results.md) texts, both ranked; the markdown opens with how."""
  ranked, metric = rank(rows)
  columns = _columns(rows, grid_fields)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(columns)
  for row in ranked:
    writer.writerow([row.get(c, '') for c in columns])
  lines = [ranking_note(metric),
           '`seconds`: the epochs\' wall time (training and evaluation; start-up and '
           'compilation not included).', '']
  lines += markdown_rows(columns, [
      [format_cell(row.get(c), METRIC_COLUMNS, c).replace('|', '\\|') for c in columns]
      for row in ranked])
  return out.getvalue(), '\n'.join(lines) + '\n'


def write_results(workdir: str, points: list[Point],
                  status: dict[str, str]) -> tuple[list[dict], str]:
  """Writes results.csv and results.md from the points' metrics.jsonl; returns the
  rows, ranked, and the markdown."""
  rows = [result_row(p, MetricsLog(p.workdir).records(), status[p.name]) for p in points]
  csv_text, md_text = format_tables(rows, list(points[0].values))
  for name, text in ((RESULTS_CSV, csv_text), (RESULTS_MD, md_text)):
    storage.write_text(storage.join(workdir, name), text)
  return rank(rows)[0], md_text


# ---------------------------------------------------------------- command


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command, so that this module can be
  imported beside the other commands (absl flags are global)."""
  flags.DEFINE_string('workdir', None, 'Sweep folder: one subfolder per point, and the '
                      'results tables.')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_multi_string('grid', None, "A field and its values, 'field=v1,v2,...'; "
                            'repeat for more fields (their cartesian product is run).')
  define_study_flags()
  flags.mark_flags_as_required(['config', 'workdir', 'grid'])


def refuse_fields_also_overridden(flag: str, specs: list[str]) -> None:
  """A ConfigError for a field that a --grid/--space spec and a --config.field both set."""
  for spec in specs:
    field = spec.partition('=')[0].strip()
    if f'config.{field}' in FLAGS and FLAGS[f'config.{field}'].present:
      raise ConfigError(f'--config.{field} and {flag} {field} both set it; keep one.')


def main():
  refuse_fields_also_overridden('--grid', FLAGS.grid)
  run_sweep(loaded_config(), FLAGS.workdir, FLAGS.grid,
            say=lambda line: print(line, flush=True), storage_url=FLAGS.storage,
            study_name=FLAGS.study, heartbeat_seconds=FLAGS.heartbeat_seconds)


def define_study_flags():
  """The flags of a study shared by workers (the sweep's and the search's)."""
  flags.DEFINE_string('storage', None, 'An Optuna database URL (sqlite:///DIR/study.db, '
                      'postgresql://USER@HOST/DB) that the workers share; every process '
                      'started with it is one more worker.')
  flags.DEFINE_string('study', None, "The study's name in --storage (default: the "
                      "workdir's absolute path).")
  flags.DEFINE_integer('heartbeat_seconds', study.HEARTBEAT_SECONDS,
                       "A worker's heartbeat interval; a trial silent for twice this is "
                       'queued again and resumed by another worker.')


if __name__ == '__main__':
  define_flags()
  run_command(main)
