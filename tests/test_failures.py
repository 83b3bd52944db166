"""What a run survives: preemption, NaNs, corrupt checkpoints, a busy or bad workdir."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from deepdigits import (
  checkpointing,
  model_factory,
  preemption,
  rundir,
  sharding,
  train,
  train_state,
)
from deepdigits.errors import CheckpointError, ConfigError, NonFiniteError
from deepdigits.metrics_log import MetricsLog

TIMING_KEYS = {'epoch_seconds', 'train_seconds', 'train_images_per_second',
               'host_memory_mib'}


def restore(workdir, config):
  manager = checkpointing.make_manager(str(workdir), max_to_keep=10)
  model = model_factory.make_model(config)
  try:
    return checkpointing.restore_latest(
        manager, train_state.abstract_train_state(config, model, sharding.make_mesh()))
  finally:
    manager.close()


def metrics(workdir):
  return [json.loads(line) for line in
          (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def main_command(workdir, data_dir):
  """main.py for 2 epochs of 8 steps of 64: `main_config` as flags (the tiny runs'
  program, so that it compiles once for the tests here, in-process or not)."""
  return [sys.executable, str(REPO / 'main.py'), '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          '--config.batch_size=64', '--config.eval_batch_size=64', '--config.num_epochs=2']


def main_config(data_dir):
  return tiny_config(data_dir, num_epochs=2)


# The devices of this process, so that a run here is bitwise the same as one in main.py.
SAME_DEVICES = dict(os.environ)


def test_sigterm_saves_and_the_resumed_run_ends_with_the_same_params(tiny_mnist_dir,
                                                                      tmp_path):
  train.train_and_evaluate(main_config(tiny_mnist_dir), str(tmp_path / 'straight'))

  workdir = tmp_path / 'preempted'
  process = subprocess.Popen(main_command(workdir, tiny_mnist_dir), cwd=REPO,
                             env=SAME_DEVICES, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)  # during epoch 2 (epoch 1 was just logged)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  assert 'stopped by SIGTERM at step' in stderr and 'Run the same command to resume' in stderr
  stopped_at = int(stderr.split('at step ')[1].split(';')[0])
  assert 8 < stopped_at < 16  # within epoch 2
  assert (workdir / 'checkpoints' / str(stopped_at)).is_dir()

  resumed = subprocess.run(main_command(workdir, tiny_mnist_dir), cwd=REPO,
                           env=SAME_DEVICES, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'resuming from the checkpoint at step {stopped_at}' in resumed.stdout
  assert [r['epoch'] for r in metrics(workdir)] == [1, 2]
  # Every number but the timings, the interrupted epoch's training loss and accuracy
  # included (its earlier steps' sums come back with the checkpoint).
  strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                           for r in records]
  assert strip(metrics(workdir)) == strip(metrics(tmp_path / 'straight'))

  config = main_config(tiny_mnist_dir)
  a, b = restore(tmp_path / 'straight', config), restore(workdir, config)
  assert int(a.step) == int(b.step) == 16
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_mnist_dir, tmp_path):
  # Adam at 1e30 moves every weight by about 1e30: the state after step 1 is finite (and
  # saved), its L2 term overflows in the next step.
  absurd = tiny_config(tiny_mnist_dir, learning_rate=1e30, checkpoint_every_steps=1)
  with pytest.raises(NonFiniteError) as info:
    train.train_and_evaluate(absurd, str(tmp_path))
  assert str(info.value) == (
      'NaN or Inf in the update from step 1 to 2 (in the loss, its gradients or the '
      'updated state); training stopped there and the last good checkpoint, step 1, is '
      'kept. Lower --config.learning_rate or check the data.')
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert steps == [1]  # no poisoned checkpoint was written
  state = restore(tmp_path, absurd)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_an_update_that_poisons_the_weights_is_never_saved(tiny_mnist_dir, tmp_path):
  """1e39 is finite as a config value but infinite in float32: the first update's
  loss and gradients are finite, the weights it makes are not. (main.py turns the
  error into its one line and exit 1, as for every DeepDigitsError.)"""
  poisoned = tiny_config(tiny_mnist_dir, learning_rate=1e39, checkpoint_every_steps=1)
  with pytest.raises(NonFiniteError) as info:
    train.train_and_evaluate(poisoned, str(tmp_path))
  assert str(info.value) == (
      'NaN or Inf in the update from step 0 to 1 (in the loss, its gradients or the '
      'updated state); training stopped there and no checkpoint was written. Lower '
      '--config.learning_rate or check the data.')
  assert not list((tmp_path / 'checkpoints').iterdir())
  assert not (tmp_path / 'metrics.jsonl').exists()
  # Nothing was trained, so the same workdir takes a sane learning rate and trains.
  record = train.train_and_evaluate(tiny_config(tiny_mnist_dir, checkpoint_every_steps=1),
                                    str(tmp_path))
  assert record['step'] == 8 and np.isfinite(record['test_loss'])
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [6, 7, 8]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_mnist_dir, tmp_path,
                                                                  capsys):
  config = tiny_config(tiny_mnist_dir, num_epochs=2)
  train.train_and_evaluate(config, str(tmp_path))
  checkpoints = tmp_path / 'checkpoints'
  assert sorted(int(p.name) for p in checkpoints.iterdir()) == [8, 16]
  def scribble(checkpoint):  # over every data file
    for path in checkpoint.rglob('*'):
      if path.is_file() and 'ocdbt' in str(path.relative_to(checkpoint)):
        path.write_bytes(b'garbage')
  scribble(checkpoints / '16')
  (checkpoints / '24.orbax-checkpoint-tmp').mkdir()  # a half-written save: ignored
  state = restore(tmp_path, config)
  assert int(state.step) == 8
  lines = [line for line in capsys.readouterr().out.splitlines() if 'warning' in line]
  assert len(lines) == 1 and lines[0].startswith(
      f'deepdigits: warning: checkpoint {checkpoints}/16 is unreadable (')
  assert lines[0].endswith(f'); moved to {tmp_path}/corrupt_checkpoints/16, trying the '
                           'previous one.')
  # Moved with its files, not deleted; the half-written save left alone (the next
  # start clears it); the previous checkpoint untouched.
  moved = tmp_path / 'corrupt_checkpoints' / '16'
  assert moved.is_dir() and any(p.read_bytes() == b'garbage' for p in moved.rglob('*')
                                if p.is_file())
  assert sorted(p.name for p in checkpoints.iterdir()) == ['24.orbax-checkpoint-tmp', '8']
  # The run goes on from 8 and writes a good 16 again.
  record = train.train_and_evaluate(config, str(tmp_path))
  assert record['step'] == 16 and (checkpoints / '16').is_dir()
  # Set aside a second time, the step's first copy is kept beside it.
  scribble(checkpoints / '16')
  assert int(restore(tmp_path, config).step) == 8
  assert sorted(p.name for p in (tmp_path / 'corrupt_checkpoints').iterdir()) == ['16', '16.1']


HOLD_LOCK = ('import sys, time; from deepdigits import rundir\n'
             'with rundir.locked(sys.argv[1]):\n'
             '  print("locked", flush=True); time.sleep(600)')


def test_a_workdir_in_use_is_refused_and_freed_when_its_run_is_killed(tiny_mnist_dir,
                                                                      tmp_path):
  """Another process holds the lock: a second run is refused, naming it, and trains
  nothing; once that process is killed with SIGKILL (no clean-up of its own), the
  kernel has released the lock and the workdir can be used."""
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(ConfigError) as error:
      train.train_and_evaluate(tiny_config(tiny_mnist_dir), str(tmp_path))
    assert str(error.value) == (
        f'another run (pid {holder.pid}) is using workdir {str(tmp_path)!r}; wait for it '
        'to finish or pick another --workdir.')
    assert not (tmp_path / 'checkpoints').exists()
  finally:
    holder.kill()
    holder.wait()
  with rundir.locked(str(tmp_path)):
    assert (tmp_path / rundir.LOCK_NAME).read_text() == str(os.getpid())


def test_workdir_that_cannot_be_created(tiny_mnist_dir, tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ConfigError, match='cannot create workdir'):
    train.train_and_evaluate(tiny_config(tiny_mnist_dir), str(tmp_path / 'a_file' / 'run'))


def _broken_copy(source_dir, target_dir, breakage):
  """A copy of the tiny MNIST folder with one thing broken."""
  target_dir.mkdir()
  for name in os.listdir(source_dir):
    (target_dir / name).write_bytes((pathlib.Path(source_dir) / name).read_bytes())
  breakage(target_dir)
  return target_dir


def _set_byte(path, offset, value):
  data = bytearray(path.read_bytes())
  data[offset] = value
  path.write_bytes(bytes(data))


BREAKAGES = {
    'missing file': (lambda d: (d / 't10k-labels-idx1-ubyte').unlink(),
                     't10k-labels-idx1-ubyte[.gz] not found'),
    'truncated file': (lambda d: (d / 'train-images-idx3-ubyte').write_bytes(
        (d / 'train-images-idx3-ubyte').read_bytes()[:-1000]), 'the file is truncated'),
    'wrong magic': (lambda d: _set_byte(d / 'train-labels-idx1-ubyte', 3, 0x03),
                    'magic number 0x00000803, expected 0x00000801'),
    'count mismatch': (lambda d: (d / 't10k-labels-idx1-ubyte').write_bytes(
        (d / 't10k-labels-idx1-ubyte').read_bytes()[:8 + 299].replace(
            (300).to_bytes(4, 'big'), (299).to_bytes(4, 'big'), 1)),
                       'holds 300 images but'),
    'label out of range': (lambda d: _set_byte(d / 'train-labels-idx1-ubyte', 8 + 5, 12),
                           'label 12 at index 5 is outside 0..9'),
}


# One case through main.py, for the path from the data to its one line; every kind of
# damage is tested in-process in test_data.py.
@pytest.mark.parametrize('case', ['count mismatch'])
def test_bad_data_stops_main_with_one_line(case, tiny_mnist_dir, tmp_path):
  breakage, message = BREAKAGES[case]
  data_dir = _broken_copy(tiny_mnist_dir, tmp_path / 'data', breakage)
  result = subprocess.run(main_command(tmp_path / 'run', data_dir), cwd=REPO,
                          env=SAME_DEVICES, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert message in result.stderr and 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('deepdigits:')]
  assert len(errors) == 1
  assert not (tmp_path / 'run' / 'checkpoints').exists()  # stopped before any training


def test_a_full_disk_stops_before_the_save_and_leftovers_go_at_the_next_start(
    tiny_mnist_dir, tmp_path, monkeypatch):
  # A checkpoint every 2 epochs: a 1-epoch run still saves its last one.
  config = tiny_config(tiny_mnist_dir, checkpoint_every_epochs=2)
  usage = checkpointing.shutil.disk_usage
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage',
                      lambda path: usage(path)._replace(free=5 << 20))  # 5 MiB free
  with pytest.raises(CheckpointError) as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert str(info.value) == (
      f'no room for a checkpoint in {tmp_path}/checkpoints: 5 MiB free, a checkpoint takes '
      'about 30 MiB; no checkpoint was written. Free some space, then run the same command '
      'to resume.')
  assert os.listdir(tmp_path / 'checkpoints') == []
  monkeypatch.undo()
  # What a save stopped mid-write leaves: removed at the next start, which trains on.
  (tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp' / 'default').mkdir(parents=True)
  record = train.train_and_evaluate(config, str(tmp_path))
  assert record['step'] == 8
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['8']


def test_a_first_ctrl_c_asks_for_a_stop_and_a_second_one_stops_at_once():
  """The guard records a first SIGINT (or SIGTERM) for the loop to honour; it then gives
  the signal back to the handler it found, so a second Ctrl-C raises KeyboardInterrupt
  at once (which every command turns into exit 130) and a second SIGTERM kills."""
  found = signal.signal(signal.SIGINT, signal.default_int_handler)  # a command's own
  try:
    with preemption.PreemptionGuard() as guard:
      assert not guard.should_stop(1)
      os.kill(os.getpid(), signal.SIGINT)
      assert guard.should_stop(2) and guard.signal_name == 'SIGINT'
      assert signal.getsignal(signal.SIGTERM) == guard._handle  # still caught
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, found)


def test_ctrl_c_in_training_saves_the_step_and_stops_with_exit_130(tiny_mnist_dir, tmp_path,
                                                                   monkeypatch):
  """A SIGINT just after epoch 1 is logged: the run saves the next step's state and
  stops with the message main.py prints (exit 128 + 2)."""
  write = MetricsLog.write

  def write_then_interrupt(log, record):
    write(log, record)
    os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(MetricsLog, 'write', write_then_interrupt)
  with pytest.raises(preemption.Preempted) as stop:
    train.train_and_evaluate(tiny_config(tiny_mnist_dir, num_epochs=2), str(tmp_path))
  assert stop.value.exit_code == 130
  assert str(stop.value) == (f'stopped by SIGINT at step 9; the checkpoint is saved in '
                             f'{tmp_path}/checkpoints/9. Run the same command to resume.')
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [8, 9]
  assert int(restore(tmp_path, tiny_config(tiny_mnist_dir)).step) == 9
