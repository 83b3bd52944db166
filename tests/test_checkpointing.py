"""Orbax checkpoints: round trip, exact resume, and a clear error on a mismatch."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from deepdigits import checkpointing, model_factory, sharding, train, train_state
from deepdigits.errors import CheckpointError
from deepdigits.model import DeepDigitsCNN


def _state(config, model=None):
  mesh = sharding.make_mesh()
  model = model or model_factory.make_model(config)
  return train_state.create_train_state(config, model, mesh)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.devices(8)
def test_round_trip_restores_equal_trees(tmp_path):
  config = tiny_config('')
  state = _state(config)
  state = state.replace(step=state.step + 7,
                        batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats))
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  fresh = _state(tiny_config('', seed=1))
  restored = checkpointing.restore_latest(manager, fresh)
  assert int(restored.step) == 7
  assert_trees_equal((restored.params, restored.batch_stats, restored.opt_state, restored.rng),
                     (state.params, state.batch_stats, state.opt_state, state.rng))
  assert restored.params['conv1']['kernel'].sharding.is_fully_replicated
  # The same types as a fresh state's, weak typing included: else the train step would
  # compile a second program for a resumed run.
  kinds = lambda s: [(x.dtype, x.shape, x.weak_type, x.sharding) for x in jax.tree.leaves(s)]
  assert kinds(restored) == kinds(fresh)
  # The abstract template of the commands that only read (nothing computed) describes
  # the same state, and restores the same one.
  abstract = train_state.abstract_train_state(config, model_factory.make_model(config),
                                              sharding.make_mesh())
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  described = lambda s: [(jax.tree_util.keystr(path), x.dtype, x.shape, x.sharding)
                         for path, x in jax.tree_util.tree_flatten_with_path(s)[0]]
  assert described(abstract) == described(fresh)
  from_abstract = checkpointing.restore_latest(manager, abstract)
  fields = lambda s: (s.step, s.params, s.batch_stats, s.opt_state, s.rng, s.epoch_sums)
  assert_trees_equal(fields(from_abstract), fields(restored))
  assert kinds(from_abstract) == kinds(fresh)


def test_a_checkpoint_written_before_epoch_sums_existed_restores(tmp_path):
  """The train state as checkpoints held it before `epoch_sums`: restored, with the
  epoch's sums starting at zero."""
  config = tiny_config('')
  state = _state(config)
  state = state.replace(step=state.step + 3,
                        epoch_sums=jax.tree.map(lambda x: x + 5, state.epoch_sums))
  old = {field: getattr(state, field) for field in
         ('step', 'params', 'opt_state', 'batch_stats', 'rng', 'nonfinite_step', 'ema')}
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  manager.save(3, args=checkpointing.ocp.args.StandardSave(old))
  manager.wait_until_finished()
  restored = checkpointing.restore_latest(manager, _state(tiny_config('', seed=1)))
  assert int(restored.step) == 3
  assert_trees_equal((restored.params, restored.opt_state), (state.params, state.opt_state))
  assert [int(x) for x in jax.tree.leaves(restored.epoch_sums)] == [0, 0, 0, 0]


def test_a_run_computes_a_fresh_state_only_where_no_checkpoint_holds_it(tmp_path):
  """RunCheckpoints.restore, as a run calls it (an abstract template, a fresh state on
  demand): a new run's state is the fresh one; a resumed run's is the checkpoint's,
  without a fresh one; a checkpoint from before `epoch_sums` takes those from a fresh
  one."""
  config = tiny_config('')
  model = model_factory.make_model(config)
  template = train_state.abstract_train_state(config, model, sharding.make_mesh())
  made = []
  def fresh():
    made.append(_state(config, model))
    return made[-1]
  run = lambda: checkpointing.RunCheckpoints(str(tmp_path), 3, False, [])
  assert run().restore(lambda: template, fresh) is made[0]

  state = made[0].replace(step=made[0].step + 2,
                          epoch_sums=jax.tree.map(lambda x: x + 5, made[0].epoch_sums))
  checkpoints = run()
  checkpoints.save(state, 2)
  checkpoints.latest.wait_until_finished()
  resumed = run().restore(lambda: template, fresh)
  assert len(made) == 1 and int(resumed.step) == 2
  assert [int(x) for x in jax.tree.leaves(resumed.epoch_sums)] == [5, 5, 5, 5]
  assert_trees_equal(resumed.params, state.params)

  state = state.replace(step=state.step + 1)
  old = {field: getattr(state, field) for field in
         ('step', 'params', 'opt_state', 'batch_stats', 'rng', 'nonfinite_step', 'ema')}
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=3)
  manager.save(3, args=checkpointing.ocp.args.StandardSave(old))
  manager.wait_until_finished()
  resumed = run().restore(lambda: template, fresh)
  assert len(made) == 2 and int(resumed.step) == 3
  assert [int(x) for x in jax.tree.leaves(resumed.epoch_sums)] == [0, 0, 0, 0]
  assert_trees_equal(resumed.opt_state, state.opt_state)


