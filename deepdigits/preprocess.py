"""A photo or drawing of one digit turned into an MNIST image, the way MNIST was made;
and MNIST images with their digits' widths normalised, as Ciresan et al. (2012) did.

LeCun's recipe: the digit is size-normalised to fit a 20x20 box keeping its aspect
ratio (anti-aliased, hence the grey levels), then placed in a 28x28 field so that its
centre of mass lands at the centre (pixel (14, 14), where MNIST's own digits have it).
Before that, a real image needs what MNIST's scans never did: grey levels, a light
background inverted to MNIST's black, and the background level subtracted so that paper
grey becomes 0. Pure functions of arrays; reading files is `deepdigits.tools.predict`'s job.

Width normalisation (`normalize_width`) gives networks of a committee different views of
the same digits: each network sees every digit, in training and at test time, stretched
or squeezed horizontally to one width, so their errors differ more than seeds' do.
"""

import numpy as np
from PIL import Image

from deepdigits.errors import ImageError

MNIST_SIZE = 28
BOX_SIZE = 20  # the digit's longer side after size normalisation
CENTRE = 14  # row and column where MNIST digits have their centre of mass
# A pixel belongs to the digit's bounding box if it is above this fraction of the
# range from background to the brightest ink: faint noise and JPEG halos stay out.
INK_THRESHOLD = 0.25
# Less contrast than this (in 0..255 levels) between background and ink: a blank image.
MIN_CONTRAST = 32


def border_median(gray: np.ndarray) -> float:
  """The background level: the median of the outermost rows and columns."""
  border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
  return float(np.median(border))


def light_on_dark(gray: np.ndarray) -> np.ndarray:
  """gray as white ink on black, as MNIST is: inverted if the background is light."""
  gray = np.asarray(gray, np.float32)
  return 255 - gray if border_median(gray) > 127.5 else gray


def ink(gray: np.ndarray) -> np.ndarray:
  """Light-on-dark grey levels with the background at 0 and the brightest ink at 255;
  an ImageError if there is no digit (a blank or nearly uniform image)."""
  gray = light_on_dark(gray)
  background, brightest = border_median(gray), float(gray.max())
  if brightest - background < MIN_CONTRAST:
    raise ImageError('blank image: no digit stands out from the background.')
  return np.clip((gray - background) / (brightest - background), 0, 1) * 255


def bounding_box(ink_levels: np.ndarray) -> tuple[slice, slice]:
  """Rows and columns of the pixels above INK_THRESHOLD."""
  rows, cols = np.nonzero(ink_levels > INK_THRESHOLD * 255)
  return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def fit_box(digit: np.ndarray, size: int = BOX_SIZE) -> np.ndarray:
  """digit scaled (anti-aliased) so that its longer side is `size`, aspect ratio kept."""
  height, width = digit.shape
  scale = size / max(height, width)
  new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  scaled = Image.fromarray(digit.astype(np.float32)).resize(  # mode 'F': no rounding
      new_size, Image.Resampling.LANCZOS)
  return np.clip(np.asarray(scaled), 0, 255)  # Lanczos rings a little past the range


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
  total = image.sum()
  return (float((image.sum(1) * np.arange(image.shape[0])).sum() / total),
          float((image.sum(0) * np.arange(image.shape[1])).sum() / total))


def paste_centred(digit: np.ndarray, size: int = MNIST_SIZE) -> np.ndarray:
  """digit in a size x size field, shifted by whole pixels so that its centre of mass
  lands on (CENTRE, CENTRE); the shift is clamped so that no ink leaves the field."""
  height, width = digit.shape
  row, col = centre_of_mass(digit)
  top = int(np.clip(round(CENTRE - row), 0, size - height))
  left = int(np.clip(round(CENTRE - col), 0, size - width))
  field = np.zeros((size, size), np.float32)
  field[top:top + height, left:left + width] = digit
  return field


def to_mnist(gray: np.ndarray) -> np.ndarray:
  """Any grey-level image [H, W] (0..255) of one digit as an MNIST image uint8 [28, 28]:
  white on black, cropped, scaled to fit 20x20, centred by centre of mass."""
  levels = ink(gray)
  digit = levels[bounding_box(levels)]
  return np.round(paste_centred(fit_box(digit))).astype(np.uint8)


def as_given(gray: np.ndarray) -> np.ndarray:
  """A 28x28 image taken as already in MNIST format: only inverted if its background
  is light, so an MNIST digit passes through unchanged."""
  if gray.shape != (MNIST_SIZE, MNIST_SIZE):
    raise ValueError(f'as_given needs a 28x28 image, not {gray.shape}')
  ink(gray)  # a blank image is an error here too
  return np.round(light_on_dark(gray)).astype(np.uint8)


def normalize_width(images: np.ndarray, width: int) -> np.ndarray:
  """uint8 images [N, H, W, 1] with each digit rescaled horizontally (height kept) so
  that its ink's bounding box is `width` pixels wide, about its centre of mass's column,
  which so stays where it was; bilinear, black outside. Blank images pass unchanged."""
  if not 1 <= width <= images.shape[2]:
    raise ValueError(f'width={width} must be in 1..{images.shape[2]}')
  gray = images[..., 0].astype(np.float32)  # [N, H, W]
  columns = np.arange(gray.shape[2], dtype=np.float32)
  has_ink = gray.max(1) > INK_THRESHOLD * 255  # [N, W]: columns of the bounding box
  blank = ~has_ink.any(1)
  first = np.argmax(has_ink, 1)
  last = gray.shape[2] - 1 - np.argmax(has_ink[:, ::-1], 1)
  scale = np.where(blank, 1.0, width / (last - first + 1))  # output per input pixel
  profile = gray.sum(1)  # [N, W]
  mass = np.maximum(profile.sum(1), 1e-6)
  centre = (profile * columns).sum(1) / mass  # [N]
  source = centre[:, None] + (columns[None] - centre[:, None]) / scale[:, None]  # [N, W]
  left = np.floor(source).astype(np.int64)
  frac = (source - left)[:, None, :]  # [N, 1, W]

  def column(index):  # gray[n, :, index[n, x]], black outside the image
    inside = ((index >= 0) & (index < gray.shape[2]))[:, None, :]
    clipped = np.clip(index, 0, gray.shape[2] - 1)[:, None, :]
    return np.where(inside, np.take_along_axis(gray, clipped, 2), 0.0)

  stretched = column(left) * (1 - frac) + column(left + 1) * frac  # blank: scale 1, as is
  return np.clip(np.round(stretched), 0, 255).astype(np.uint8)[..., None]
