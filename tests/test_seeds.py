"""Seeds: which seeds, the per-seed rows and their mean and standard deviation, and a tiny
run over two seeds that a re-run skips."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from deepdigits import train
from deepdigits.errors import ConfigError
from deepdigits.metrics_log import MetricsLog
from deepdigits.tools import seeds


@pytest.mark.parametrize('text,expected', [
    ('0,1,2', [0, 1, 2]), ('0..4', [0, 1, 2, 3, 4]), ('3', [3]), ('0..1, 7', [0, 1, 7])])
def test_seeds_are_lists_and_inclusive_ranges(text, expected):
  assert seeds.parse_seeds(text) == expected


@pytest.mark.parametrize('args,message', [
    (('0,x', None), "'x' is neither a seed nor a range"),
    (('4..2', None), 'the range 4..2 is empty'),
    (('0..2,1', None), 'a seed is given twice'),
    ((None, None), 'give either --seeds'),
    (('0,1', 2), 'give either --seeds'),
    ((None, 0), '--num_seeds=0 must be >= 1'),
])
def test_bad_seeds_are_one_clear_error(args, message):
  with pytest.raises(ConfigError, match=message):
    seeds.seed_list(*args, first_seed=0)


def test_num_seeds_counts_from_the_configs_seed():
  assert seeds.seed_list(None, 3, first_seed=10) == [10, 11, 12]


def record(epoch, test, validation, best=False, seconds=10.0):
  r = {'epoch': epoch, 'step': 4 * epoch, 'test_accuracy': test,
       'validation_accuracy': validation, 'epoch_seconds': seconds}
  if best:
    r['best_checkpoint'] = True
  return r


def test_rows_and_their_mean_and_sample_std_are_exact():
  runs = {
      0: [record(1, 0.25, 0.5, best=True), record(2, 0.5, 0.25)],
      1: [record(1, 0.5, 0.5, best=True), record(2, 0.75, 0.75, best=True)],
      2: [record(1, 0.5, 0.25, best=True), record(2, 1.0, 0.5, best=True)],
      3: [record(1, 0.0, 0.0, best=True)],  # stopped after epoch 1 of 2: not averaged
  }
  rows = [seeds.seed_row(s, r, 2, 'pending' if s == 3 else 'done') for s, r in runs.items()]
  assert rows[0] == {'seed': 0, 'epochs': 2, 'test_accuracy': 0.5,
                     'validation_accuracy': 0.25, 'best_epoch': 1,
                     'best_test_accuracy': 0.25, 'best_validation_accuracy': 0.5,
                     'seconds': 20.0, 'status': 'done'}
  assert rows[3]['status'] == 'stopped at epoch 1'
  summary = seeds.summarize(rows, num_epochs=2)
  # test 0.5, 0.75, 1.0: mean 0.75, sample std sqrt((0.0625 + 0 + 0.0625) / 2) = 0.25.
  assert summary['test_accuracy'] == {'mean': 0.75, 'std': 0.25, 'n': 3}
  assert summary['validation_accuracy'] == {'mean': 0.5, 'std': 0.25, 'n': 3}
  # best checkpoints: 0.25 (epoch 1), 0.75, 1.0 (epoch 2).
  assert summary['best_test_accuracy']['mean'] == 2 / 3
  assert summary['best_test_accuracy']['std'] == pytest.approx(0.3818813079129867, abs=1e-15)
  assert summary['seconds'] == {'mean': 20.0, 'std': 0.0, 'n': 3}
  assert 'test_accuracy_recalibrated' not in summary
  assert seeds.summarize(rows[:1], 2)['test_accuracy'] == {'mean': 0.5, 'std': None, 'n': 1}

  md = seeds.format_markdown(rows, summary, 2)
  assert md.startswith('4 seeds; mean and sample standard deviation (n - 1) over the 3 '
                       'that finished all 2 epochs.')
  assert ('| seed | epochs | test_accuracy | validation_accuracy | best_epoch | '
          'best_test_accuracy | best_validation_accuracy | seconds | status |') in md
  assert '| mean |  | 0.7500 | 0.5000 |  | 0.6667 | 0.5833 | 20 |  |' in md
  assert '| std |  | 0.2500 | 0.2500 |  | 0.3819 | 0.1443 | 0 |  |' in md


def test_two_tiny_seeds_are_tabled_from_their_metrics_and_a_rerun_skips(
    tiny_seeds_folder, monkeypatch):
  root, config = tiny_seeds_folder['root'], tiny_seeds_folder['config']
  rows, summary = tiny_seeds_folder['rows'], tiny_seeds_folder['summary']
  records = [MetricsLog(str(root / f'seed={s}')).records() for s in (0, 1)]
  assert [[r['epoch'] for r in rs] for rs in records] == [[1], [1]]
  assert records[0][-1]['test_accuracy'] != records[1][-1]['test_accuracy'] or (
      records[0][-1]['train_loss'] != records[1][-1]['train_loss'])  # seeds differ
  saved = json.loads((root / 'seeds.json').read_text())
  assert saved['seeds'] == rows and saved['summary'] == summary
  for row, rs in zip(saved['seeds'], records):
    assert row['test_accuracy'] == rs[-1]['test_accuracy']
    assert row['validation_accuracy'] == rs[-1]['validation_accuracy']
    assert row['best_test_accuracy'] == rs[-1]['test_accuracy']  # one epoch: the best
    assert row['seconds'] == rs[-1]['epoch_seconds']
    assert row['epochs'] == 1 and row['status'] == 'done'
  tests = [rs[-1]['test_accuracy'] for rs in records]
  assert summary['test_accuracy']['mean'] == pytest.approx(sum(tests) / 2, abs=1e-15)
  assert summary['test_accuracy']['std'] == pytest.approx(abs(tests[0] - tests[1]) / 2**0.5,
                                                          abs=1e-15)
  assert summary['test_accuracy']['n'] == 2
  md = (root / 'seeds.md').read_text()
  assert f'| 0 | 1 | {tests[0]:.4f} |' in md and f'| 1 | 1 | {tests[1]:.4f} |' in md
  assert f'| mean |  | {summary["test_accuracy"]["mean"]:.4f} |' in md

  # The same command again: nothing trains, the tables are the same.
  calls, lines = [], []
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a: calls.append(a))
  assert seeds.run_seeds(config, str(root), [0, 1], say=lines.append) == (rows, summary)
  assert not calls
  assert sum('finished earlier, skipped' in line for line in lines) == 2


@pytest.mark.parametrize('args,message', [
    (['--seeds=0,1', '--config.seed=3'], '--config.seed and --seeds both set the seed; '
                                         'keep one.'),
    (['--seeds=0..2,1'], '--seeds=0..2,1: a seed is given twice.'),
    (['--seeds=0', '--num_seeds=2'], 'give either --seeds (e.g. 0,1,2 or 0..4) or '
                                     '--num_seeds.'),
])
def test_the_command_stops_on_bad_seeds_with_one_line(args, message, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.seeds', '--config=configs/cpu_quick.py',
       f'--workdir={tmp_path}', *args],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f'deepdigits: error: {message}'
  assert not list(tmp_path.iterdir())
