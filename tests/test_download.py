"""MNIST downloaded into the cache from mirrors (`deepdigits.mnist_download`), against
HTTP servers on 127.0.0.1 that each test starts and stops: download, verify and reuse
offline; a failing mirror, then the next; a checksum mismatch; a connection closed
mid-file; no server at all."""

import contextlib
import gzip
import hashlib
import http.server
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import REPO, write_idx
from deepdigits import data, mnist_download
from deepdigits.errors import DataError


def tiny_mnist_files(directory: pathlib.Path) -> dict[str, bytes]:
  """Four small IDX files (as gzip bytes) standing in for MNIST, by file name."""
  rng = np.random.default_rng(0)
  arrays = {'train-images-idx3-ubyte': (rng.integers(0, 256, (20, 28, 28)), 0x803),
            'train-labels-idx1-ubyte': (rng.integers(0, 10, 20), 0x801),
            't10k-images-idx3-ubyte': (rng.integers(0, 256, (10, 28, 28)), 0x803),
            't10k-labels-idx1-ubyte': (rng.integers(0, 10, 10), 0x801)}
  files = {}
  for stem, (array, magic) in arrays.items():
    write_idx(directory / stem, array, magic)
    files[stem + '.gz'] = gzip.compress((directory / stem).read_bytes())
  return files


@pytest.fixture
def tiny_hashes(tmp_path, monkeypatch) -> dict[str, bytes]:
  """The tiny files' bytes, with mnist_download checking against their hashes."""
  raw_dir = tmp_path / 'raw'
  raw_dir.mkdir()
  files = tiny_mnist_files(raw_dir)
  monkeypatch.setattr(mnist_download, 'MNIST_FILES', {
      stem: (hashlib.sha256((raw_dir / stem).read_bytes()).hexdigest(),
             (raw_dir / stem).stat().st_size) for stem in mnist_download.MNIST_FILES})
  return files


@contextlib.contextmanager
def serving(files: dict[str, bytes], mode: str = 'ok'):
  """An HTTP server on 127.0.0.1 serving `files` by name; mode 'missing' answers 404,
  'truncated' sends half of each file under its full Content-Length and hangs up.
  Yields (base URL, the list of paths requested)."""
  requested = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
      name = self.path.rsplit('/', 1)[-1]
      requested.append(name)
      if mode == 'missing' or name not in files:
        self.send_error(404)
        return
      body = files[name]
      self.send_response(200)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body[:len(body) // 2] if mode == 'truncated' else body)
      if mode == 'truncated':
        self.close_connection = True

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/mnist/', requested
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def closed_port_url() -> str:
  """A loopback URL where nothing listens."""
  server = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)
  port = server.server_address[1]
  server.server_close()
  return f'http://127.0.0.1:{port}/'


def test_downloads_verifies_and_reuses_the_files_offline(tiny_hashes, tmp_path):
  cache = tmp_path / 'cache'
  with serving(tiny_hashes) as (url, requested):
    mnist_download.ensure_mnist(str(cache), [url])
  assert sorted(requested) == sorted(tiny_hashes)
  assert sorted(os.listdir(cache)) == sorted(tiny_hashes)  # no partial file left
  # The server is gone: the cached, verified files are used without the network.
  mnist_download.ensure_mnist(str(cache), [closed_port_url()], download=False)
  split = data.read_idx_split(str(cache), 'test')
  assert split.images.shape == (10, 28, 28, 1) and len(split) == 10


def test_a_failing_mirror_is_followed_by_the_next(tiny_hashes, tmp_path):
  cache = tmp_path / 'cache'
  with serving(tiny_hashes, mode='missing') as (bad, bad_requests), \
       serving(tiny_hashes) as (good, good_requests):
    mnist_download.ensure_mnist(str(cache), [closed_port_url(), bad, good])
  assert len(bad_requests) == 4 and sorted(good_requests) == sorted(tiny_hashes)
  assert sorted(os.listdir(cache)) == sorted(tiny_hashes)


