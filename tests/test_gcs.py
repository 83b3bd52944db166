"""gs:// workdirs end to end, against a GCS API on loopback (gcp-storage-emulator, started
and stopped here): a run that is stopped by SIGTERM and resumed ends as a local run
does; evaluate, plots, predict and a sweep work there too; a missing bucket is one
line. gcsfs finds the emulator through STORAGE_EMULATOR_HOST, tensorstore (Orbax's
array writer) through TENSORSTORE_GCS_HTTP_URL."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

BUCKET = 'deepdigits-test'
pytest.importorskip('gcsfs', reason='gs:// workdirs need gcsfs (pip install -e ".[gcs]")')
pytest.importorskip('gcp_storage_emulator',
                    reason='gcp-storage-emulator is not installed (pip install -e ".[dev]")')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs_env():
  """The environment of a process that talks to the emulator, for the module's tests."""
  port = free_port()
  server = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'),
                             str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail('the GCS emulator did not start')
      time.sleep(0.1)
  url = f'http://127.0.0.1:{port}'
  env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  try:
    yield env
  finally:
    server.terminate()
    server.wait(timeout=30)


def command(module_or_script, *args):
  program = ([str(REPO / 'main.py')] if module_or_script == 'main'
             else ['-m', module_or_script])
  return [sys.executable, *program, *args]


def run(env, *cmd, timeout=600):
  return subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def train_args(workdir, data_dir):
  """3 epochs of 8 steps (256 images, batch 32), as tests/test_failures.py's runs."""
  return [f'--workdir={workdir}', '--config=configs/default.py',
          f'--config.data_dir={data_dir}', '--config.train_subset=256',
          '--config.batch_size=32', '--config.eval_batch_size=64',
          '--config.num_epochs=3', '--config.progress=False',
          '--config.model_summary=False']


