"""Reading MNIST: the real IDX files, malformed ones, TFDS, and the run's splits."""

import dataclasses
import gzip
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import tiny_config, write_idx
from deepdigits import data, preprocess
from deepdigits.errors import DataError


def test_real_idx_files(mnist):
  train, test = mnist['train'], mnist['test']
  assert train.images.shape == (60_000, 28, 28, 1) and train.images.dtype == np.uint8
  assert test.images.shape == (10_000, 28, 28, 1) and test.labels.dtype == np.int32
  assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958,
                                               1028, 974, 1009]
  assert train.images.max() == 255 and train.images.min() == 0


def test_raw_and_gzip_files_read_the_same(tmp_path, mnist_dir):
  raw = tmp_path / 't10k-labels-idx1-ubyte'
  with gzip.open(pathlib.Path(mnist_dir) / 't10k-labels-idx1-ubyte.gz') as f:
    raw.write_bytes(f.read())
  np.testing.assert_array_equal(
      data.read_idx(str(raw), data.IDX_LABELS_MAGIC),
      data.read_idx(str(pathlib.Path(mnist_dir) / 't10k-labels-idx1-ubyte.gz'),
                    data.IDX_LABELS_MAGIC))


def test_scale_images_maps_bytes_to_unit_interval():
  scaled = np.asarray(data.scale_images(np.array([0, 51, 255], np.uint8)))
  np.testing.assert_allclose(scaled, [0.0, 0.2, 1.0])


@pytest.fixture
def good_dir(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 20).astype(np.uint8)
  for split in ('train', 'test'):
    images_stem, labels_stem = data.IDX_STEMS[split]
    write_idx(tmp_path / images_stem, images, data.IDX_IMAGES_MAGIC)
    write_idx(tmp_path / labels_stem, labels, data.IDX_LABELS_MAGIC)
  return tmp_path


