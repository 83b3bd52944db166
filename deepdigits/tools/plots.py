"""Figures of a finished run: `python -m deepdigits.tools.plots --workdir=DIR`.

Writes PNGs into workdir/plots/: `curves.png` (accuracy and loss per epoch, the
original project's figure), `confusion.png` (true against predicted digit, all test
images) and `gallery.png` (the first test digits, titled true/predicted, green when
right, red when wrong) or, with `--misclassified_only`, `misclassified.png`.
Predictions are those of the latest checkpoint (`inference.load_trained`, with BatchNorm
recalibrated if the run recalibrated). The figure functions take arrays and return a
matplotlib Figure; only `write_plots` reads and writes files.
"""

import io
import math
import sys
from typing import Sequence

import numpy as np
from absl import flags
from matplotlib.figure import Figure  # no pyplot: no global state; PNGs render with Agg

from deepdigits import storage
from deepdigits.cli import run_command
from deepdigits.data import NUM_CLASSES
from deepdigits.errors import ConfigError
from deepdigits.metrics_log import MetricsLog

FLAGS = flags.FLAGS

DPI = 100
PLOTS_DIR = 'plots'
GALLERY_COLUMNS = 10
GALLERY_CELL_INCHES = 1.2  # one digit and its title
RIGHT_COLOUR, WRONG_COLOUR = 'tab:green', 'tab:red'
# (metrics.jsonl key prefix, legend label, line style) of each curve, when present.
CURVES = (('train', 'train', '-'), ('validation', 'validation', '-'),
          ('test', 'test', '-'), ('test', 'test (BN recalibrated)', '--'))


def curves_figure(records: Sequence[dict]) -> Figure:
  """Two panels, accuracy and loss against epoch: training, validation (if held out),
  test, and test with recalibrated BatchNorm (if the run recalibrated)."""
  figure = Figure(figsize=(12, 4.5), dpi=DPI, layout='constrained')
  accuracy_axes, loss_axes = figure.subplots(1, 2)
  epochs = [r['epoch'] for r in records]
  for prefix, label, style in CURVES:
    suffix = '_recalibrated' if 'recalibrated' in label else ''
    for axes, metric in ((accuracy_axes, 'accuracy'), (loss_axes, 'loss')):
      key = f'{prefix}_{metric}{suffix}'
      if any(key in r for r in records):
        values = [r.get(key, np.nan) for r in records]
        axes.plot(epochs, values, style, marker='o', markersize=4, label=label)
  for axes, metric in ((accuracy_axes, 'accuracy'), (loss_axes, 'loss')):
    axes.set_title(f'model {metric}')
    axes.set_xlabel('epoch')
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend()
  if len(epochs) == 1:  # one point a curve: show the epoch, not a span around it
    for axes in (accuracy_axes, loss_axes):
      axes.set_xticks(epochs)
  return figure