def test_a_file_that_does_not_match_its_checksum_is_never_kept(tiny_hashes, tmp_path):
  cache = tmp_path / 'cache'
  wrong = dict(tiny_hashes)
  wrong['t10k-labels-idx1-ubyte.gz'] = gzip.compress(b'\x00\x00\x08\x01' + bytes(14))
  with serving(wrong) as (url, _):
    with pytest.raises(DataError) as error:
      mnist_download.ensure_mnist(str(cache), [url])
  message = str(error.value)
  assert message.startswith('cannot download t10k-labels-idx1-ubyte.gz from any mirror')
  assert "does not match MNIST's SHA-256" in message and str(cache) in message
  assert 'point --config.data_dir' in message and '\n' not in message
  # The three good files are kept; the bad one never arrives, not even as a partial file.
  assert sorted(os.listdir(cache)) == sorted(set(tiny_hashes) - {'t10k-labels-idx1-ubyte.gz'})


def test_a_damaged_cached_file_is_downloaded_again(tiny_hashes, tmp_path):
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / 'train-labels-idx1-ubyte.gz').write_bytes(b'not gzip at all')
  with serving(tiny_hashes) as (url, requested):
    mnist_download.ensure_mnist(str(cache), [url])
  assert 'train-labels-idx1-ubyte.gz' in requested
  assert (cache / 'train-labels-idx1-ubyte.gz').read_bytes() == tiny_hashes[
      'train-labels-idx1-ubyte.gz']


def test_a_connection_closed_mid_file_leaves_nothing(tiny_hashes, tmp_path):
  cache = tmp_path / 'cache'
  with serving(tiny_hashes, mode='truncated') as (url, _):
    with pytest.raises(DataError, match=r'cannot download train-images-idx3-ubyte.gz from '
                       r'any mirror \(http://127.0.0.1:\d+/mnist/train-images-idx3-ubyte.gz: '):
      mnist_download.ensure_mnist(str(cache), [url])
  assert os.listdir(cache) == []


def test_no_server_at_all_is_one_line_naming_the_fix(tiny_hashes, tmp_path):
  with pytest.raises(DataError) as error:
    mnist_download.ensure_mnist(str(tmp_path / 'cache'), [closed_port_url()])
  message = str(error.value)
  assert 'ConnectionError' in message and '--config.data_dir' in message
  assert '--config.data_mirrors' in message and '\n' not in message


def test_offline_with_nothing_cached_says_what_is_missing_and_where(tiny_hashes, tmp_path):
  with pytest.raises(DataError) as error:
    mnist_download.ensure_mnist(str(tmp_path / 'cache'), [closed_port_url()],
                                download=False)
  assert str(error.value) == (
      f'MNIST files missing from {tmp_path / "cache"}: train-images-idx3-ubyte.gz, '
      'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, '
      'and --config.download=False. Put them there (raw or .gz), point --config.data_dir '
      'at a folder that holds them, or allow the download.')


def test_the_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert mnist_download.cache_dir() == str(tmp_path / 'deepdigits' / 'mnist')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert mnist_download.cache_dir() == str(tmp_path / 'home' / '.cache' / 'deepdigits' /
                                           'mnist')


def test_the_real_files_come_through_a_mirror_and_their_checksums(mnist_dir, tmp_path,
                                                                   monkeypatch):
  """The real MNIST .gz files served over loopback pass the uncompressed SHA-256s, and
  a run with no data_dir reads them from the cache."""
  files = {p.name: p.read_bytes() for p in pathlib.Path(mnist_dir).glob('*.gz')}
  if len(files) < 4:
    pytest.skip(f'{mnist_dir} holds the raw files, not the .gz ones this test serves')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  with serving(files) as (url, requested):
    config.data_mirrors = url
    splits = data.load_datasets(config)
  assert sorted(requested) == sorted(files)
  assert len(splits['train']) == 60_000 and len(splits['test']) == 10_000
  assert splits['train'].labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_main_offline_with_nothing_cached_stops_with_one_line(tmp_path):
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/mnist_tpu.py',
       f'--workdir={tmp_path / "run"}', '--config.download=False'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(
      f'deepdigits: error: MNIST files missing from {tmp_path}/deepdigits/mnist: ')
  assert 'Traceback' not in result.stderr and '../shared' not in result.stderr + result.stdout
