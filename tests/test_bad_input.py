"""One clear line, and nothing lost, for each bad input a user can give: config files that
do not load, damaged run files, odd data folders, images of every kind, a Ctrl-C while
compiling."""

import gzip
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_config, write_mnist_idx, xla_flags
from deepdigits import data, rundir
from deepdigits.errors import ConfigError, DataError, DeepDigitsError, ImageError
from deepdigits.metrics_log import MetricsLog
from deepdigits.tools import predict

CONFIG_FILES = {
    'syntax.py': ('def get_config(:\n', 'line 1: invalid syntax (a syntax error).'),
    'raises.py': ('def get_config():\n  raise ValueError("no such recipe")\n',
                  'get_config() raised ValueError: no such recipe.'),
    'nothing.py': ('x = 1\n', 'it defines no get_config() function.'),
    'number.py': ('def get_config():\n  return 5\n',
                  'get_config() returned 5 (int), not an ml_collections.ConfigDict.'),
    'imports.py': ('import no_such_module\n', "it does not import: ModuleNotFoundError: "
                   "No module named 'no_such_module'."),
}


@pytest.mark.parametrize('name', sorted(CONFIG_FILES))
def test_a_config_file_that_gives_no_config_is_one_line(name, tmp_path):
  text, problem = CONFIG_FILES[name]
  (tmp_path / name).write_text(text)
  result = subprocess.run(
      [sys.executable, str(REPO / 'main.py'), f'--config={tmp_path / name}',
       f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == f'deepdigits: error: --config={tmp_path / name}: {problem}'
  assert not (tmp_path / 'run').exists()


def test_sweep_takes_an_absolute_config_path_from_another_folder(tmp_path):
  """The config's own `from configs import default` resolves from any folder."""
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.sweep',
       f'--config={REPO / "configs" / "cpu_quick.py"}', f'--workdir={tmp_path / "sweep"}',
       '--grid=seed=0,1', '--config.num_epochs=0'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'deepdigits: error: point seed=0: --config.num_epochs=0 must be > 0.')


@pytest.mark.parametrize('content,message', [
    ('{"seed": 0,', 'is not valid JSON'),
    ('[1, 2]', 'holds no config (a JSON list, not an object)'),
    ('{"seed": 0}', 'is not a complete, well-typed config'),
])
def test_a_damaged_config_json_is_one_line(content, message, tmp_path):
  (tmp_path / rundir.CONFIG_NAME).write_text(content)
  with pytest.raises(ConfigError, match=re.escape(message)):
    rundir.read_config(str(tmp_path))


def test_a_config_json_with_a_wrong_value_names_it(tmp_path):
  recorded = rundir.recorded_config(tiny_config(''))
  recorded['batch_size'] = -4
  (tmp_path / rundir.CONFIG_NAME).write_text(json.dumps(recorded))
  with pytest.raises(ConfigError) as error:
    rundir.read_config(str(tmp_path))
  assert str(error.value) == f'{tmp_path / rundir.CONFIG_NAME}: batch_size=-4 must be > 0.'


def test_evaluate_on_a_damaged_config_json_exits_with_one_line(tmp_path):
  (tmp_path / rundir.CONFIG_NAME).write_text('{"seed": 0,')
  result = subprocess.run([sys.executable, str(REPO / 'main.py'), f'--workdir={tmp_path}',
                           '--mode=evaluate'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'deepdigits: error: {tmp_path / rundir.CONFIG_NAME} is not valid JSON')
  assert 'Traceback' not in result.stderr


def test_a_metrics_line_cut_off_by_a_kill_is_dropped_and_repaired(tmp_path, capsys):
  good = [{'epoch': 1, 'step': 8}, {'epoch': 2, 'step': 16}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in good) + '{"epoch": 3, "ste')
  log = MetricsLog(str(tmp_path), tensorboard=False)
  assert log.records() == good and log.cut_off  # plots and evaluate read the rest
  log.keep_until(16)  # what a resumed run does first
  assert 'the last line of' in capsys.readouterr().out
  assert (tmp_path / 'metrics.jsonl').read_text() == ''.join(json.dumps(r) + '\n'
                                                            for r in good)
  (tmp_path / 'metrics.jsonl').write_text('{"epoch": 1\n' + json.dumps(good[1]) + '\n')
  with pytest.raises(DeepDigitsError, match='line 1 is not a JSON record'):
    log.records()


def test_a_test_split_of_no_images_is_refused_with_the_data(tmp_path, mnist):
  empty = data.Split(mnist['test'].images[:0], mnist['test'].labels[:0])
  write_mnist_idx(tmp_path, data.Split(mnist['train'].images[:64],
                                       mnist['train'].labels[:64]), empty)
  with pytest.raises(DataError, match='the test split holds no images'):
    data.load_datasets(tiny_config(str(tmp_path)))


def test_odd_files_in_a_data_folder_are_named(tmp_path, mnist_dir):
  stem = 't10k-labels-idx1-ubyte'
  raw = gzip.decompress((pathlib.Path(mnist_dir) / f'{stem}.gz').read_bytes())
  # gzip bytes under the raw name
  (tmp_path / stem).write_bytes(gzip.compress(raw))
  with pytest.raises(DataError, match=f'{stem} is gzip-compressed but not named .gz; '
                                      f'rename it to {stem}.gz'):
    data.read_idx(data.find_idx_file(str(tmp_path), stem), data.IDX_LABELS_MAGIC)
  # both forms, different contents; then the same contents
  (tmp_path / f'{stem}.gz').write_bytes(gzip.compress(raw))
  for other_label in ((raw[-1] + 1) % 10, (raw[-1] + 9) % 10):  # either way
    (tmp_path / stem).write_bytes(raw[:-1] + bytes([other_label]))
    with pytest.raises(DataError, match=f'holds both {stem}.gz and {stem}, with different'):
      data.find_idx_file(str(tmp_path), stem)
  (tmp_path / stem).write_bytes(raw)
  assert data.find_idx_file(str(tmp_path), stem) == str(tmp_path / f'{stem}.gz')
  # a folder, and a link loop, where a file should be
  os.remove(tmp_path / f'{stem}.gz')
  os.remove(tmp_path / stem)
  (tmp_path / stem).mkdir()
  with pytest.raises(DataError, match=f'{stem} is a folder, not an IDX file'):
    data.find_idx_file(str(tmp_path), stem)
  shutil.rmtree(tmp_path / stem)
  os.symlink(tmp_path / f'{stem}.gz', tmp_path / f'{stem}.gz')
  with pytest.raises(DataError, match='is a broken link or a link loop, not an IDX file'):
    data.find_idx_file(str(tmp_path), stem)


def digit_image() -> np.ndarray:
  """An 8-bit grey digit with every level from 0 to 255."""
  image = np.zeros((40, 30), np.uint8)
  image[5:35, 10:20] = np.linspace(0, 255, 300).reshape(30, 10).astype(np.uint8)
  return image


@pytest.mark.parametrize('mode', ['L', 'P', 'RGB', 'RGBA', 'CMYK', 'LA', 'I;16', 'I', 'F',
                                  'gif-animation'])
def test_every_image_mode_reads_as_the_same_grey_levels(mode, tmp_path):
  grey = digit_image()
  base = Image.fromarray(grey)
  path = tmp_path / 'digit.png'
  if mode == 'I;16':
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 16-bit PNG
    assert Image.open(path).mode == 'I;16'
  elif mode == 'I':
    path = tmp_path / 'digit.tif'
    Image.fromarray(grey.astype(np.int32) * 257, mode='I').save(path)
  elif mode == 'F':
    path = tmp_path / 'digit.tif'
    Image.fromarray(grey.astype(np.float32) / 255, mode='F').save(path)
  elif mode == 'gif-animation':
    path = tmp_path / 'digit.gif'
    other = Image.fromarray(255 - grey)
    base.save(path, save_all=True, append_images=[other], duration=100)
  elif mode == 'CMYK':
    path = tmp_path / 'digit.jpg'
    base.convert('CMYK').save(path, quality=100)
  else:
    base.convert(mode).save(path)
  read = predict.read_gray(str(path))
  assert read.shape == grey.shape and read.dtype == np.float32
  tolerance = 3 if mode == 'CMYK' else 1  # JPEG's rounding
  assert np.abs(read - grey).max() <= tolerance, (mode, np.abs(read - grey).max())


def test_an_image_over_the_decompression_bomb_limit_is_one_error(tmp_path, monkeypatch):
  Image.fromarray(digit_image()).save(tmp_path / 'big.png')
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 1,200 pixels: twice over
  with pytest.raises(ImageError, match='too large to read safely'):
    predict.read_gray(str(tmp_path / 'big.png'))


SWALLOWED_CTRL_C = """
from deepdigits import cli

class Finaliser:
  def __del__(self):
    raise KeyboardInterrupt  # as a Ctrl-C landing in a finaliser or gc callback does

def body():
  Finaliser()  # collected at once: Python only reports its exception
  print('went on')

cli.run_command(body)
"""


def test_a_ctrl_c_that_lands_in_a_finaliser_still_exits_130():
  """Python raises a Ctrl-C's KeyboardInterrupt in whatever runs next; when that is a
  finaliser (JAX's gc callback, while compiling), the exception is not propagated, and
  the run must still stop."""
  result = subprocess.run([sys.executable, '-c', SWALLOWED_CTRL_C], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 130, result.stderr[-2000:]
  assert 'went on' not in result.stdout
  assert result.stderr.strip().splitlines() == ['deepdigits: interrupted.']


def test_ctrl_c_while_compiling_exits_130_with_one_line(tiny_mnist_dir, tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_ENABLE_COMPILATION_CACHE='false',
             XLA_FLAGS=xla_flags(1))
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # a cached step would compile at once
  process = subprocess.Popen(
      [sys.executable, str(REPO / 'main.py'), '--config=configs/default.py',
       f'--workdir={tmp_path}', f'--config.data_dir={tiny_mnist_dir}',
       '--config.batch_size=64', '--config.num_epochs=1', '--config.model_summary=False',
       '--config.progress=False'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      # pytest-xdist's workers ignore SIGINT, and a child would inherit that
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  for line in process.stdout:
    if 'steps of 64 images' in line:  # printed just before the train step compiles
      process.send_signal(signal.SIGINT)
      break
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 130, stderr[-2000:]
  assert stderr.strip().splitlines()[-1] == 'deepdigits: interrupted.'
  assert 'Traceback' not in stderr
