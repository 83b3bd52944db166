"""MNIST as uint8 arrays: from the original IDX files (a folder of the user's, or the
download cache that `mnist_download` fills) or from tensorflow-datasets.

Every split is held in host memory as images uint8 [N, 28, 28, 1] and labels int32 [N]
(MNIST is 55 MB); scaling to [0, 1] happens on the device inside the jitted step
(`scale_images`), so only bytes cross to the accelerator.
"""

import dataclasses
import gzip
import importlib.util
import os
import tempfile
from typing import Optional

import jax.numpy as jnp
import numpy as np
from absl import logging

from deepdigits import mnist_download, preprocess
from deepdigits.errors import DataError

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_STEMS = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
DATA_SOURCES = ('idx', 'tfds')
IDX_HINT = ('Point --config.data_dir at a folder with the four MNIST IDX files '
            '(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, '
            't10k-labels-idx1-ubyte, each raw or .gz), or leave it empty to download '
            'them.')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in host memory."""
  images: np.ndarray  # uint8 [N, 28, 28, 1]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return len(self.labels)


def scale_images(images: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  """uint8 pixels 0..255 to [0, 1]; the step the original recipe forgot."""
  return images.astype(dtype) / 255


# ---------------------------------------------------------------- IDX files


def check_data_dir(data_dir: str) -> None:
  """A DataError if `data_dir` is not a folder: checked before a run creates its
  workdir, so that a mistyped path leaves nothing behind."""
  if not os.path.isdir(data_dir):
    raise DataError(f'data_dir {data_dir!r} is not a directory. {IDX_HINT}')


def find_idx_file(data_dir: str, stem: str) -> str:
  """The path of `stem` or `stem.gz` in data_dir, or a DataError naming what is missing
  or wrong (not a file, a broken link, both forms with different contents)."""
  check_data_dir(data_dir)
  found = []
  for name in (stem + '.gz', stem):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      found.append(path)
    elif os.path.lexists(path):
      what = ('a broken link or a link loop' if not os.path.exists(path) else
              'a folder' if os.path.isdir(path) else 'not a regular file')
      raise DataError(f'{path} is {what}, not an IDX file; replace it with the file.')
  if not found:
    raise DataError(f'{stem}[.gz] not found in {data_dir!r}. {IDX_HINT}')
  if len(found) == 2 and _file_bytes(found[0]) != _file_bytes(found[1]):
    raise DataError(f'{data_dir!r} holds both {stem}.gz and {stem}, with different '
                    'contents; remove the wrong one.')
  return found[0]


def _file_bytes(path: str) -> bytes:
  """A file's contents, gunzipped if it is gzip (a damaged one: its raw bytes)."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return gzip.decompress(raw) if raw[:2] == b'\x1f\x8b' else raw
  except (OSError, EOFError):
    return raw


def read_idx(path: str, magic: int, item_shape: tuple[int, ...] = ()) -> np.ndarray:
  """Reads one IDX file of unsigned bytes, checking magic, dimensions and length."""
  try:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # BadGzipFile is an OSError
    raise DataError(f'{path}: cannot read ({e}); the file is damaged or truncated, '
                    'download it again.') from None
  ndim = 1 + len(item_shape)
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise DataError(f'{path}: {len(raw)} bytes, shorter than the {header_size}-byte IDX '
                    'header; the file is truncated.')
  found_magic = int.from_bytes(raw[:4], 'big')
  if raw[:2] == b'\x1f\x8b':
    raise DataError(f'{path} is gzip-compressed but not named .gz; rename it to '
                    f'{os.path.basename(path)}.gz.')
  if found_magic != magic:
    raise DataError(f'{path}: IDX magic number 0x{found_magic:08x}, expected '
                    f'0x{magic:08x}; this is not the right MNIST file.')
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if dims[1:] != item_shape:
    raise DataError(f'{path}: items of shape {dims[1:]}, expected {item_shape}.')
  expected = header_size + int(np.prod(dims))
  if len(raw) != expected:
    what = 'truncated' if len(raw) < expected else 'longer than its header says'
    raise DataError(f'{path}: {len(raw)} bytes but the header ({dims[0]} items) needs '
                    f'{expected}; the file is {what}.')
  return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def read_idx_split(data_dir: str, split: str) -> Split:
  """The 'train' or 'test' split from the IDX files in data_dir."""
  images_stem, labels_stem = IDX_STEMS[split]
  images_path = find_idx_file(data_dir, images_stem)
  labels_path = find_idx_file(data_dir, labels_stem)
  images = read_idx(images_path, IDX_IMAGES_MAGIC, IMAGE_SHAPE[:2])
  labels = read_idx(labels_path, IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise DataError(f'{images_path} holds {len(images)} images but {labels_path} holds '
                    f'{len(labels)} labels; the files do not belong together.')
  return checked_split(images[..., None], labels, source=labels_path)


def checked_split(images: np.ndarray, labels: np.ndarray, source: str) -> Split:
  """A Split, after checking shapes and the label range."""
  if images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
    raise DataError(f'{source}: images of shape {images.shape[1:]} {images.dtype}, '
                    f'expected {IMAGE_SHAPE} uint8.')
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    bad = int(np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))[0])
    raise DataError(f'{source}: label {int(labels[bad])} at index {bad} is outside '
                    f'0..{NUM_CLASSES - 1}.')
  return Split(np.ascontiguousarray(images), labels.astype(np.int32))


