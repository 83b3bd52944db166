"""`config.steps_per_dispatch`: several train steps per jitted call give bitwise the
run of one step per call, with NaNs, saves, preemption stops and resumption at their
own steps or at dispatch boundaries."""

import json
import pathlib
import signal

import jax
import numpy as np
import pytest

from conftest import tiny_config
from deepdigits import checkpointing, config_checks, model_factory, sharding, train
from deepdigits import train_state as train_state_lib
from deepdigits.errors import ConfigError, NonFiniteError
from deepdigits.metrics_log import EpochProgress
from deepdigits.preemption import Preempted, PreemptionGuard

TIMING_KEYS = {'epoch_seconds', 'train_seconds', 'train_images_per_second',
               'host_memory_mib'}


def records(workdir) -> list[dict]:
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
          for line in lines]


def latest_state(workdir, config):
  manager = checkpointing.make_manager(str(workdir), max_to_keep=10)
  state = train_state_lib.abstract_train_state(config, model_factory.make_model(config),
                                               sharding.make_mesh())
  try:
    return jax.device_get(checkpointing.restore_latest(manager, state))
  finally:
    manager.close()


def arrays(state) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_states(a, b):
  a, b = arrays(a), arrays(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def reference_config(data_dir, **overrides):
  """tiny_trained_workdir's config: 2 epochs of 8 steps, recalibrated."""
  return tiny_config(data_dir, num_epochs=2, bn_recalibration_batches=4, **overrides)


def test_three_steps_a_dispatch_give_bitwise_the_run_of_one(tiny_trained_workdir,
                                                            tiny_mnist_dir, tmp_path):
  """8 steps an epoch in dispatches of 3, 3 and 2, checkpoints every 4 steps (so 3, 1,
  3, 1): the same metrics, checkpoint steps and final state as one step a call."""
  config = reference_config(tiny_mnist_dir, steps_per_dispatch=3, checkpoint_every_steps=4,
                            max_to_keep=10)
  train.train_and_evaluate(config, str(tmp_path))
  assert records(tmp_path) == records(tiny_trained_workdir)
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [4, 8, 12, 16]
  assert_same_states(latest_state(tmp_path, config),
                     latest_state(tiny_trained_workdir, reference_config(tiny_mnist_dir)))


def test_a_dispatch_boundary_stop_resumes_to_the_same_run(tiny_trained_workdir,
                                                          tiny_mnist_dir, tmp_path,
                                                          monkeypatch):
  """A stop asked for during step 5 is honoured after the dispatch that holds it (steps
  3-5, ending at step 6); the resumed run ends bitwise as one that never stopped."""
  asked_at = 5

  class StopDuringStep5(PreemptionGuard):

    def should_stop(self, step, steps=1):
      if step - steps <= asked_at < step:
        self.signum = signal.SIGTERM
      return super().should_stop(step, steps)

  monkeypatch.setattr(train, 'PreemptionGuard', StopDuringStep5)
  config = reference_config(tiny_mnist_dir, steps_per_dispatch=3)
  with pytest.raises(Preempted, match='stopped by SIGTERM at step 6;'):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(train, 'PreemptionGuard', PreemptionGuard)
  train.train_and_evaluate(config, str(tmp_path))  # resumes at step 6: dispatches 2, 3, 3, 2
  assert records(tmp_path) == records(tiny_trained_workdir)
  assert_same_states(latest_state(tmp_path, config),
                     latest_state(tiny_trained_workdir, reference_config(tiny_mnist_dir)))


def test_a_nan_inside_a_dispatch_is_reported_at_its_own_step(tiny_mnist_dir, tmp_path):
  """Adam at 1e30 (as in test_failures): the update from step 1 to 2 overflows, in the
  middle of the first dispatch of 3 steps."""
  absurd = tiny_config(tiny_mnist_dir, learning_rate=1e30, steps_per_dispatch=3)
  with pytest.raises(NonFiniteError) as info:
    train.train_and_evaluate(absurd, str(tmp_path))
  assert str(info.value).startswith('NaN or Inf in the update from step 1 to 2 ')


def test_the_progress_bar_counts_every_step_of_a_dispatch(monkeypatch):
  monkeypatch.setattr('sys.stdout.isatty', lambda: True)
  progress = EpochProgress(True, 1, 2, total_steps=8, first_step=0, batch_size=64)
  for steps in (3, 3, 2):
    progress.update({'loss_sum': 64.0 * steps, 'count': 64.0 * steps}, steps)
  assert progress._bar.n == 8  # pylint: disable=protected-access
  assert progress.loss_sum / progress.count == 1.0
  progress.close()


def test_hosts_agree_on_a_stop_at_each_dispatch_that_crosses_a_sync_step(monkeypatch):
  from deepdigits import preemption  # pylint: disable=g-import-not-at-top
  gathered = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, 'process_allgather',
                      lambda flag: gathered.append(int(flag)) or np.array([0, 15]))
  guard = PreemptionGuard()
  assert not guard.should_stop(9, 3)  # steps 7-9: no multiple of 10 crossed, no gather
  assert not gathered
  assert guard.should_stop(12, 3) and guard.signal_name == 'SIGTERM'  # 10 crossed
  assert gathered == [0]


def test_several_steps_a_dispatch_need_the_device_feed():
  mesh = sharding.make_mesh()
  with pytest.raises(ConfigError, match=r"steps_per_dispatch=4 needs --config.feed='device'"):
    config_checks.validate(tiny_config('', steps_per_dispatch=4, feed='host'), mesh)
  with pytest.raises(ConfigError, match=r'--config.steps_per_dispatch=0 must be > 0\.'):
    config_checks.validate(tiny_config('', steps_per_dispatch=0), mesh)