def test_good_synthetic_files_read_back_exactly(good_dir):
  split = data.read_idx_split(str(good_dir), 'train')
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(split.images[..., 0],
                                rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
  np.testing.assert_array_equal(split.labels, rng.integers(0, 10, 20))


def _expect_error(directory, split, *fragments):
  with pytest.raises(DataError) as info:
    data.read_idx_split(str(directory), split)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  assert '\n' not in message


def test_missing_directory(tmp_path):
  _expect_error(tmp_path / 'nowhere', 'train', 'is not a directory', '--config.data_dir')


def test_missing_file(good_dir):
  (good_dir / 'train-labels-idx1-ubyte').unlink()
  _expect_error(good_dir, 'train', 'train-labels-idx1-ubyte[.gz] not found')
  _ = data.read_idx_split(str(good_dir), 'test')  # the other split is unaffected


def test_truncated_file(good_dir):
  path = good_dir / 'train-images-idx3-ubyte'
  path.write_bytes(path.read_bytes()[:-100])
  _expect_error(good_dir, 'train', 'train-images-idx3-ubyte: 15596 bytes but the header '
                '(20 items) needs 15696; the file is truncated.')


def test_truncated_header(good_dir):
  path = good_dir / 'train-labels-idx1-ubyte'
  path.write_bytes(path.read_bytes()[:5])
  _expect_error(good_dir, 'train', 'shorter than the 8-byte IDX header')


def test_truncated_gzip(good_dir, tmp_path):
  path = good_dir / 'train-images-idx3-ubyte'
  compressed = gzip.compress(path.read_bytes())
  path.unlink()
  (good_dir / 'train-images-idx3-ubyte.gz').write_bytes(compressed[:len(compressed) // 2])
  _expect_error(good_dir, 'train', 'damaged or truncated')


def test_wrong_magic(good_dir):
  # A labels file where the images file should be.
  shutil.copy(good_dir / 'train-labels-idx1-ubyte', good_dir / 'train-images-idx3-ubyte')
  _expect_error(good_dir, 'train', 'magic number 0x00000801, expected 0x00000803')
  # And the other way round: an images file where the labels file should be.
  shutil.copy(good_dir / 't10k-images-idx3-ubyte', good_dir / 't10k-labels-idx1-ubyte')
  _expect_error(good_dir, 'test', 'magic number 0x00000803, expected 0x00000801')


def test_extra_bytes(good_dir):
  path = good_dir / 'test-extra'
  write_idx(path, np.zeros(5, np.uint8), data.IDX_LABELS_MAGIC)
  path.write_bytes(path.read_bytes() + b'\0')
  with pytest.raises(DataError, match='longer than its header says'):
    data.read_idx(str(path), data.IDX_LABELS_MAGIC)


def test_wrong_image_size(good_dir):
  write_idx(good_dir / 'train-images-idx3-ubyte', np.zeros((20, 32, 32), np.uint8),
            data.IDX_IMAGES_MAGIC)
  _expect_error(good_dir, 'train', 'items of shape (32, 32), expected (28, 28)')
  write_idx(good_dir / 'train-images-idx3-ubyte', np.zeros((20, 28, 20), np.uint8),
            data.IDX_IMAGES_MAGIC)
  _expect_error(good_dir, 'train', 'items of shape (28, 20), expected (28, 28)')


def test_image_label_count_mismatch(good_dir):
  write_idx(good_dir / 'train-labels-idx1-ubyte', np.zeros(19, np.uint8),
            data.IDX_LABELS_MAGIC)
  _expect_error(good_dir, 'train', 'holds 20 images but', 'holds 19 labels')
  write_idx(good_dir / 'train-labels-idx1-ubyte', np.zeros(21, np.uint8),
            data.IDX_LABELS_MAGIC)
  _expect_error(good_dir, 'train', 'holds 20 images but', 'holds 21 labels')


def test_label_out_of_range(good_dir):
  labels = np.zeros(20, np.uint8)
  labels[7] = 10
  write_idx(good_dir / 't10k-labels-idx1-ubyte', labels,
            data.IDX_LABELS_MAGIC)
  _expect_error(good_dir, 'test', 'label 10 at index 7 is outside 0..9')


def test_splits_are_checked_whatever_their_source():
  images = np.zeros((4, 28, 28, 1), np.uint8)
  labels = np.array([3, 9, 1, 12])  # no 0 among the good ones; the bad one last
  with pytest.raises(DataError, match='^src: label 12 at index 3 is outside 0..9.$'):
    data.checked_split(images, labels, 'src')
  with pytest.raises(DataError, match='^src: label -1 at index 1 is outside 0..9.$'):
    data.checked_split(images, np.array([3, -1, 10, 2]), 'src')  # the first one named
  with pytest.raises(DataError, match='^src: label -1 at index 2 is outside 0..9.$'):
    data.checked_split(images, np.array([3, 0, -1, 2]), 'src')
  split = data.checked_split(images[:3], labels[:3], 'src')
  assert split.labels.dtype == np.int32 and list(split.labels) == [3, 9, 1]
  with pytest.raises(dataclasses.FrozenInstanceError):
    split.labels = labels  # a split is never changed in place
  for bad, shown in ((images.astype(np.float32), '(28, 28, 1) float32'),
                     (images.astype(np.int8), '(28, 28, 1) int8'),
                     (np.zeros((4, 28, 28), np.uint8), '(28, 28) uint8'),
                     (np.zeros((4, 28, 28, 3), np.uint8), '(28, 28, 3) uint8')):
    with pytest.raises(DataError, match=re.escape(
        f'src: images of shape {shown}, expected (28, 28, 1) uint8.')):
      data.checked_split(bad, labels[:4] % 10, 'src')


def test_tfds_path_with_mock_data():
  with tfds.testing.mock_data(num_examples=37, policy=tfds.testing.MockPolicy.USE_CODE):
    split = data.read_tfds_split('train', None)
  assert split.images.shape == (37, 28, 28, 1) and split.images.dtype == np.uint8
  assert split.labels.dtype == np.int32 and 0 <= split.labels.min() <= split.labels.max() <= 9


def test_tfds_config_selects_tfds_and_splits(tmp_path):
  config = tiny_config('', validation_size=10, data_source='tfds')
  with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
    splits = data.load_datasets(config)
  assert {k: len(v) for k, v in splits.items()} == {'train': 40, 'validation': 10,
                                                     'test': 50}


def test_tfds_without_prepared_data_says_how_to_use_idx(tmp_path):
  with pytest.raises(DataError) as info:
    data.read_tfds_split('train', str(tmp_path / 'empty_tfds'))
  assert '--config.data_source=idx' in str(info.value)


def test_tfds_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch):
  # tensorflow-datasets makes a `mkdtemp` folder per call that it never removes.
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  (tmp_path / 'tmp').mkdir()
  with pytest.raises(DataError):
    data.read_tfds_split('test', str(tmp_path / 'empty_tfds'))
  assert os.listdir(tmp_path / 'tmp') == []
  assert tempfile.gettempdir() == str(tmp_path / 'tmp')


def test_validation_slice_is_disjoint_from_training(tiny_mnist_dir, mnist):
  config = tiny_config(tiny_mnist_dir, validation_size=100, train_subset=400)
  splits = data.load_datasets(config)
  assert len(splits['train']) == 400 and len(splits['validation']) == 100
  assert len(splits['test']) == 300
  # The validation slice is the last 100 of the 512 training images, the training
  # subset the first 400: no image of one is in the other.
  np.testing.assert_array_equal(splits['validation'].images, mnist['train'].images[412:512])
  np.testing.assert_array_equal(splits['train'].images, mnist['train'].images[:400])
  train_rows = {img.tobytes() for img in splits['train'].images}
  assert not any(img.tobytes() in train_rows for img in splits['validation'].images)


def test_validation_size_too_large(tiny_mnist_dir):
  with pytest.raises(DataError, match='leaves no training images'):
    data.load_datasets(tiny_config(tiny_mnist_dir, validation_size=512))
  with pytest.raises(DataError, match='leaves no training images'):
    data.load_datasets(tiny_config(tiny_mnist_dir, validation_size=600))



def ink_columns(images: np.ndarray) -> np.ndarray:
  """Per image, the columns with a pixel above the bounding box's threshold [N, W]."""
  return images[..., 0].max(1) > preprocess.INK_THRESHOLD * 255


@pytest.mark.parametrize('width', [10, 14, 20])
def test_width_normalisation_gives_every_digit_that_width(mnist, width):
  images = mnist['test'].images[:2000]
  normalised = preprocess.normalize_width(images, width)
  assert normalised.shape == images.shape and normalised.dtype == np.uint8
  columns = ink_columns(normalised)
  widths = columns.shape[1] - np.argmax(columns[:, ::-1], 1) - np.argmax(columns, 1)
  # Bilinear edges: within a pixel mostly, two for thin digits stretched much wider.
  assert np.mean(np.abs(widths - width) <= 1) > 0.9
  assert np.mean(np.abs(widths - width) <= 2) > 0.98
  # Heights and rows are untouched: the same rows hold ink as before.
  rows = lambda x: x[..., 0].max(2) > preprocess.INK_THRESHOLD * 255
  assert np.mean(np.all(rows(normalised) == rows(images), 1)) > 0.97
  # The centre of mass keeps its column (MNIST's own centring).
  def centre(x):
    profile = x[..., 0].astype(np.float64).sum(1)
    return (profile * np.arange(28)).sum(1) / profile.sum(1)
  assert np.abs(centre(normalised) - centre(images)).max() < 0.6


def test_width_normalisation_of_a_bar_and_of_blank_images():
  bar = np.zeros((2, 28, 28, 1), np.uint8)
  bar[0, 4:24, 12:16] = 255  # 4 columns wide, centre of mass at column 13.5
  stretched = preprocess.normalize_width(bar, 8)
  np.testing.assert_array_equal(np.flatnonzero(stretched[0, 10, :, 0] > 128),
                                np.arange(10, 18))
  np.testing.assert_array_equal(stretched[0, :4], 0)  # no ink appears in other rows
  np.testing.assert_array_equal(stretched[1], bar[1])  # blank stays blank
  with pytest.raises(ValueError, match='width=29'):
    preprocess.normalize_width(bar, 29)


def test_width_normalisation_applies_to_every_split(tiny_mnist_dir, mnist):
  plain = data.load_datasets(tiny_config(tiny_mnist_dir, validation_size=100))
  config = tiny_config(tiny_mnist_dir, validation_size=100, width_normalization=12)
  normalised = data.load_datasets(config)
  for name in ('train', 'validation', 'test'):
    np.testing.assert_array_equal(normalised[name].images,
                                  preprocess.normalize_width(plain[name].images, 12))
    np.testing.assert_array_equal(normalised[name].labels, plain[name].labels)
  # A config recorded before the field existed reads as off.
  del config['width_normalization']
  assert data.as_network_input(plain['test'].images, config) is plain['test'].images
