"""What every command-line entry shares: flag parsing and config loading that end in one
clear line, not a traceback."""

import sys

from absl import flags


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
