"""Orbax checkpoints of the whole train state, in `workdir/checkpoints/<step>`.

The state holds the step, params, BatchNorm statistics, optimizer state, the base RNG
and the non-finite marker; the data order is a function of (seed, epoch), so restoring
the state restores everything a run needs to go on as if it had never stopped.
Nothing is ever deleted here: an unreadable checkpoint is moved to
`workdir/corrupt_checkpoints/` and the previous one restored.
"""

import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from deepdigits.errors import CheckpointError


LATEST = 'checkpoints'  # the newest max_to_keep states, for resuming
BEST = 'best_checkpoint'  # the state with the best validation accuracy so far


def make_manager(workdir: str, max_to_keep: int, kind: str = LATEST) -> ocp.CheckpointManager:
  """An asynchronous manager of workdir/<kind> that keeps the newest `max_to_keep`
  checkpoints (kind LATEST or BEST)."""
  directory = os.path.join(os.path.abspath(workdir), kind)
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


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Optional[Any]:
  """The newest readable checkpoint, restored with the shapes, dtypes and shardings of
  `target`, or None if there is none.

  A checkpoint from another model or config raises CheckpointError naming the
  difference; an unreadable (corrupt or half-written) one is moved aside and the
  previous one tried.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  while (step := manager.latest_step()) is not None:
    error = None
    try:
      metadata = manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      metadata, error = None, e
    if metadata is not None:
      mismatch = describe_mismatch(metadata, target)
      if mismatch:
        raise CheckpointError(
            f'the checkpoint at {manager.directory}/{step} does not fit this run: '
            f'{mismatch}. Use a new --workdir for a different model, or the config '
            'that wrote it.')
      try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        error = e
    _set_aside(manager, step, error or ValueError('its metadata is unreadable'))
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Moves an unreadable checkpoint out of the manager's way, keeping its files."""
  source = os.path.join(str(manager.directory), str(step))
  corrupt_dir = os.path.join(os.path.dirname(str(manager.directory)), 'corrupt_checkpoints')
  destination = os.path.join(corrupt_dir, str(step))
  suffix = 1
  while os.path.exists(destination):
    destination = os.path.join(corrupt_dir, f'{step}.{suffix}')
    suffix += 1
  reason = ' '.join(str(error).split())[:200] or type(error).__name__
  if jax.process_index() == 0:
    os.makedirs(corrupt_dir, exist_ok=True)
    shutil.move(source, destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'deepdigits set aside checkpoint {step}')
  message = (f'checkpoint {source} is unreadable ({type(error).__name__}: {reason}); '
             f'moved to {destination}, trying the previous one.')
  logging.warning(message)
  print(f'deepdigits: warning: {message}', flush=True)
  manager.reload()
