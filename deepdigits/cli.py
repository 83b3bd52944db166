"""What every command-line entry shares: flag parsing and config loading that end in one
clear line, not a traceback."""

import sys
from typing import Any, Callable

from absl import app, flags, logging

from deepdigits import host_memory, storage


def parse_flags(argv):
  """absl's parsing (for `app.run(..., flags_parser=parse_flags)`), plus one clear line
  for an unknown config field or a config file that does not load."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull for help.')
  except OSError as e:  # config_flags: the config file failed to load
    sys.exit(f'deepdigits: error: --config: {" ".join(str(e).split())}')
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    field, _, hint = str(message).partition('\n')
    sys.exit(f'deepdigits: error: --config.{field.strip(chr(39))} is not a config field. '
             f'{hint}'.strip())


def loaded_config():
  """The --config flag's ConfigDict; exits with one line if the file failed to load."""
  try:
    config = flags.FLAGS.config
    config.get('seed')  # config_flags defers a failed load to the first access
  except OSError as e:
    sys.exit(f'deepdigits: error: --config: {" ".join(str(e).split())}')
  return config


def run_command(body: Callable[..., Any], takes_args: bool = False) -> None:
  """absl's app.run around a command's `body()` (or `body(args)` if it takes positional
  arguments), with what every command shares: other arguments refused, Orbax's
  per-file INFO logging and gcsfs' credential warnings quieted, freed host memory kept
  for the next step (`host_memory.keep_freed_memory`), and a DeepDigitsError or a
  preemption ending the process with one line (exit 1, or 128 + the signal)."""

  def main(argv):
    args = argv[1:]
    if args and not takes_args:
      raise app.UsageError(f'unexpected arguments: {" ".join(args)}')
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
      storage.quiet_cloud_logging()
    host_memory.keep_freed_memory()  # before JAX starts its threads
    # Imported here so that flag and config errors come before jax's start-up time.
    from deepdigits.errors import DeepDigitsError  # pylint: disable=g-import-not-at-top
    from deepdigits.preemption import Preempted  # pylint: disable=g-import-not-at-top
    try:
      status = body(args) if takes_args else body()
    except Preempted as e:
      print(f'deepdigits: {e}', file=sys.stderr)
      sys.exit(e.exit_code)
    except DeepDigitsError as e:
      sys.exit(f'deepdigits: error: {e}')
    if status:
      sys.exit(status)

  app.run(main, flags_parser=parse_flags)
