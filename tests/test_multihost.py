"""Two processes on localhost with jax.distributed (gloo CPU collectives, 2 fake devices
each) train like one process with 4 devices on the same global batches."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, xla_flags

WORKER = REPO / 'tests' / 'multihost_worker.py'
SCALARS = ('train_loss', 'test_loss', 'devices', 'processes')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def worker(process_id, num_processes, port, devices, data_dir, workdir, out, feed):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  return subprocess.Popen(
      [sys.executable, str(WORKER), str(process_id), str(num_processes), str(port),
       str(devices), data_dir, str(workdir), str(out), feed],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize('feed', ['host'])
def test_two_processes_match_one_process_with_four_devices(tiny_mnist_dir, tmp_path,
                                                         feed):
  """With the host feed each process reads only its rows of every batch (the device
  feed gives the same batches: tests/test_input_pipeline.py)."""
  port = free_port()
  processes = [worker(i, 2, port, 2, tiny_mnist_dir, tmp_path / 'multi',
                      tmp_path / f'p{i}.npz', feed)
               for i in range(2)]
  for p in processes:
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output[-3000:]
  single = worker(0, 1, 0, 4, tiny_mnist_dir, tmp_path / 'single', tmp_path / 'single.npz',
                  feed)
  output, _ = single.communicate(timeout=600)
  assert single.returncode == 0, output[-3000:]

  p0, p1, one = (np.load(tmp_path / f'{name}.npz') for name in ('p0', 'p1', 'single'))
  assert (int(p0['processes']), int(p0['devices'])) == (2, 4)
  assert (int(one['processes']), int(one['devices'])) == (1, 4)
  names = [k for k in p0.files if k not in SCALARS]
  # 26 parameter arrays and 12 BatchNorm statistics, then the optimizer's state ([2]).
  assert len([n for n in names if not n.startswith('[2]')]) == 38
  for name in names:  # both hosts hold the very same replicated state
    np.testing.assert_array_equal(p0[name], p1[name])

  # Same global batch and dropout masks: the losses and the BatchNorm statistics (which
  # see the data) agree to float rounding (the all-reduces sum in another order).
  np.testing.assert_allclose(p0['train_loss'], one['train_loss'], rtol=1e-5)
  np.testing.assert_allclose(p0['test_loss'], one['test_loss'], rtol=1e-5)
  for name in names:
    if name.startswith('[1]'):  # batch_stats
      np.testing.assert_allclose(p0[name], one[name], rtol=1e-4, atol=1e-5)
  # The same gradients: Adam's moments after one step are 0.1 g and 0.001 g^2, so they hold
  # each gradient and its scale (measured to agree within 4e-4 of each array's largest).
  moments = [n for n in names if n.startswith('[2]') and ('.mu' in n or '.nu' in n)]
  assert len(moments) == 52, moments
  for name in moments:
    np.testing.assert_allclose(p0[name], one[name], atol=1e-3 * np.abs(one[name]).max(),
                               err_msg=name)
  # Parameters: Adam's first step moves each by lr * sign(gradient), so a gradient within
  # rounding of zero may step the other way: what shows a real difference is how many
  # entries differ. All but a few agree to 1e-6; other batches or masks would move most.
  params = [n for n in names if n.startswith('[0]')]
  differing = sum(int((np.abs(p0[n] - one[n]) > 1e-6).sum()) for n in params)
  total = sum(p0[n].size for n in params)
  assert differing / total < 1e-3, (differing, total)


def test_a_signal_to_one_host_stops_every_host_at_the_same_step():
  """A SIGTERM that only process 1 receives, at step 3, reaches process 0 through the
  hosts' all-gather at step 10 (preemption.SYNC_EVERY_STEPS): both stop there, so both
  save the same checkpoint."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  processes = [subprocess.Popen([sys.executable, str(REPO / 'tests' / 'preemption_worker.py'),
                                 str(i), str(port)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  for p in processes:
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output[-3000:]
    assert output.splitlines()[-1] == 'stopped after step 10 by SIGTERM', output[-3000:]
