"""Opt-in soak (`python -m pytest -m slow tests/test_soak.py -s`, about 30 minutes here):
10,000+ steps on the real MNIST with a checkpoint every 500 steps. Host memory stays
flat and the checkpoint folder holds exactly max_to_keep checkpoints."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_soak_ten_thousand_steps(mnist_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(
      [sys.executable, str(REPO / 'main.py'), '--config=configs/default.py',
       f'--workdir={tmp_path}', f'--config.data_dir={mnist_dir}',
       '--config.batch_size=32', '--config.num_epochs=6',  # 6 x 1,875 = 11,250 steps
       '--config.checkpoint_every_steps=500', '--config.max_to_keep=3'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  memory = [r['host_memory_mib'] for r in records]
  print('steps', records[-1]['step'], 'host MiB per epoch', [round(m) for m in memory],
        'test accuracy per epoch', [r['test_accuracy'] for r in records])
  assert records[-1]['step'] == 11_250
  assert memory[-1] - memory[1] < 0.05 * memory[1]  # flat after the first epoch
  checkpoints = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert checkpoints == [10_500, 11_000, 11_250]
