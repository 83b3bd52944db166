"""gs:// workdirs end to end, against a GCS API on loopback (gcp-storage-emulator, started
and stopped here): a run that is stopped by SIGTERM and resumed ends as a local run
does; evaluate, plots, predict and a sweep work there too; a missing bucket is one
line. gcsfs finds the emulator through STORAGE_EMULATOR_HOST, tensorstore (Orbax's
array writer) through TENSORSTORE_GCS_HTTP_URL."""

import gc
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
from etils import epath
from PIL import Image

from conftest import REPO, tiny_config
from deepdigits import inference, storage, train
from deepdigits.tools import plots, predict, sweep

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
  """The emulator, and the environment that points gcsfs and tensorstore at it: for
  the commands started here, and for this process (the in-process commands)."""
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
  variables = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url}
  saved = {k: os.environ.get(k) for k in variables}
  os.environ.update(variables)
  storage.quiet_cloud_logging()
  try:
    yield dict(os.environ)
  finally:
    # tensorboardX's GCS writer uploads once more when it is collected: while the
    # emulator is still up, not at the interpreter's exit (where it would retry for 2
    # minutes against a closed port).
    gc.collect()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


def main_command(*args):
  return [sys.executable, str(REPO / 'main.py'), *args]


def train_config(data_dir, **overrides):
  """2 epochs of 8 steps of 64 (the tiny runs' program, compiled once for all)."""
  return tiny_config(data_dir, **{'num_epochs': 2, 'progress': False, **overrides})


def train_args(workdir, data_dir):
  """train_config as main.py's flags."""
  return [f'--workdir={workdir}', '--config=configs/default.py',
          f'--config.data_dir={data_dir}', '--config.batch_size=64',
          '--config.eval_batch_size=64', '--config.num_epochs=2', '--config.progress=False',
          '--config.model_summary=False']


def gcs_text(path: str) -> str:
  return epath.Path(path).read_text()


def gcs_names(path: str) -> list[str]:
  return sorted(p.name for p in epath.Path(path).iterdir())


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
  """A run on gs://, stopped by SIGTERM in epoch 2 and resumed (main.py, as a user runs
  it); and the same run in a local folder."""
  local = tmp_path_factory.mktemp('local_run')
  train.train_and_evaluate(train_config(tiny_mnist_dir), str(local))
  workdir = f'gs://{BUCKET}/run'
  scratch = tmp_path_factory.mktemp('tmpdir')  # where the runs keep their local events
  env = {**gcs_env, 'TMPDIR': str(scratch)}
  process = subprocess.Popen(main_command(*train_args(workdir, tiny_mnist_dir)),
                             cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  for line in process.stdout:  # the epoch lines, as the run prints them
    if line.startswith('epoch   1'):
      process.send_signal(signal.SIGTERM)  # during epoch 2
      break
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  stopped_at = int(stderr.split('at step ')[1].split(';')[0])
  left_by_the_stop = sorted(p.name for p in scratch.glob('deepdigits-events-*'))
  resumed = subprocess.run(main_command(*train_args(workdir, tiny_mnist_dir)), cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  return {'workdir': workdir, 'local': local, 'stopped_at': stopped_at,
          'first': stdout + stderr, 'resumed': resumed,
          'left_in_tmpdir': left_by_the_stop + sorted(
              p.name for p in scratch.glob('deepdigits-events-*'))}


def test_a_gs_run_is_stopped_resumed_and_ends_as_a_local_run(gcs_run):
  assert 8 < gcs_run['stopped_at'] < 16
  resumed = gcs_run['resumed']
  assert f'resuming from the checkpoint at step {gcs_run["stopped_at"]}' in resumed.stdout
  assert_clean(gcs_run['first'] + resumed.stdout + resumed.stderr)
  remote = [json.loads(line) for line in
            gcs_text(f'{gcs_run["workdir"]}/metrics.jsonl').splitlines()]
  local = [json.loads(line) for line in
           (gcs_run['local'] / 'metrics.jsonl').read_text().splitlines()]
  # Every number but the timings, the interrupted epoch included.
  assert without_timings(remote) == without_timings(local)
  names = gcs_names(gcs_run['workdir'])
  assert {'config.json', 'metrics.jsonl', 'checkpoints'} <= set(names)
  assert any(n.startswith('events.out.tfevents') for n in names)  # TensorBoard
  assert gcs_run['left_in_tmpdir'] == []  # the local events folders, stopped or not
  assert '16' in gcs_names(f'{gcs_run["workdir"]}/checkpoints')
  assert json.loads(gcs_text(f'{gcs_run["workdir"]}/config.json'))['seed'] == 0


def test_evaluate_plots_and_predict_read_a_gs_workdir(gcs_run, tmp_path, capsys):
  workdir = gcs_run['workdir']
  local_last = json.loads((gcs_run['local'] / 'metrics.jsonl').read_text().splitlines()[-1])
  result = inference.evaluate_workdir(workdir)
  assert result['step'] == 16 and result['test_accuracy'] == local_last['test_accuracy']

  plots.write_plots(workdir)
  assert gcs_names(f'{workdir}/plots') == ['confusion.png', 'curves.png', 'gallery.png']

  digit = np.zeros((28, 28), np.uint8)
  digit[4:24, 12:16] = 255  # a one
  Image.fromarray(digit).save(tmp_path / 'one.png')
  assert predict.predict_files(workdir, [str(tmp_path / 'one.png')]) == 0
  out = capsys.readouterr()
  assert f'{tmp_path / "one.png"}: ' in out.out
  assert_clean(out.out + out.err)


def test_a_sweep_on_gs_trains_each_point_and_writes_its_tables(gcs_env, tiny_mnist_dir):
  root = f'gs://{BUCKET}/sweep'
  config = train_config(tiny_mnist_dir, num_epochs=1)
  rows = sweep.run_sweep(config, root, ['seed=0,1'], say=lambda _: None)  # one compile
  assert sorted(r['workdir'] for r in rows) == ['seed=0', 'seed=1']
  assert {'seed=0', 'seed=1', 'results.csv', 'results.md'} <= set(gcs_names(root))
  table = gcs_text(f'{root}/results.md')
  assert '| seed=0 |' in table and '| seed=1 |' in table


def test_a_missing_bucket_is_one_line_before_any_work(gcs_env, tiny_mnist_dir):
  result = subprocess.run(main_command(*train_args('gs://no-such-bucket/run',
                                                   tiny_mnist_dir)),
                          cwd=REPO, env=gcs_env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'deepdigits: error: --workdir: bucket gs://no-such-bucket does not exist or is not '
      'visible with these credentials; create it, or fix the path.')
  assert_clean(result.stdout + result.stderr)


def test_a_gs_path_without_gcsfs_says_what_to_install(monkeypatch):
  monkeypatch.setattr(storage.importlib.util, 'find_spec', lambda name: None)
  assert storage.backend_problem('gs://b/run') == (
      "gs://b/run: gs:// paths need the gcsfs package: pip install -e '.[gcs]'")
  assert storage.backend_problem(pathlib.Path('runs/a')) is None
