"""Orbax checkpoints of the whole train state, in `workdir/checkpoints/<step>`.

The state holds the step, params, BatchNorm statistics, optimizer state and the base
RNG; the data order is a function of (seed, epoch), so restoring the state restores
everything a run needs to go on as if it had never stopped.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from deepdigits.errors import CheckpointError


def make_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  """An asynchronous manager that keeps the newest `max_to_keep` checkpoints."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state: Any) -> None:
  """Starts writing `state` at its step; Orbax finishes in the background."""
  manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Optional[Any]:
  """The newest checkpoint restored with the shapes, dtypes and shardings of `target`,
  or None if there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(
        f'the checkpoint at {manager.directory}/{step} does not fit this run\'s model '
        f'or config ({type(e).__name__}: {first_line[:300]}). Use a new --workdir for a '
        'different model, or the config that wrote it.') from None
