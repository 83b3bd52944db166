"""The figures of a run: valid PNGs of the planned size, counts that add up, and a
gallery that shows what it says."""

import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from deepdigits import inference
from deepdigits.data import read_idx_split
from deepdigits.tools import plots

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def png_size(path) -> tuple[int, int]:
  """(width, height) from the IHDR chunk, after checking the file is a PNG Pillow reads."""
  head = pathlib.Path(path).read_bytes()[:24]
  assert head[:8] == PNG_SIGNATURE and head[12:16] == b'IHDR', path
  with Image.open(path) as image:
    image.verify()
  return struct.unpack('>II', head[16:24])


def gallery_height(num_images: int) -> int:
  rows = -(-num_images // plots.GALLERY_COLUMNS)
  return round((rows * plots.GALLERY_CELL_INCHES + 0.5) * plots.DPI)


@pytest.fixture(scope='module')
def trained(tiny_trained_workdir):
  return inference.load_trained(tiny_trained_workdir)


@pytest.fixture(scope='module')
def predictions(trained, tiny_mnist_dir):
  test = read_idx_split(tiny_mnist_dir, 'test')
  return test.labels, inference.predict_logits(trained, test.images).argmax(-1)


def test_write_plots_renders_each_figure_as_a_png(tiny_trained_workdir, trained):
  written = plots.write_plots(tiny_trained_workdir, num_images=23, trained=trained)
  out = os.path.join(tiny_trained_workdir, 'plots')
  assert written == [os.path.join(out, name)
                     for name in ('curves.png', 'confusion.png', 'gallery.png')]
  assert png_size(written[0]) == (1200, 450)
  assert png_size(written[1]) == (750, 650)
  assert png_size(written[2]) == (1200, gallery_height(23))  # 3 rows of 10

  written = plots.write_plots(tiny_trained_workdir, misclassified_only=True, num_images=7,
                              trained=trained)
  assert os.path.basename(written[2]) == 'misclassified.png'
  assert png_size(written[2]) == (1200, gallery_height(7))


def test_confusion_counts_add_up_to_the_runs_test_accuracy(predictions,
                                                           tiny_trained_workdir):
  labels, predicted = predictions
  counts = plots.confusion_counts(labels, predicted)
  assert counts.shape == (10, 10) and counts.sum() == len(labels) == 300
  np.testing.assert_array_equal(counts.sum(1), np.bincount(labels, minlength=10))
  np.testing.assert_array_equal(counts.sum(0), np.bincount(predicted, minlength=10))
  record = json.loads(pathlib.Path(tiny_trained_workdir, 'metrics.jsonl').read_text()
                      .splitlines()[-1])
  np.testing.assert_allclose(np.trace(counts) / 300, record['test_accuracy_recalibrated'],
                             atol=1e-6)


def test_gallery_picks_the_first_digits_or_only_the_misclassified():
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
  predicted = np.array([0, 7, 2, 3, 1, 5, 6, 7, 3, 9])
  np.testing.assert_array_equal(plots.gallery_indices(labels, predicted, 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(
      plots.gallery_indices(labels, predicted, 2, misclassified_only=True), [1, 4])
  np.testing.assert_array_equal(
      plots.gallery_indices(labels, predicted, 50, misclassified_only=True), [1, 4, 8])
  assert not len(plots.gallery_indices(labels, labels, 5, misclassified_only=True))


def test_gallery_titles_are_green_when_right_and_red_when_wrong(mnist):
  images = mnist['test'].images[:3]
  figure = plots.gallery_figure(images, np.array([7, 2, 1]), np.array([7, 3, 1]))
  titles = [a.title for a in figure.axes if a.get_title()]
  assert [t.get_text() for t in titles] == ['7/7', '2/3', '1/1']
  assert [t.get_color() for t in titles] == [plots.RIGHT_COLOUR, plots.WRONG_COLOUR,
                                             plots.RIGHT_COLOUR]
  plots.gallery_figure(images[:0], np.array([]), np.array([]))  # none: still a figure


def test_curves_show_validation_and_recalibrated_test_when_recorded():
  records = [{'epoch': e, 'train_loss': 1 / e, 'train_accuracy': 1 - 0.1 / e,
              'test_loss': 1.1 / e, 'test_accuracy': 1 - 0.2 / e,
              'validation_loss': 1.2 / e, 'validation_accuracy': 1 - 0.15 / e,
              'test_loss_recalibrated': 0.9 / e, 'test_accuracy_recalibrated': 1 - 0.05 / e}
             for e in (1, 2, 3)]
  accuracy_axes, loss_axes = plots.curves_figure(records).axes
  lines = {line.get_label(): line for line in accuracy_axes.get_lines()}
  assert list(lines) == ['train', 'validation', 'test', 'test (BN recalibrated)']
  np.testing.assert_allclose(lines['test (BN recalibrated)'].get_ydata(),
                             [r['test_accuracy_recalibrated'] for r in records])
  np.testing.assert_allclose(lines['validation'].get_xdata(), [1, 2, 3])
  losses = {line.get_label(): line.get_ydata() for line in loss_axes.get_lines()}
  np.testing.assert_allclose(losses['train'], [r['train_loss'] for r in records])

  plain = [{k: v for k, v in r.items() if 'validation' not in k and 'recal' not in k}
           for r in records]
  accuracy_axes, _ = plots.curves_figure(plain).axes
  assert [line.get_label() for line in accuracy_axes.get_lines()] == ['train', 'test']


def run_plots(*args):
  return subprocess.run([sys.executable, '-m', 'deepdigits.tools.plots', *args], cwd=REPO,
                        env=dict(os.environ), capture_output=True, text=True, timeout=600)


def test_the_command_writes_the_misclassified_gallery(tiny_trained_workdir):
  result = run_plots(f'--workdir={tiny_trained_workdir}', '--misclassified_only',
                     '--num_images=5')
  assert result.returncode == 0, result.stderr[-2000:]
  path = os.path.join(tiny_trained_workdir, 'plots', 'misclassified.png')
  assert result.stdout.splitlines()[-1] == path
  assert png_size(path) == (1200, gallery_height(5))


def test_the_command_on_a_folder_that_is_not_a_run_is_one_clear_line(tmp_path):
  result = run_plots(f'--workdir={tmp_path}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'deepdigits: error: {tmp_path}/config.json not found: {str(tmp_path)!r} is not the '
      'workdir of a training run.']
