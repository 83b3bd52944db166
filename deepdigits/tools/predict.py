"""Predicts the digit in image files:
`python -m deepdigits.tools.predict --workdir=DIR a.png b.jpg`.

Each file is read as grey levels and made into an MNIST image (`deepdigits.preprocess`):
a 28x28 image is taken as already in MNIST format (only inverted if its background is
light; `--preprocess_28x28` crops and centres it too), any other size is cropped,
scaled to fit 20x20 and centred by centre of mass. One line per file on stdout: the
predicted digit and the three most probable digits. A file that is missing, not an
image or blank gets one line on stderr, the others are still predicted, and the exit
code is 1.
"""

import sys
from typing import Sequence

import numpy as np
from absl import app, flags
from PIL import Image, ImageOps, UnidentifiedImageError

from deepdigits import preprocess
from deepdigits.cli import run_command
from deepdigits.errors import ImageError

FLAGS = flags.FLAGS

TOP_K = 3


# Pillow's modes of more than 8 bits per grey level: 16-bit PNG and TIFF open as these.
WIDE_GREY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def read_gray(path: str) -> np.ndarray:
  """The image file (its first frame) as grey levels float32 [H, W] in 0..255, from any
  mode Pillow opens: grey, palette, RGB(A), CMYK, 1-bit, 16-bit (scaled down, not
  clipped) and float; transparency is composed onto white (a drawing on a transparent
  canvas reads as ink on paper)."""
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)  # phone photos: the orientation as shown
      if image.mode in WIDE_GREY_MODES:
        values = np.asarray(image, np.float64)
        peak = values.max(initial=0)
        top = (65535.0 if image.mode != 'I' or 255 < peak <= 65535 else
               255.0 if peak <= 255 else peak)  # 32-bit 'I': its range as found
        return (values * (255.0 / top)).astype(np.float32)
      if image.mode == 'F':
        values = np.asarray(image, np.float32)
        return np.clip(values * 255 if values.max(initial=0) <= 1 else values, 0, 255)
      if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
        image = image.convert('RGBA')
        white = Image.new('RGBA', image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
      return np.asarray(image.convert('L'), np.float32)
  except FileNotFoundError:
    raise ImageError('no such file.') from None
  except IsADirectoryError:
    raise ImageError('is a directory, not an image file.') from None
  except UnidentifiedImageError:
    raise ImageError('not an image file (or a format Pillow cannot read).') from None
  except Image.DecompressionBombError as e:
    raise ImageError(f'too large to read safely ({e})') from None
  except (OSError, ValueError, SyntaxError) as e:  # truncated or damaged image data
    raise ImageError(f'unreadable image: {e}') from None


def mnist_image(gray: np.ndarray, preprocess_28x28: bool = False) -> np.ndarray:
  """The grey image as the network's input, uint8 [28, 28, 1]."""
  if gray.shape == (preprocess.MNIST_SIZE,) * 2 and not preprocess_28x28:
    image = preprocess.as_given(gray)
  else:
    image = preprocess.to_mnist(gray)
  return image[..., None]


def load_image(path: str, preprocess_28x28: bool = False) -> np.ndarray:
  """mnist_image of a file; an ImageError names the file."""
  try:
    return mnist_image(read_gray(path), preprocess_28x28)
  except ImageError as e:
    raise ImageError(f'{path}: {e}') from None


def softmax(logits: np.ndarray) -> np.ndarray:
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def _probability(p: float) -> str:
  return f'{p:.4f}' if p >= 1e-4 else f'{p:.1e}'


def format_prediction(path: str, probabilities: np.ndarray) -> str:
  """'path: 7  (7 p=0.9981, 2 p=0.0012, 3 p=3.1e-05)': the digit, then the top three."""
  top = np.argsort(-probabilities, kind='stable')[:TOP_K]
  ranked = ', '.join(f'{d} p={_probability(probabilities[d])}' for d in top)
  return f'{path}: {top[0]}  ({ranked})'


def predict_files(workdir: str, paths: Sequence[str],
                  preprocess_28x28: bool = False) -> int:
  """Prints one line per file (predictions on stdout, errors on stderr); returns the
  number of files that failed. The model is loaded only if some file is readable."""
  images, good_paths, failed = [], [], 0
  for path in paths:
    try:
      images.append(load_image(path, preprocess_28x28))
      good_paths.append(path)
    except ImageError as e:
      print(f'deepdigits: error: {e}', file=sys.stderr)
      failed += 1
  if images:
    from deepdigits import inference  # pylint: disable=g-import-not-at-top
    from deepdigits.data import as_network_input  # pylint: disable=g-import-not-at-top
    trained = inference.load_trained(workdir)
    logits = inference.predict_logits(trained, as_network_input(np.stack(images),
                                                                trained.config),
                                      batch_size=min(len(images),
                                                     trained.config.eval_batch_size))
    for path, probabilities in zip(good_paths, softmax(logits.astype(np.float64))):
      print(format_prediction(path, probabilities))
  return failed


def main(paths):
  if not paths:
    raise app.UsageError('give one or more image files after the flags.')
  return 1 if predict_files(FLAGS.workdir, paths, FLAGS.preprocess_28x28) else 0


def define_flags():
  """The command's flags; defined only when run as a command, so that importing this
  module next to other commands (tests do) defines no flag twice."""
  flags.DEFINE_string('workdir', None, 'Workdir of a training run (its latest checkpoint).')
  flags.DEFINE_bool('preprocess_28x28', False,
                    'Crop, scale and centre 28x28 images as well (by default they are '
                    'taken as already in MNIST format).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  define_flags()
  run_command(main, takes_args=True)
