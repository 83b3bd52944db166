"""The run's working directory: created and checked before any work, and locked so that
two runs never write the same checkpoints at once."""

import contextlib
import fcntl
import os

import jax

from deepdigits.errors import ConfigError

LOCK_NAME = 'run.lock'


def prepare(workdir: str) -> None:
  """Creates workdir if needed; a clear error if it cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'cannot create workdir {workdir!r}: {e.strerror}; pick another '
                      '--workdir.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f'workdir {workdir!r} is not writable; pick another --workdir.')


@contextlib.contextmanager
def locked(workdir: str):
  """Holds an exclusive lock on workdir/run.lock (process 0 only) for the run's duration.

  The lock is an flock, so the kernel releases it when the process dies: a killed run
  never leaves a stale lock behind.
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      owner = f.read().strip() or 'unknown'
      raise ConfigError(f'another run (pid {owner}) is using workdir {workdir!r}; wait '
                        'for it to finish or pick another --workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
