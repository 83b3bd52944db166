"""Orbax checkpoints of the whole train state, in `workdir/checkpoints/<step>`, and the
best one by validation accuracy in `workdir/best_checkpoint/`.

The state (`train_state.TrainState`) holds the step, params, BatchNorm statistics,
optimizer state, the base RNG, the non-finite marker and the weights' moving average;
the data order is a function of (seed, epoch), so restoring the state restores
everything a run needs to go on as if it had never stopped.
Nothing is ever deleted here: an unreadable checkpoint is moved to
`workdir/corrupt_checkpoints/` and the previous one restored.
"""

import os
import shutil
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from deepdigits import storage
from deepdigits.errors import CheckpointError, NonFiniteError
from deepdigits.preemption import Preempted

LATEST = 'checkpoints'  # the newest max_to_keep states, for resuming
BEST = 'best_checkpoint'  # the state with the best validation accuracy so far
CORRUPT = 'corrupt_checkpoints'  # unreadable checkpoints, moved here, never deleted
# Train-state fields added after checkpoints were first written; an older checkpoint
# restores without them (a resumed epoch's sums then start at its resume).
LATER_STATE_FIELDS = ('epoch_sums',)


def make_manager(workdir: str, max_to_keep: int, kind: str = LATEST) -> ocp.CheckpointManager:
  """An asynchronous manager of workdir/<kind> that keeps the newest `max_to_keep`
  checkpoints (kind LATEST or BEST)."""
  directory = storage.join(storage.absolute(workdir), kind)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  # The handler named up front lets a fresh manager read a checkpoint's metadata.
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, state: Any) -> None:
  """Starts writing `state` at its step; Orbax finishes in the background."""
  manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state))


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(getattr(leaf, 'shape', ())) for path, leaf in leaves}


def describe_mismatch(saved_metadata, target) -> Optional[str]:
  """What differs between a checkpoint's arrays and the target's, or None."""
  saved = _shapes(getattr(saved_metadata, 'tree', saved_metadata))
  wanted = _shapes(target)
  problems = [f'{name} is missing' for name in wanted if name not in saved]
  problems += [f'{name} is not in this model' for name in saved if name not in wanted]
  problems += [f'{name} has shape {saved[name]}, this run needs {wanted[name]}'
               for name in wanted if name in saved and saved[name] != wanted[name]]
  if not problems:
    return None
  more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
  return '; '.join(problems[:3]) + more


def restore_latest(manager: ocp.CheckpointManager, target: Any, set_aside: bool = True,
                   fresh: Optional[Callable[[], Any]] = None) -> Optional[Any]:
  """The newest readable checkpoint, restored with the shapes, dtypes and shardings of
  `target`, or None if there is none.

  `target` may be abstract (`train_state.abstract_train_state`). The fields a checkpoint
  predates take their values from `fresh()` if it is given, else from `target` (abstract
  ones stay abstract: enough for commands that only read).

  A checkpoint from another model or config raises CheckpointError naming the
  difference; an unreadable (corrupt or half-written) one is moved aside (or, with
  `set_aside=False`, for commands that only read, left where it is) and the previous
  one tried.
  """
  skipped = set()
  while (step := max(set(manager.all_steps()) - skipped, default=None)) is not None:
    error = None
    try:
      metadata = manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      metadata, error = None, e
    if metadata is not None:
      saved_fields = set(getattr(getattr(metadata, 'tree', metadata), 'keys', list)())
      later = [f for f in LATER_STATE_FIELDS
               if saved_fields and f not in saved_fields and hasattr(target, f)]
      # A checkpoint written before a later field existed: its fields are restored into
      # the target, and the later ones keep the target's (fresh) values.
      wanted = ({f: getattr(target, f) for f in saved_fields} if later else target)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
      mismatch = describe_mismatch(metadata, wanted)
      if mismatch:
        raise CheckpointError(
            f'the checkpoint at {manager.directory}/{step} does not fit this run: '
            f'{mismatch}. Use a new --workdir for a different model, or the config '
            'that wrote it.')
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return (fresh() if fresh else target).replace(**restored) if later else restored
      except Exception as e:  # pylint: disable=broad-except
        error = e
    error = error or ValueError('its metadata is unreadable')
    if set_aside:
      _set_aside(manager, step, error)
    else:
      skipped.add(step)
      warn(f'checkpoint {storage.join(manager.directory, str(step))} is unreadable '
           f'({_reason(error)}); left as it is, trying the previous one.')
  return None


def _reason(error: Exception) -> str:
  reason = ' '.join(str(error).split())[:200] or type(error).__name__
  return f'{type(error).__name__}: {reason}'


def warn(message: str) -> None:
  logging.warning(message)
  print(f'deepdigits: warning: {message}', flush=True)


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Moves an unreadable checkpoint out of the manager's way, keeping its files."""
  source = storage.join(manager.directory, str(step))
  corrupt_dir = storage.join(storage.path(manager.directory).parent, CORRUPT)
  destination = storage.join(corrupt_dir, str(step))
  suffix = 1
  while storage.exists(destination):
    destination = storage.join(corrupt_dir, f'{step}.{suffix}')
    suffix += 1
  if jax.process_index() == 0:
    storage.make_dirs(corrupt_dir)
    storage.move(source, destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'deepdigits set aside checkpoint {step}')
  warn(f'checkpoint {source} is unreadable ({_reason(error)}); moved to {destination}, '
       'trying the previous one.')
  manager.reload()


