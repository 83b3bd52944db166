"""The four MNIST IDX files in a local cache, downloaded from mirrors when missing.

As torchvision and keras.datasets do, without TensorFlow: each file missing from the
cache (`$XDG_CACHE_HOME/deepdigits/mnist`, else `~/.cache/deepdigits/mnist`) is fetched
with pooch's HTTP downloader from the first mirror that serves it, checked against the
SHA-256 of its uncompressed bytes (so any mirror's gzip of the original files passes),
and only then renamed into place: an interrupted or damaged download never leaves a
file that a later run would trust.
"""

import gzip
import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence

from deepdigits.errors import DataError

# SHA-256 and length of each file's uncompressed bytes (the original IDX files).
MNIST_FILES = {
    'train-images-idx3-ubyte':
        ('ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db', 47_040_016),
    'train-labels-idx1-ubyte':
        ('65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5', 60_008),
    't10k-images-idx3-ubyte':
        ('0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7', 7_840_016),
    't10k-labels-idx1-ubyte':
        ('ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2', 10_008),
}
# The public mirrors that tensorflow-datasets and torchvision download MNIST from.
DEFAULT_MIRRORS = ('https://storage.googleapis.com/cvdf-datasets/mnist/,'
                   'https://ossci-datasets.s3.amazonaws.com/mnist/,'
                   'http://yann.lecun.com/exdb/mnist/')
TIMEOUT_SECONDS = 30  # per connection attempt and per silent read


def cache_dir() -> str:
  """Where downloaded MNIST files live: $XDG_CACHE_HOME/deepdigits/mnist, else
  ~/.cache/deepdigits/mnist."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'deepdigits', 'mnist')


def parse_mirrors(mirrors: str) -> list[str]:
  """The comma-separated base URLs of --config.data_mirrors, each ending in '/'."""
  return [m.strip().rstrip('/') + '/' for m in mirrors.split(',') if m.strip()]


def uncompressed_digest(path: str) -> tuple[str, int]:
  """(SHA-256, length) of a file's bytes, gunzipped first if it is gzip."""
  with open(path, 'rb') as f:
    is_gzip = f.read(2) == b'\x1f\x8b'
  digest, size = hashlib.sha256(), 0
  with (gzip.open if is_gzip else open)(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      size += len(chunk)
  return digest.hexdigest(), size


def is_verified(path: str, stem: str) -> bool:
  """Whether `path` holds exactly the original bytes of MNIST file `stem`."""
  try:
    return uncompressed_digest(path) == MNIST_FILES[stem]
  except (OSError, EOFError):  # unreadable or a damaged gzip stream
    return False


def ensure_mnist(directory: str, mirrors: Sequence[str], download: bool = True) -> None:
  """Makes `directory` hold the four verified MNIST files, downloading the missing or
  damaged ones; a DataError naming the files, the folder and the fix otherwise."""
  missing = []
  for stem in MNIST_FILES:
    present = [os.path.join(directory, n) for n in (stem + '.gz', stem)
               if os.path.isfile(os.path.join(directory, n))]
    if not any(is_verified(path, stem) for path in present):
      missing.append(stem)
  if not missing:
    return
  names = ', '.join(f'{stem}.gz' for stem in missing)
  if not download:
    raise DataError(f'MNIST files missing from {directory}: {names}, and '
                    '--config.download=False. Put them there (raw or .gz), point '
                    '--config.data_dir at a folder that holds them, or allow the download.')
  if not mirrors:
    raise DataError(f'MNIST files missing from {directory}: {names}, and '
                    '--config.data_mirrors lists no mirror.')
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise DataError(f'cannot create the MNIST cache {directory} ({e.strerror}); point '
                    '--config.data_dir at a folder with the MNIST files, or set '
                    'XDG_CACHE_HOME to a writable folder.') from None
  for stem in missing:
    download_file(stem, directory, mirrors)


def download_file(stem: str, directory: str, mirrors: Sequence[str]) -> str:
  """Downloads `stem`.gz from the first mirror whose copy verifies; returns its path."""
  import pooch  # pylint: disable=g-import-not-at-top (only needed to download)

  from deepdigits import storage  # pylint: disable=g-import-not-at-top
  destination = os.path.join(directory, stem + '.gz')
  progressbar = sys.stderr.isatty()
  problems = []
  for mirror in mirrors:
    url = mirror + stem + '.gz'
    print(f'deepdigits: downloading {url} to {directory}', file=sys.stderr, flush=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f'.{stem}.', suffix='.part')
    os.close(fd)
    try:
      pooch.HTTPDownloader(progressbar=progressbar, timeout=TIMEOUT_SECONDS)(
          url, partial, None)
      if is_verified(partial, stem):
        os.chmod(partial, storage.default_file_mode())  # not mkstemp's 0600
        os.replace(partial, destination)
        return destination
      problems.append(f'{url}: the file does not match MNIST\'s SHA-256')
    except Exception as e:  # pylint: disable=broad-except (any failure: next mirror)
      problems.append(f'{url}: {_short(e)}')
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  raise DataError(f'cannot download {stem}.gz from any mirror ({"; ".join(problems)}). '
                  f'Put the MNIST files in {directory} (raw or .gz), point '
                  '--config.data_dir at a folder that holds them, or give other '
                  '--config.data_mirrors.')


def _short(error: Exception) -> str:
  """One line of an exception, without the long chains requests builds."""
  text = ' '.join(str(error).split())
  if len(text) > 160:
    text = text[:157] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__
