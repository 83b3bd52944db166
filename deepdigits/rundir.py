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
from typing import Optional

import jax
import ml_collections

from deepdigits import mnist_download, storage
from deepdigits.errors import ConfigError, WorkdirBusy

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
      raise WorkdirBusy(f'another run (pid {owner}) is using workdir {workdir!r}; wait '
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
  for field in FOLDER_FIELDS:
    if recorded.get(field):
      recorded[field] = storage.absolute(recorded[field])
  return recorded


# Config fields added after runs were first recorded, each with the value that reproduces
# a run recorded without it, so that commands on older workdirs keep working.
LATER_FIELDS = {'width_normalization': 0, 'bn_group_size': 0, 'download': True,
                'data_mirrors': mnist_download.DEFAULT_MIRRORS, 'profile_steps': 0,
                'steps_per_dispatch': 1, 'augment_elastic_probability': 1.0,
                'augment_clean_epochs': 0}


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
  try:
    recorded = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); the run\'s config is damaged: '
                      'restore it, or give the run\'s config with --config.') from None
  if not isinstance(recorded, dict):
    raise ConfigError(f'{path} holds no config (a JSON {type(recorded).__name__}, not an '
                      'object); restore it, or give the run\'s config with --config.')
  for old, new in RENAMED_FIELDS.items():
    if old in recorded and new not in recorded:
      recorded[new] = recorded.pop(old)
  config = ml_collections.ConfigDict({**later_fields(recorded), **recorded})
  from deepdigits import config_checks  # pylint: disable=g-import-not-at-top
  try:
    config_checks.check_values(config)
  except ConfigError as e:
    raise ConfigError(f'{path}: {str(e).removeprefix("--config.")}') from None
  except (AttributeError, KeyError, TypeError) as e:  # a field missing or mistyped
    reason = ' '.join(str(e).split())[:160]
    raise ConfigError(f'{path} is not a complete, well-typed config ({type(e).__name__}: '
                      f'{reason}); restore it, or give the run\'s config with '
                      '--config.') from None
  return config


# ---------------------------------------------------------------- resuming

# Fields that change how a run is watched, saved, fed or computed on this machine, never
# what it computes: a resumed run may change them. (`num_epochs` has its own rules.)
RESUMABLE_FIELDS = ('progress', 'tensorboard', 'model_summary', 'profile_steps',
                    'steps_per_dispatch',
                    'checkpoint_every_epochs', 'checkpoint_every_steps', 'max_to_keep',
                    'eval_batch_size', 'download', 'data_mirrors', 'feed', 'conv_impl',
                    'pool_impl')


# Fields that name a folder: two spellings of one folder are the same value.
FOLDER_FIELDS = ('data_dir', 'tfds_data_dir')


def config_differences(recorded: dict, wanted: dict) -> list[str]:
  """The fields that change what a run computes (all but RESUMABLE_FIELDS and
  num_epochs) whose values differ, as phrases: "seed=0 there, 1 now"."""
  show = lambda d, k: repr(d[k]) if k in d else 'unset'
  same = lambda k: (show(recorded, k) == show(wanted, k) or (
      k in FOLDER_FIELDS and recorded.get(k) and wanted.get(k) and
      storage.resolved(recorded[k]) == storage.resolved(wanted[k])))
  return [f'{k}={show(recorded, k)} there, {show(wanted, k)} now'
          for k in sorted(set(recorded) | set(wanted))
          if k not in RESUMABLE_FIELDS + ('num_epochs',) and not same(k)]


def trained_epochs(workdir: str) -> int:
  """The last epoch workdir's metrics.jsonl records (0 if none)."""
  from deepdigits.metrics_log import MetricsLog  # pylint: disable=g-import-not-at-top
  return max((r['epoch'] for r in MetricsLog(workdir).records()), default=0)


def has_trained(workdir: str) -> bool:
  """Whether workdir holds any checkpoint or epoch record of a run."""
  checkpoints = storage.join(workdir, 'checkpoints')
  return trained_epochs(workdir) > 0 or any(
      name.isdigit() for name in storage.list_names(checkpoints))


def num_epochs_problem(workdir: str, recorded: dict, config) -> Optional[str]:
  """Why `config.num_epochs` cannot continue the run recorded in workdir, or None: fewer
  epochs than it has trained, or another length of a cosine schedule (whose curve
  num_epochs sets) or of a run whose last epochs are unaugmented. More epochs of a
  constant learning rate extend the run."""
  done, was, now = trained_epochs(workdir), recorded.get('num_epochs'), config.num_epochs
  if now < done:
    return (f'{workdir} has already trained {done} epochs, more than '
            f'--config.num_epochs={now}: give at least {done}, score it with '
            '--mode=evaluate, or use a new --workdir')
  if now != was and config.lr_schedule == 'cosine':
    return (f'--config.num_epochs={now} would change the length of the cosine '
            f'learning-rate schedule that {workdir} was trained on ({was} epochs), so the '
            'run could not go on along the same curve: keep num_epochs, or use a new '
            '--workdir')
  if now != was and config.augment_clean_epochs:
    return (f'--config.num_epochs={now} would move the last {config.augment_clean_epochs} '
            f'unaugmented epochs (augment_clean_epochs) of the run in {workdir} ({was} '
            'epochs): keep num_epochs, or use a new --workdir')
  return None


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to go on with a run in workdir under a config that would compute something
  else than the one it was trained with, before any work (see config_differences and
  num_epochs_problem). A workdir with a config.json but nothing trained yet is free."""
  if not storage.is_file(storage.join(workdir, CONFIG_NAME)) or not has_trained(workdir):
    return
  recorded = read_config(workdir).to_dict()
  differences = config_differences(recorded, recorded_config(config))
  if differences:
    more = f' and {len(differences) - 3} more' if len(differences) > 3 else ''
    raise ConfigError(
        f'{workdir} holds a run of another config ({"; ".join(differences[:3])}{more}): '
        'resume it with the config it was trained with (its config.json), or use a new '
        '--workdir.')
  if problem := num_epochs_problem(workdir, recorded, config):
    raise ConfigError(f'{problem}.')