# ---------------------------------------------------------------- tensorflow-datasets


def read_tfds_split(split: str, tfds_data_dir: Optional[str]) -> Split:
  """A split of TFDS `mnist`, read with `tfds.data_source` (no TensorFlow needed).

  The dataset must be prepared once; tensorflow-datasets prepares MNIST only with
  TensorFlow installed (`pip install -e '.[tfds]'`) and network access.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  quiet = logging.get_verbosity() == logging.WARNING  # the commands' default
  if quiet:  # its warnings about an unprepared folder precede our own line
    logging.set_verbosity(logging.ERROR)
  # tensorflow-datasets fetches the dataset's description into a `mkdtemp` folder that
  # it never removes (one per call, empty without network): it goes with this one.
  previous_tempdir = tempfile.tempdir
  scratch = tempfile.TemporaryDirectory(prefix='deepdigits-tfds-')
  tempfile.tempdir = scratch.name
  try:
    source = tfds.data_source('mnist', split=split, data_dir=tfds_data_dir or None)
  except Exception as e:  # not prepared, no TensorFlow, no network: all end here
    if importlib.util.find_spec('tensorflow') is None:
      reason = ('it is not prepared in the TFDS data folder, and preparing it needs '
                'TensorFlow, which is not installed')
    else:
      lines = str(e).strip().splitlines() or [type(e).__name__]
      reason = f'{type(e).__name__}: {lines[0][:200]}'
    raise DataError(
        f'tensorflow-datasets could not load mnist ({reason}). Use '
        "--config.data_source=idx (the default: the IDX files, downloaded if needed), or "
        'on a machine with network `pip install -e ".[tfds]"` lets tensorflow-datasets '
        'download and prepare it once.') from None
  finally:
    tempfile.tempdir = previous_tempdir
    scratch.cleanup()
    if quiet:
      logging.set_verbosity(logging.WARNING)
  records = [source[i] for i in range(len(source))]
  images = np.stack([r['image'] for r in records]) if records else np.zeros(
      (0,) + IMAGE_SHAPE, np.uint8)
  labels = np.array([r['label'] for r in records], dtype=np.int64)
  return checked_split(images, labels, source=f'tfds mnist[{split}]')


# ---------------------------------------------------------------- splits for a run


def load_datasets(config, as_input: bool = True) -> dict[str, Split]:
  """The run's splits: 'train', 'test' and, if config.validation_size > 0, 'validation'.

  The validation slice is the last `validation_size` images of the official training
  set, never trained on; `train_subset` (> 0) then keeps the first N of the rest. With
  `width_normalization` every split's digits are rescaled to that width, unless
  `as_input=False` (the images as stored: to compare the splits of runs).
  """
  if config.get('data_source', 'idx') == 'tfds':
    read = lambda split: read_tfds_split(split, config.tfds_data_dir)
  else:
    idx_dir = idx_folder(config)
    read = lambda split: read_idx_split(idx_dir, split)
  full_train, test = read('train'), read('test')
  if not len(test):
    raise DataError('the test split holds no images; MNIST has 10,000: check the test '
                    'files (t10k-*) of the data folder.')
  if config.validation_size >= len(full_train):
    raise DataError(f'validation_size={config.validation_size} leaves no training '
                    f'images out of {len(full_train)}.')
  num_train = len(full_train) - config.validation_size
  splits = {'train': Split(full_train.images[:num_train], full_train.labels[:num_train]),
            'test': test}
  if config.validation_size:
    splits['validation'] = Split(full_train.images[num_train:],
                                 full_train.labels[num_train:])
  if config.train_subset:
    splits['train'] = Split(splits['train'].images[:config.train_subset],
                            splits['train'].labels[:config.train_subset])
  if not as_input:
    return splits
  return {name: Split(as_network_input(split.images, config), split.labels)
          for name, split in splits.items()}


def idx_folder(config) -> str:
  """The folder the run reads IDX files from: config.data_dir as given, else the
  download cache, with any missing or damaged file downloaded first (unless
  config.download is False)."""
  if config.data_dir:
    return config.data_dir
  directory = mnist_download.cache_dir()
  mnist_download.ensure_mnist(directory, mnist_download.parse_mirrors(
      config.get('data_mirrors', mnist_download.DEFAULT_MIRRORS)),
                              config.get('download', True))
  return directory


def as_network_input(images: np.ndarray, config) -> np.ndarray:
  """MNIST images as the run's network sees them: widths normalised if the config says
  so (`get`: configs recorded before the field existed have it off)."""
  width = config.get('width_normalization', 0)
  return preprocess.normalize_width(images, width) if width else images

