"""The same config over several seeds: `python -m deepdigits.tools.seeds --config=... --workdir=DIR
--seeds=0,1,2` (or `--seeds=0..4`, or `--num_seeds=5`).

One accuracy says little when seeds differ by a tenth of a percent; the mean and the
sample standard deviation over seeds say how far two recipes really are apart. The seeds
run as a sweep over `seed` (`deepdigits.tools.sweep`: one workdir per seed, `DIR/seed=0`, in
this process, resumable, finished seeds skipped); the per-seed table and its mean and
standard deviation go to `DIR/seeds.md` and `DIR/seeds.json`, rewritten after every seed.
"""

import json
import statistics
from typing import Any, Callable, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

from deepdigits import storage
from deepdigits.cli import loaded_config, run_command
from deepdigits.errors import ConfigError
from deepdigits.metrics_log import MetricsLog
from deepdigits.tools import sweep

SEEDS_MD = 'seeds.md'
SEEDS_JSON = 'seeds.json'
# The final epoch's metrics a seed's row shows, when its run reports them.
FINAL_METRICS = ('test_accuracy', 'test_accuracy_recalibrated', 'validation_accuracy',
                 'validation_accuracy_recalibrated')
# The same metrics at the epoch of the best checkpoint (highest validation accuracy).
BEST_METRICS = tuple('best_' + m for m in FINAL_METRICS)
SUMMARIZED = FINAL_METRICS + BEST_METRICS + ('seconds',)


# ---------------------------------------------------------------- which seeds


def parse_seeds(text: str) -> list[int]:
  """'0,1,2', '0..4' (both ends included) or a mix ('0..2,7') as a list of seeds."""
  seeds = []
  for part in (p.strip() for p in text.split(',')):
    first, dots, last = part.partition('..')
    try:
      seeds.extend(range(int(first), int(last) + 1) if dots else [int(part)])
    except ValueError:
      raise ConfigError(f"--seeds={text}: {part!r} is neither a seed nor a range like "
                        "'0..4'.") from None
    if dots and int(last) < int(first):
      raise ConfigError(f'--seeds={text}: the range {part} is empty.')
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f'--seeds={text}: a seed is given twice.')
  return seeds


def seed_list(seeds_text: Optional[str], num_seeds: Optional[int],
              first_seed: int) -> list[int]:
  """The seeds from --seeds, or --num_seeds of them from first_seed (config.seed) on."""
  if (seeds_text is None) == (num_seeds is None):
    raise ConfigError('give either --seeds (e.g. 0,1,2 or 0..4) or --num_seeds.')
  if seeds_text is not None:
    return parse_seeds(seeds_text)
  if num_seeds < 1:
    raise ConfigError(f'--num_seeds={num_seeds} must be >= 1.')
  return list(range(first_seed, first_seed + num_seeds))


# ---------------------------------------------------------------- rows and summary


def seed_row(seed: int, records: list[dict], num_epochs: int, status: str) -> dict:
  """A seed's row from its metrics.jsonl records: the final epoch's metrics, those of
  the best checkpoint's epoch if the run kept one, the epochs' wall seconds."""
  counted, records = sweep.run_row(records, num_epochs, status, FINAL_METRICS)
  row: dict[str, Any] = {'seed': seed, 'epochs': counted.pop('epochs')}
  row.update({m: counted.pop(m) for m in FINAL_METRICS if m in counted})
  best = [r for r in records if r.get('best_checkpoint')]
  if best:
    row['best_epoch'] = best[-1]['epoch']
    row.update({'best_' + m: best[-1][m] for m in FINAL_METRICS if m in best[-1]})
  row.update(counted)  # seconds, status
  return row


def summarize(rows: list[dict], num_epochs: int) -> dict[str, dict]:
  """{metric: {'mean', 'std', 'n'}} over the seeds that finished all num_epochs; 'std' is
  the sample standard deviation (n - 1), None for fewer than two seeds."""
  complete = [r for r in rows if r['epochs'] == num_epochs]
  summary = {}
  for metric in SUMMARIZED:
    values = [r[metric] for r in complete if metric in r]
    if values:
      summary[metric] = {'mean': statistics.mean(values),
                         'std': statistics.stdev(values) if len(values) > 1 else None,
                         'n': len(values)}
  return summary


