"""The commands the README and the docs show, read as a shell and absl would read them:
each line of a command continues where a shell continues it, each flag is one its
command defines, each `--config=FILE` exists and each `--config.field` is a field of it.
Reading only: nothing runs, so a renamed flag or field fails here at once."""

import importlib.util
import pathlib
import re
import shlex

import pytest

from conftest import REPO

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
# A command's first line in a code block (indented, or fenced), after any VAR=value.
COMMAND_START = re.compile(
    r'^\s+(?:\w+=\S+\s+)*python (?:main\.py|-m deepdigits\.tools\.\w+)\b')
INLINE_COMMAND = re.compile(
    r'`((?:\w+=\S+\s+)*python (?:main\.py|-m deepdigits\.tools\.\w+)\b[^`]*)`')
FLAG_DEFINITION = re.compile(r"DEFINE_\w+\(\s*'(\w+)'")
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'helpxml', 'flagfile'}
CONFIG_FIELD = re.compile(r'--config\.(\w+(?:\.\w+)*)')


def doc_commands() -> list[tuple[str, list[str]]]:
  """(where, physical lines) of each command in the docs: in code blocks, and inline."""
  commands = []
  for path in DOCS:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
      if COMMAND_START.match(lines[i]):
        start, physical = i, [lines[i]]
        while physical[-1].rstrip().endswith('\\') and i + 1 < len(lines):
          i += 1
          physical.append(lines[i])
        commands.append((f'{path.relative_to(REPO)}:{start + 1}', physical))
      i += 1
    text = path.read_text()
    for inline in INLINE_COMMAND.finditer(text):  # in prose, `python ...`, maybe wrapped
      line = text.count('\n', 0, inline.start()) + 1
      commands.append((f'{path.relative_to(REPO)}:{line}', [' '.join(inline[1].split())]))
  return commands


COMMANDS = doc_commands()


def defined_flags(entry_point: pathlib.Path) -> set[str]:
  return set(FLAG_DEFINITION.findall(entry_point.read_text())) | ABSL_FLAGS


def load_config(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'doc_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def has_field(config, dotted: str) -> bool:
  for name in dotted.split('.'):
    if not hasattr(config, 'keys') or name not in config.keys():
      return False
    config = config[name]
  return True


def test_the_docs_show_the_commands_of_every_entry_point():
  """The commands are found, so that the test below checks something."""
  shown = {re.search(r'python (main\.py|-m deepdigits\.tools\.\w+)', lines[0]).group(1)
           for _, lines in COMMANDS}
  assert len(COMMANDS) >= 30, len(COMMANDS)
  assert {'main.py', '-m deepdigits.tools.seeds', '-m deepdigits.tools.sweep',
          '-m deepdigits.tools.ensemble', '-m deepdigits.tools.benchmark'} <= shown, shown


@pytest.mark.parametrize('where,lines', COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses_as_shown(where, lines):
  # A backslash inside a line escapes the space after it: the next flag would reach the
  # command with a leading space, as a positional argument.
  for line in lines:
    assert not re.search(r'\\\s+\S', line), f'{where}: a backslash inside a line: {line}'
  argv = shlex.split(' '.join(line.rstrip().removesuffix('\\') for line in lines))
  assert argv.count('python') == 1, f'{where}: the next command continues this one'
  argv = argv[argv.index('python') + 1:]
  if argv[0] == '-m':
    entry_point = REPO / (argv[1].replace('.', '/') + '.py')
    argv = argv[2:]
  else:
    entry_point = REPO / argv[0]
    argv = argv[1:]
  assert entry_point.is_file(), f'{where}: no {entry_point.relative_to(REPO)}'
  flags = defined_flags(entry_point)
  options = [a for a in argv if a.startswith('--') and a != '--']
  config_file = next((a.split('=', 1)[1] for a in options if a.startswith('--config=')),
                     None)
  config = None
  if config_file is not None:
    assert (REPO / config_file).is_file(), f'{where}: no config file {config_file}'
    config = load_config(REPO / config_file)
  for option in options:
    name = option[2:].split('=', 1)[0]
    if name.startswith('config.'):
      assert config is not None, f'{where}: {option} without --config=FILE'
      assert has_field(config, name.removeprefix('config.')), (
          f'{where}: {config_file} has no field {name.removeprefix("config.")}')
    else:
      assert name in flags or (name.startswith('no') and name[2:] in flags), (
          f'{where}: {entry_point.relative_to(REPO)} defines no --{name}')


def test_every_config_field_the_docs_name_exists():
  """`--config.field` in prose too (`field` itself is the placeholder): every config
  derives from configs/default.py, which holds every field."""
  default = load_config(REPO / 'configs' / 'default.py')
  missing = sorted({f'{path.relative_to(REPO)}: --config.{field}'
                    for path in DOCS
                    for field in CONFIG_FIELD.findall(path.read_text())
                    if field != 'field' and not has_field(default, field)})
  assert not missing, missing