def gcs_read(env, path: str) -> str:
  script = ('import sys; from etils import epath; '
            'sys.stdout.write(epath.Path(sys.argv[1]).read_text())')
  result = run(env, sys.executable, '-c', script, path, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def gcs_list(env, path: str) -> list[str]:
  script = ('import sys; from etils import epath; '
            'print("\\n".join(sorted(p.name for p in epath.Path(sys.argv[1]).iterdir())))')
  result = run(env, sys.executable, '-c', script, path, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.split()


TIMING_KEYS = {'epoch_seconds', 'train_seconds', 'train_images_per_second',
               'host_memory_mib'}


def without_timings(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_clean(output: str):
  assert 'Traceback' not in output
  assert 'Could not determine bucket type' not in output
  assert 'credentials were not found' not in output


@pytest.fixture(scope='module')
def gcs_run(gcs_env, tiny_mnist_dir, tmp_path_factory):
  """A run on gs://, stopped by SIGTERM in epoch 2 and resumed; and the same run local."""
  local = tmp_path_factory.mktemp('local_run')
  straight = run(gcs_env, *command('main', *train_args(local, tiny_mnist_dir)))
  assert straight.returncode == 0, straight.stderr[-2000:]

  workdir = f'gs://{BUCKET}/run'
  process = subprocess.Popen(command('main', *train_args(workdir, tiny_mnist_dir)),
                             cwd=REPO, env=gcs_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  for line in process.stdout:  # the epoch lines, as the run prints them
    if line.startswith('epoch   1'):
      process.send_signal(signal.SIGTERM)  # during epoch 2
      break
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  stopped_at = int(stderr.split('at step ')[1].split(';')[0])
  resumed = run(gcs_env, *command('main', *train_args(workdir, tiny_mnist_dir)))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  return {'workdir': workdir, 'local': local, 'stopped_at': stopped_at,
          'first': stdout + stderr, 'resumed': resumed}


def test_a_gs_run_is_stopped_resumed_and_ends_as_a_local_run(gcs_run, gcs_env):
  assert 8 < gcs_run['stopped_at'] < 24
  resumed = gcs_run['resumed']
  assert f'resuming from the checkpoint at step {gcs_run["stopped_at"]}' in resumed.stdout
  assert_clean(gcs_run['first'] + resumed.stdout + resumed.stderr)
  remote = [json.loads(line) for line in
            gcs_read(gcs_env, f'{gcs_run["workdir"]}/metrics.jsonl').splitlines()]
  local = [json.loads(line) for line in
           (gcs_run['local'] / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in remote] == [1, 2, 3]
  # The same final metrics (the epoch that was interrupted sums only its later steps).
  for key in ('test_loss', 'test_accuracy', 'step'):
    assert remote[-1][key] == local[-1][key], key
  assert without_timings(remote)[0] == without_timings(local)[0]
  names = gcs_list(gcs_env, gcs_run['workdir'])
  assert {'config.json', 'metrics.jsonl', 'checkpoints'} <= set(names)
  assert any(n.startswith('events.out.tfevents') for n in names)  # TensorBoard
  assert '24' in gcs_list(gcs_env, f'{gcs_run["workdir"]}/checkpoints')
  assert json.loads(gcs_read(gcs_env, f'{gcs_run["workdir"]}/config.json'))['seed'] == 0


def test_evaluate_plots_and_predict_read_a_gs_workdir(gcs_run, gcs_env, tmp_path):
  workdir = gcs_run['workdir']
  evaluated = run(gcs_env, *command('main', f'--workdir={workdir}', '--mode=evaluate'))
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  local_last = json.loads((gcs_run['local'] / 'metrics.jsonl').read_text().splitlines()[-1])
  assert f'accuracy {local_last["test_accuracy"]:.4f}' in evaluated.stdout
  assert_clean(evaluated.stdout + evaluated.stderr)

  plots = run(gcs_env, *command('deepdigits.tools.plots', f'--workdir={workdir}'))
  assert plots.returncode == 0, plots.stderr[-2000:]
  assert sorted(gcs_list(gcs_env, f'{workdir}/plots')) == [
      'confusion.png', 'curves.png', 'gallery.png']
  assert_clean(plots.stdout + plots.stderr)

  digit = np.zeros((28, 28), np.uint8)
  digit[4:24, 12:16] = 255  # a one
  Image.fromarray(digit).save(tmp_path / 'one.png')
  predicted = run(gcs_env, *command('deepdigits.tools.predict', f'--workdir={workdir}',
                                    str(tmp_path / 'one.png')))
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  assert predicted.stdout.startswith(f'{tmp_path / "one.png"}: ')
  assert_clean(predicted.stdout + predicted.stderr)


def test_a_sweep_on_gs_trains_each_point_and_writes_its_tables(gcs_env, tiny_mnist_dir):
  root = f'gs://{BUCKET}/sweep'
  result = run(gcs_env, *command(
      'deepdigits.tools.sweep', f'--workdir={root}', '--config=configs/default.py',
      f'--config.data_dir={tiny_mnist_dir}', '--config.train_subset=64',
      '--config.batch_size=32', '--config.eval_batch_size=64', '--config.num_epochs=1',
      '--config.progress=False', '--config.model_summary=False',
      '--grid=learning_rate=1e-3,3e-3'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert_clean(result.stdout + result.stderr)
  names = gcs_list(gcs_env, root)
  assert {'learning_rate=0.001', 'learning_rate=0.003', 'results.csv', 'results.md'} <= set(
      names)
  table = gcs_read(gcs_env, f'{root}/results.md')
  assert 'learning_rate=0.001' in table and 'learning_rate=0.003' in table


def test_a_missing_bucket_is_one_line_before_any_work(gcs_env, tiny_mnist_dir):
  result = run(gcs_env, *command('main', *train_args('gs://no-such-bucket/run',
                                                     tiny_mnist_dir)), timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'deepdigits: error: --workdir: bucket gs://no-such-bucket does not exist or is not '
      'visible with these credentials; create it, or fix the path.')
  assert_clean(result.stdout + result.stderr)


def test_a_gs_path_without_gcsfs_says_what_to_install(monkeypatch):
  from deepdigits import storage  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(storage.importlib.util, 'find_spec', lambda name: None)
  assert storage.backend_problem('gs://b/run') == (
      "gs://b/run: gs:// paths need the gcsfs package: pip install -e '.[gcs]'")
  assert storage.backend_problem(pathlib.Path('runs/a')) is None