def confusion_counts(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  """counts[true, predicted], int [10, 10]."""
  counts = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(counts, (labels, predictions), 1)
  return counts


def confusion_figure(counts: np.ndarray, title: str = '') -> Figure:
  """The confusion matrix with its counts written in the cells; the colour is on a log
  scale, so the few errors show beside the thousands of right answers."""
  figure = Figure(figsize=(7.5, 6.5), dpi=DPI, layout='constrained')
  axes = figure.subplots()
  image = axes.imshow(np.log1p(counts), cmap='Blues')
  darkest = np.log1p(counts.max())
  for (row, col), count in np.ndenumerate(counts):
    if count:
      axes.text(col, row, str(count), ha='center', va='center', fontsize=9,
                color='white' if np.log1p(count) > 0.6 * darkest else 'black')
  axes.set_xticks(range(NUM_CLASSES))
  axes.set_yticks(range(NUM_CLASSES))
  axes.set_xlabel('predicted digit')
  axes.set_ylabel('true digit')
  axes.set_title(title or 'confusion matrix')
  figure.colorbar(image, ax=axes, label='log(1 + count)')
  return figure


def gallery_indices(labels: np.ndarray, predictions: np.ndarray, num_images: int,
                    misclassified_only: bool = False) -> np.ndarray:
  """The first num_images test images, or the first num_images misclassified ones."""
  candidates = np.arange(len(labels))
  if misclassified_only:
    candidates = candidates[labels != predictions]
  return candidates[:num_images]


def gallery_figure(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                   title: str = '') -> Figure:
  """Digits titled 'true/predicted' in green (right) or red (wrong); 10 a row."""
  rows = max(1, math.ceil(len(images) / GALLERY_COLUMNS))
  figure = Figure(figsize=(GALLERY_COLUMNS * GALLERY_CELL_INCHES,
                           rows * GALLERY_CELL_INCHES + 0.5), dpi=DPI)
  figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01,
                         top=1 - 0.5 / (rows * GALLERY_CELL_INCHES + 0.5), hspace=0.35)
  figure.suptitle(title)
  axes_grid = figure.subplots(rows, GALLERY_COLUMNS, squeeze=False)
  for axes in axes_grid.flat:
    axes.axis('off')
  for axes, image, label, prediction in zip(axes_grid.flat, images, labels, predictions):
    axes.imshow(image.reshape(image.shape[:2]), cmap='gray', vmin=0, vmax=255)
    axes.set_title(f'{label}/{prediction}', fontsize=11,
                   color=RIGHT_COLOUR if label == prediction else WRONG_COLOUR)
  if not len(images):
    axes_grid.flat[0].text(0, 0.5, 'no digits to show', fontsize=12)
  return figure


def save_png(figure: Figure, path: str) -> str:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=DPI)
  storage.write_bytes(path, buffer.getvalue())
  return path


def write_plots(workdir: str, misclassified_only: bool = False, num_images: int = 50,
                trained=None) -> list[str]:
  """Writes the run's figures into workdir/plots/ and returns their paths.

  `trained` (an `inference.Trained`) saves loading the checkpoint again.
  """
  # Imported here: jax's start-up only when there is something to predict.
  from deepdigits import inference  # pylint: disable=g-import-not-at-top
  from deepdigits.data import load_datasets  # pylint: disable=g-import-not-at-top
  trained = trained or inference.load_trained(workdir)
  test = load_datasets(trained.config)['test']
  predictions = inference.predict_logits(trained, test.images).argmax(-1)
  out_dir = storage.join(workdir, PLOTS_DIR)
  try:
    storage.make_dirs(out_dir)
  except OSError as e:
    raise ConfigError(f'cannot create {out_dir!r}: {e.strerror}.') from None
  written = []

  records = MetricsLog(workdir).records()
  if records:
    written.append(save_png(curves_figure(records), storage.join(out_dir, 'curves.png')))
  else:
    print(f'deepdigits: no epoch has finished in {workdir}; curves.png not written.',
          file=sys.stderr)

  counts = confusion_counts(test.labels, predictions)
  accuracy = np.trace(counts) / counts.sum()
  recalibrated = ', BN recalibrated' if trained.config.bn_recalibration_batches else ''
  title = (f'step {trained.step}: {100 * accuracy:.2f}% of {counts.sum():,} test images '
           f'right{recalibrated}')
  written.append(save_png(confusion_figure(counts, title),
                          storage.join(out_dir, 'confusion.png')))

  chosen = gallery_indices(test.labels, predictions, num_images, misclassified_only)
  wrong = int(np.sum(test.labels != predictions))
  name = 'misclassified.png' if misclassified_only else 'gallery.png'
  title = (f'{len(chosen)} of the {wrong} misclassified test digits (true/predicted)'
           if misclassified_only else
           f'the first {len(chosen)} test digits (true/predicted)')
  written.append(save_png(gallery_figure(test.images[chosen], test.labels[chosen],
                                         predictions[chosen], title),
                          storage.join(out_dir, name)))
  return written


def main():
  for path in write_plots(FLAGS.workdir, FLAGS.misclassified_only, FLAGS.num_images):
    print(path)


def define_flags():
  """The command's flags; defined only when run as a command, so that importing this
  module next to other commands (tests do) defines no flag twice."""
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_bool('misclassified_only', False,
                    'Gallery of misclassified test digits only (misclassified.png).')
  flags.DEFINE_integer('num_images', 50, 'Digits in the gallery.', lower_bound=1)
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  define_flags()
  run_command(main)