def format_markdown(rows: list[dict], summary: dict[str, dict], num_epochs: int) -> str:
  """seeds.md: a row per seed, then the mean and the sample standard deviation."""
  columns = ['seed', 'epochs'] + [m for m in FINAL_METRICS if any(m in r for r in rows)]
  best = [m for m in BEST_METRICS if any(m in r for r in rows)]
  columns += (['best_epoch'] + best if best else []) + ['seconds', 'status']
  n = max((s['n'] for s in summary.values()), default=0)
  lines = [f'{len(rows)} seeds; mean and sample standard deviation (n - 1) over the {n} '
           f'that finished all {num_epochs} epochs. `best_*`: the epoch of the best '
           'validation accuracy (workdir/best_checkpoint). `seconds`: the epochs\' wall '
           'time.', '']
  cell = lambda column, value: sweep.format_cell(value, FINAL_METRICS + BEST_METRICS,
                                                 column, empty='-')
  table = [[cell(c, row.get(c)) for c in columns] for row in rows]
  table += [[stat, ''] + [cell(c, summary[c][stat]) if c in summary else ''
                          for c in columns[2:]] for stat in ('mean', 'std')]
  return '\n'.join(lines + sweep.markdown_rows(columns, table)) + '\n'


def write_tables(workdir: str, points: list[sweep.Point], status: dict[str, str],
                 num_epochs: int) -> tuple[list[dict], dict, str]:
  """Writes seeds.md and seeds.json from the seeds' metrics.jsonl; returns the rows, the
  summary and the markdown."""
  rows = [seed_row(p.values['seed'], MetricsLog(p.workdir).records(), num_epochs,
                   status[p.name]) for p in points]
  for row, point in zip(rows, points):
    row['workdir'] = point.name
  summary = summarize(rows, num_epochs)
  markdown = format_markdown(rows, summary, num_epochs)
  storage.write_text(storage.join(workdir, SEEDS_MD), markdown)
  storage.write_text(storage.join(workdir, SEEDS_JSON), json.dumps(
      {'num_epochs': num_epochs, 'seeds': rows, 'summary': summary}, indent=2) + '\n')
  return rows, summary, markdown


# ---------------------------------------------------------------- running


def run_seeds(config: ml_collections.ConfigDict, workdir: str, seeds: list[int],
              say: Callable[[str], None] = print) -> tuple[list[dict], dict]:
  """Trains config once per seed (skipping finished seeds) and writes the tables after
  each; returns (rows, summary). A DeepDigitsError at the end names failed seeds."""
  points = sweep.plan(config, workdir, ['seed=' + ','.join(str(s) for s in seeds)])
  write = lambda status: write_tables(workdir, points, status, config.num_epochs)
  status = sweep.run_points(workdir, points, say, write)
  rows, summary, markdown = write(status)
  say(markdown.rstrip())
  error = sweep.failed_points_error(points, status, storage.join(workdir, SEEDS_MD))
  if error:
    raise error
  return rows, summary


# ---------------------------------------------------------------- command


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command (absl flags are global)."""
  flags.DEFINE_string('workdir', None, 'Folder of the seeds: one subfolder per seed, and '
                      'seeds.md / seeds.json.')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_string('seeds', None, "The seeds: '0,1,2', '0..4' (both ends included).")
  flags.DEFINE_integer('num_seeds', None, 'Or this many seeds, from --config.seed on.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main():
  seed_overridden = 'config.seed' in FLAGS and FLAGS['config.seed'].present
  if FLAGS.seeds is not None and seed_overridden:
    raise ConfigError('--config.seed and --seeds both set the seed; keep one.')
  config = loaded_config()
  seeds = seed_list(FLAGS.seeds, FLAGS.num_seeds, config.seed)
  run_seeds(config, FLAGS.workdir, seeds, say=lambda line: print(line, flush=True))


if __name__ == '__main__':
  define_flags()
  run_command(main)