def test_no_checkpoint_restores_nothing(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  assert checkpointing.restore_latest(manager, _state(tiny_config(''))) is None


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  config = tiny_config('')
  manager = checkpointing.make_manager(str(tmp_path), max_to_keep=2)
  checkpointing.save(manager, _state(config, DeepDigitsCNN(num_classes=5)))
  manager.wait_until_finished()
  with pytest.raises(CheckpointError) as info:
    checkpointing.restore_latest(manager, _state(config))
  assert 'does not fit this run' in str(info.value)
  assert 'params/logits/kernel has shape (256, 5), this run needs (256, 10)' in str(info.value)
  assert (tmp_path / 'checkpoints' / '0').is_dir()  # nothing deleted


def test_interrupted_run_resumes_to_the_same_result(tiny_mnist_dir, tmp_path):
  """Also the rotation: a checkpoint every 4 steps (8 per epoch), the newest 2 kept."""
  config = lambda epochs: tiny_config(tiny_mnist_dir, num_epochs=epochs,
                                      bn_recalibration_batches=2, checkpoint_every_steps=4,
                                      max_to_keep=2)
  straight = train.train_and_evaluate(config(2), str(tmp_path / 'straight'))
  train.train_and_evaluate(config(1), str(tmp_path / 'resumed'))  # "killed" after epoch 1
  assert sorted(int(p.name) for p in (tmp_path / 'resumed' / 'checkpoints').iterdir()) == [
      4, 8]
  resumed = train.train_and_evaluate(config(2), str(tmp_path / 'resumed'))
  for key in ('step', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'test_accuracy_recalibrated'):
    assert straight[key] == resumed[key], key
  assert straight['step'] == 2 * 8

  final = {}
  for name in ('straight', 'resumed'):
    manager = checkpointing.make_manager(str(tmp_path / name), max_to_keep=3)
    final[name] = checkpointing.restore_latest(manager, _state(config(2)))
    assert manager.all_steps() == [12, 16]
  assert_trees_equal(final['straight'].params, final['resumed'].params)
  assert_trees_equal(final['straight'].opt_state, final['resumed'].opt_state)
  assert_trees_equal(final['straight'].batch_stats, final['resumed'].batch_stats)

  # Two runs of one config and seed give the same numbers, epoch by epoch: the first
  # epoch of each was trained from scratch, the second one resumed in one of them.
  timings = {'epoch_seconds', 'train_seconds', 'train_images_per_second', 'host_memory_mib'}
  records = {name: [{k: v for k, v in json.loads(line).items() if k not in timings}
                    for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]
             for name in ('straight', 'resumed')}
  assert [r['epoch'] for r in records['resumed']] == [1, 2]
  assert records['resumed'] == records['straight']


def _mark_best(workdir, state, records, previous_records=()):
  """Which of `records` (one per epoch) RunCheckpoints marks as the new best, and the
  step the best checkpoint then holds."""
  checkpoints = checkpointing.RunCheckpoints(str(workdir), 3, keep_best=True,
                                             previous_records=list(previous_records))
  for epoch, record in enumerate(records, 1):
    checkpoints.keep_if_best(state.replace(step=jax.numpy.asarray(epoch)), record)
  checkpoints.close()
  kept = [int(p.name) for p in (workdir / checkpointing.BEST).iterdir()]
  return [epoch for epoch, r in enumerate(records, 1) if r.get('best_checkpoint')], kept


def test_the_best_checkpoint_follows_validation_never_test_and_recalibrated_first(tmp_path):
  """On records whose three orderings disagree: with recalibrated statistics the choice
  is by their validation accuracy, else by the running statistics' one; the test
  accuracy never counts, and a tie keeps the earlier epoch."""
  state = _state(tiny_config(''))
  recalibrated = [
      {'validation_accuracy': 0.90, 'validation_accuracy_recalibrated': 0.95,
       'test_accuracy': 0.99},
      {'validation_accuracy': 0.97, 'validation_accuracy_recalibrated': 0.93,
       'test_accuracy': 0.995},
      {'validation_accuracy': 0.91, 'validation_accuracy_recalibrated': 0.96,
       'test_accuracy': 0.90},
      {'validation_accuracy': 0.99, 'validation_accuracy_recalibrated': 0.96,
       'test_accuracy': 0.999},
  ]
  assert _mark_best(tmp_path / 'recalibrated', state, recalibrated) == ([1, 3], [3])
  running = [{'validation_accuracy': 0.90, 'test_accuracy': 0.99},
             {'validation_accuracy': 0.95, 'test_accuracy': 0.90},
             {'validation_accuracy': 0.93, 'test_accuracy': 0.999}]
  assert _mark_best(tmp_path / 'running', state, running) == ([1, 2], [2])
  # A resumed run measures new epochs against the best of the records it resumes.
  later = [{'validation_accuracy': 0.99, 'validation_accuracy_recalibrated': 0.955},
           {'validation_accuracy': 0.80, 'validation_accuracy_recalibrated': 0.97}]
  assert _mark_best(tmp_path / 'resumed', state, later, previous_records=recalibrated) == (
      [2], [2])


def test_a_mismatch_names_three_differences_and_counts_the_rest():
  wanted = {f'w{i}': np.zeros((i + 1,)) for i in range(5)}
  saved = {**{f'w{i}': np.zeros((i + 2,)) for i in range(4)}, 'w4': np.zeros((5,)),
           'extra': np.zeros(())}
  assert checkpointing.describe_mismatch(saved, wanted) == (
      'extra is not in this model; w0 has shape (2,), this run needs (1,); w1 has shape '
      '(3,), this run needs (2,) (and 2 more)')
  assert checkpointing.describe_mismatch({'w0': np.zeros(1), 'w1': np.zeros(3)},
                                         {'w0': np.zeros(1), 'w1': np.zeros(2),
                                          'w2': np.zeros(1)}) == (
      'w2 is missing; w1 has shape (3,), this run needs (2,)')
  assert checkpointing.describe_mismatch(wanted, wanted) is None