def remove_partial_saves(directory: str) -> None:
  """Removes the `<step>.orbax-checkpoint-tmp` folders a stopped save left in a local
  checkpoint folder (process 0, under the workdir's lock): half-written, never trusted
  by Orbax, they only hold disk space. Finished checkpoints are never touched."""
  if jax.process_index() != 0 or storage.is_remote(directory) or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name.endswith('.orbax-checkpoint-tmp'):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def selection_metric(record: dict) -> float:
  """What model selection maximises: validation accuracy (with recalibrated BatchNorm
  statistics when the run re-estimates them); never test accuracy."""
  return record.get('validation_accuracy_recalibrated',
                    record.get('validation_accuracy', -1.0))


class RunCheckpoints:
  """A training run's checkpoints: the latest ones (to resume) and, when the run holds
  out a validation slice, the best one. It saves once per step, never a state that went
  non-finite, and waits for the background writes before the run ends."""

  def __init__(self, workdir: str, max_to_keep: int, keep_best: bool,
               previous_records: list[dict]):
    self.workdir = workdir
    remove_partial_saves(storage.join(storage.absolute(workdir), LATEST))
    remove_partial_saves(storage.join(storage.absolute(workdir), BEST))
    self.latest = make_manager(workdir, max_to_keep)
    self.best = make_manager(workdir, 1, BEST) if keep_best else None
    self.best_so_far = max((selection_metric(r) for r in previous_records), default=-1.0)

  def restore(self, template: Callable[[], Any], fresh: Callable[[], Any]) -> Any:
    """The latest readable checkpoint restored into the structure `template()` gives
    (abstract, or a state), or else `fresh()`. Each is made only where it is needed: the
    template where there are checkpoints, a fresh state for a new run or for the fields
    an older checkpoint predates."""
    restored = (restore_latest(self.latest, template(), fresh=fresh)
                if self.latest.all_steps() else None)
    return fresh() if restored is None else restored

  def check_finite(self, state: Any) -> None:
    """Stops the run if a step saw a NaN or Inf; the train step froze the state there."""
    bad_step = int(state.nonfinite_step)
    if bad_step >= 0:
      kept = self._last_checkpoint('the last good checkpoint, step {}, is kept')
      raise NonFiniteError(
          f'NaN or Inf in the update from step {bad_step} to {bad_step + 1} (in the loss, '
          f'its gradients or the updated state); training stopped there and {kept}. '
          'Lower --config.learning_rate or check the data.')

  def _last_checkpoint(self, phrase: str) -> str:
    """`phrase` with the newest finished checkpoint's step, for a stopping message."""
    self.latest.wait_until_finished()
    latest = self.latest.latest_step()
    return phrase.format(latest) if latest is not None else 'no checkpoint was written'

  def save(self, state: Any, step: int) -> None:
    """Saves the state at `step`, once, if it is finite (else stops the run) and the
    disk has room for it (else stops the run, the last checkpoint intact)."""
    self.check_finite(state)
    if self.latest.latest_step() != step:
      self.check_space(state, self.latest)
      save(self.latest, state)

  def check_space(self, state: Any, manager: ocp.CheckpointManager) -> None:
    """A CheckpointError before a save that a local disk has no room for (object stores
    are not checked): Orbax writes in background threads, and a full disk there would
    end the run in their tracebacks with a half-written folder."""
    if storage.is_remote(manager.directory):
      return
    need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, 'nbytes'))
    manager.wait_until_finished()  # a save in flight is still taking its space
    free = shutil.disk_usage(str(manager.directory)).free
    if free < 1.05 * need + (4 << 20):
      kept = self._last_checkpoint('the last checkpoint, step {}, is intact')
      raise CheckpointError(
          f'no room for a checkpoint in {manager.directory}: {free / 2**20:.0f} MiB free, '
          f'a checkpoint takes about {need / 2**20:.0f} MiB; {kept}. Free some space, '
          'then run the same command to resume.')

  def save_and_stop(self, state: Any, step: int, preemption) -> None:
    """On a preemption signal: saves, waits for the write, and raises Preempted."""
    self.save(state, step)
    self.latest.wait_until_finished()
    raise Preempted(f'stopped by {preemption.signal_name} at step {step}; the '
                    f'checkpoint is saved in {self.latest.directory}/{step}. Run the '
                    'same command to resume.', preemption.signum)

  def keep_if_best(self, state: Any, record: dict) -> None:
    """Replaces the best checkpoint if the epoch's `record` beats every earlier one on
    `selection_metric`, and marks the record so."""
    if self.best and selection_metric(record) > self.best_so_far:
      self.best_so_far = selection_metric(record)
      self.check_space(state, self.best)
      save(self.best, state)
      record['best_checkpoint'] = True

  def close(self) -> None:
    for manager in (self.latest, self.best):
      if manager:
        manager.wait_until_finished()
        manager.close()
