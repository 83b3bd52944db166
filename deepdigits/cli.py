"""What every command-line entry shares: flag parsing and config loading that end in one
clear line, not a traceback."""

import importlib.util
import os
import sys
from typing import Any, Callable, Optional

import ml_collections
from absl import app, flags, logging

from deepdigits import host_memory, storage


def config_argument(argv) -> Optional[str]:
  """The file of the last --config=FILE[:ARG] (or --config FILE) argument, the one absl
  keeps, or None."""
  found = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      found = arg.split('=', 1)[1].split(':', 1)[0]
    elif arg == '--config' and i + 1 < len(argv):
      found = argv[i + 1].split(':', 1)[0]
  return found


def config_file_problem(path: str) -> Optional[str]:
  """Why a config file cannot give a config, or None: it does not import (a syntax
  error, an exception), has no get_config(), which raises or returns no ConfigDict.

  The file's folder's parent goes on sys.path first, so that `from configs import
  default` works from any folder, as it does for main.py in the repository.
  """
  if not os.path.exists(path):
    return 'no such file'
  if not os.path.isfile(path):
    return 'not a file'
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.append(root)
  spec = importlib.util.spec_from_file_location('deepdigits_config_check', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    return f'line {e.lineno}: {e.msg} (a syntax error)'
  except Exception as e:  # pylint: disable=broad-except (whatever the file raises)
    return f'it does not import: {type(e).__name__}: {e}'
  if not callable(getattr(module, 'get_config', None)):
    return 'it defines no get_config() function'
  try:
    config = module.get_config()
  except TypeError:
    return None  # get_config(arg): config_flags calls it with the :ARG part
  except Exception as e:  # pylint: disable=broad-except
    return f'get_config() raised {type(e).__name__}: {e}'
  if not isinstance(config, ml_collections.ConfigDict):
    return (f'get_config() returned {config!r:.40} ({type(config).__name__}), not an '
            'ml_collections.ConfigDict')
  return None


def parse_flags(argv):
  """absl's parsing (for `app.run(..., flags_parser=parse_flags)`), plus one clear line
  for an unknown config field or a config file that does not load."""
  path = config_argument(argv)
  if path and (problem := config_file_problem(path)):
    sys.exit(f'deepdigits: error: --config={path}: {problem}.')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # e.g. a value of the wrong type; absl's words, on one line
    sys.exit(f'deepdigits: error: {" ".join(str(e).split())} (--helpfull lists the flags).')
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


def exit_interrupted() -> None:
  """Ctrl-C outside the training loop (e.g. while compiling): nothing to save; leave at
  once, before the interpreter's teardown races XLA's threads."""
  print('deepdigits: interrupted.', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(130)


def exit_on_swallowed_interrupt(previous_hook):
  """A sys.unraisablehook. Python raises a Ctrl-C's KeyboardInterrupt in whatever runs
  next; if that is a finaliser or a gc callback (JAX has one), the exception is only
  printed and the run would go on as if no key had been pressed. This hook exits as the
  caught KeyboardInterrupt does."""

  def hook(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
      exit_interrupted()
    previous_hook(unraisable)

  return hook


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
    sys.unraisablehook = exit_on_swallowed_interrupt(sys.unraisablehook)
    # Imported here so that flag and config errors come before jax's start-up time.
    from deepdigits.errors import DeepDigitsError  # pylint: disable=g-import-not-at-top
    from deepdigits.preemption import Preempted  # pylint: disable=g-import-not-at-top
    try:
      status = body(args) if takes_args else body()
    except KeyboardInterrupt:
      exit_interrupted()
    except Preempted as e:
      print(f'deepdigits: {e}', file=sys.stderr)
      sys.exit(e.exit_code)
    except DeepDigitsError as e:
      sys.exit(f'deepdigits: error: {e}')
    if status:
      sys.exit(status)

  app.run(main, flags_parser=parse_flags)
