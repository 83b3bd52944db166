"""Opt-in soak (`python -m pytest -m slow -s -n 0 tests/test_soak.py`, about 20 minutes here):
10,000 steps on real MNIST digits with a checkpoint every 100 steps and a test pass
every 250. Host memory stays flat and the checkpoint folder holds exactly max_to_keep
checkpoints.

Small batches of a 2,000-image slice make every part of the loop that could leak (the
step, the feed, checkpoint saves and their rotation, evaluation, logging) run many times
for little compute: 10,000 steps, 100 saves and 40 test passes.
"""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import REPO, xla_flags

STEPS_PER_EPOCH = 250  # 2,000 images / batch 8
EPOCHS = 40
WARM_UP_EPOCHS = 5


@pytest.mark.slow
def test_soak_ten_thousand_steps(mnist_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  result = subprocess.run(
      [sys.executable, str(REPO / 'main.py'), '--config=configs/default.py',
       f'--workdir={tmp_path}', f'--config.data_dir={mnist_dir}',
       '--config.train_subset=2000', '--config.batch_size=8',
       f'--config.num_epochs={EPOCHS}', '--config.checkpoint_every_steps=100',
       '--config.max_to_keep=3', '--config.progress=False'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]

  # Resident memory after each epoch (read after malloc_trim) moves by tens of MiB from
  # epoch to epoch with what XLA and the allocator hold; a leak shows as a trend. Compare
  # the medians of the two halves after the warm-up: a steady leak of 10% per 10,000
  # steps would raise the second half's median by about 5%.
  memory = [r['host_memory_mib'] for r in records]
  settled = memory[WARM_UP_EPOCHS:]
  first, second = settled[:len(settled) // 2], settled[len(settled) // 2:]
  growth = statistics.median(second) / statistics.median(first) - 1
  print(f'\nhost MiB per epoch {[round(m) for m in memory]}; medians after the warm-up: '
        f'{statistics.median(first):.0f} then {statistics.median(second):.0f} '
        f'({growth:+.1%}); final test accuracy {records[-1]["test_accuracy"]}')
  assert growth < 0.05

  checkpoints = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert checkpoints == [9_800, 9_900, 10_000]
