"""The run's working directory: created and checked before any work, and locked so that
two runs never write the same checkpoints at once.

A workdir is a local folder or an object-store prefix (`gs://BUCKET/PATH`, through
`deepdigits.storage`). The lock is an flock, so it holds on local disks only; on an
object store nothing stops a second run from writing the same workdir.
"""

import contextlib
import fcntl
import json
import os

import jax
import ml_collections

from deepdigits import mnist_download, storage
from deepdigits.errors import ConfigError

LOCK_NAME = 'run.lock'
CONFIG_NAME = 'config.json'


def prepare(workdir: str) -> None:
  """Creates workdir if needed; a clear error if it cannot be created or written."""
  if problem := storage.backend_problem(workdir):
    raise ConfigError(f'--workdir {problem}.')
  if storage.is_remote(workdir):
    if problem := storage.bucket_problem(workdir):
      raise ConfigError(f'--workdir: {problem}.')
    return
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
  if jax.process_index() != 0 or storage.is_remote(workdir):
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


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the run's config as workdir/config.json (process 0), so that commands on a
  finished workdir (evaluate, predict, plots) rebuild the same model without flags;
  data folders are made absolute so those commands work from any folder."""
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, CONFIG_NAME),
                       json.dumps(recorded_config(config), indent=2, sort_keys=True) + '\n')


def recorded_config(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json records it: JSON values, with the data folders made
  absolute so that later commands work from any folder."""
  recorded = json.loads(config.to_json_best_effort())
  for field in ('data_dir', 'tfds_data_dir'):
    if recorded.get(field):
      recorded[field] = storage.absolute(recorded[field])
  return recorded


# Config fields added after runs were first recorded, each with the value that reproduces
# a run recorded without it, so that commands on older workdirs keep working.
LATER_FIELDS = {'width_normalization': 0, 'bn_group_size': 0, 'download': True,
                'data_mirrors': mnist_download.DEFAULT_MIRRORS}


# Config fields renamed since runs were first recorded: the old name to the new one.
RENAMED_FIELDS = {'input_pipeline': 'feed'}


def later_fields(recorded: dict) -> dict:
  """LATER_FIELDS, plus the data source of a run recorded before `data_source` existed:
  an empty data_dir then meant tensorflow-datasets."""
  return {**LATER_FIELDS, 'data_source': 'idx' if recorded.get('data_dir') else 'tfds'}


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in workdir recorded (with LATER_FIELDS where it has none)."""
  if problem := storage.backend_problem(workdir):
    raise ConfigError(f'{problem}.')
  path = storage.join(workdir, CONFIG_NAME)
  if not storage.is_file(path):
    raise ConfigError(f'{path} not found: {workdir!r} is not the workdir of a training '
                      'run.')
  recorded = json.loads(storage.read_text(path))
  for old, new in RENAMED_FIELDS.items():
    if old in recorded and new not in recorded:
      recorded[new] = recorded.pop(old)
  return ml_collections.ConfigDict({**later_fields(recorded), **recorded})
