"""Every read and write of a run's files, local or on an object store (`gs://...`).

Paths go through `etils.epath` (what Orbax itself uses; `gs://` through gcsfs), so a
workdir can be a local folder or a bucket prefix with the same code. Local files are
written through a temporary name and renamed, so a killed process never leaves half a
file; object stores write whole objects, so their writes are atomic already. Object
stores cannot append: an appended line there rewrites the (small) object.
"""

import importlib.util
import logging
import os
import re
import tempfile
import uuid
from typing import Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store (`gs://`, `s3://`, ...) and not a local path."""
  return '://' in str(path)


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def join(base: PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for local folders and object stores alike."""
  return str(epath.Path(base).joinpath(*parts))


def absolute(p: PathLike) -> str:
  """A local path made absolute (so that it works from any folder); a URL unchanged."""
  return str(p) if is_remote(p) else os.path.abspath(p)


def resolved(p: PathLike) -> str:
  """The one name of a path: local ones absolute with symlinks resolved, so that two
  spellings of one folder compare equal; URLs without a trailing slash."""
  return str(p).rstrip('/') if is_remote(p) else os.path.realpath(p)


def natural_key(name: str) -> list:
  """Sorts names as a person would: 'seed=10' after 'seed=2'."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def is_file(p: PathLike) -> bool:
  return epath.Path(p).is_file()


def is_dir(p: PathLike) -> bool:
  return epath.Path(p).is_dir()


def list_names(p: PathLike) -> list[str]:
  """The names in folder `p` ([] if it does not exist)."""
  folder = epath.Path(p)
  return [child.name for child in folder.iterdir()] if folder.is_dir() else []


def make_dirs(p: PathLike) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text()


def write_text(p: PathLike, text: str) -> None:
  """Writes the whole file at once: a temporary name then a rename on local disks."""
  write_bytes(p, text.encode())


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes the whole file at once: a temporary name then a rename on local disks."""
  if is_remote(p):
    epath.Path(p).write_bytes(data)
    return
  folder = os.path.dirname(os.path.abspath(p))
  fd, partial = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(p) + '.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(partial, default_file_mode())  # as open() would, not mkstemp's 0600
    os.replace(partial, p)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def default_file_mode() -> int:
  """The permissions open() gives a new file (0o666 less the umask)."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def append_text(p: PathLike, text: str) -> None:
  """Appends to a local file; on an object store, rewrites the object with `text` added."""
  if is_remote(p):
    target = epath.Path(p)
    target.write_text((target.read_text() if target.exists() else '') + text)
    return
  with open(p, 'a') as f:
    f.write(text)


def move(source: PathLike, destination: PathLike) -> None:
  """Renames a file or folder (on object stores: copies, then deletes the source)."""
  epath.Path(source).rename(destination)


# The package each object store needs (etils.epath reaches them through fsspec).
BACKENDS = {'gs': ('gcsfs', "pip install -e '.[gcs]'")}


def backend_problem(p: PathLike) -> Optional[str]:
  """Why `p` cannot be used from this installation (its store's package is missing or
  unknown), or None."""
  if not is_remote(p):
    return None
  scheme = str(p).split('://', 1)[0]
  if scheme not in BACKENDS:
    return (f'{p}: {scheme}:// is not supported; use a local folder or gs://BUCKET/PATH')
  package, install = BACKENDS[scheme]
  if importlib.util.find_spec(package) is None:
    return f'{p}: {scheme}:// paths need the {package} package: {install}'
  return None


def bucket_problem(p: PathLike) -> Optional[str]:
  """For an object-store path, why its bucket cannot be written (missing, not visible,
  not writable), or None; a probe object is written and deleted."""
  scheme, rest = str(p).split('://', 1)
  bucket = f'{scheme}://{rest.split("/", 1)[0]}'
  try:
    if not epath.Path(bucket).exists():
      return (f'bucket {bucket} does not exist or is not visible with these '
              'credentials; create it, or fix the path')
    probe = epath.Path(p) / f'.deepdigits-write-probe-{uuid.uuid4().hex}'
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except (network, auth, permission)
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    return f'cannot write to {p} ({type(e).__name__}: {reason})'
  return None


def quiet_cloud_logging() -> None:
  """gcsfs warns on every new bucket when it cannot tell the bucket's type without
  credentials, and logs its own retries; a run's output stays readable without that."""
  for name in ('gcsfs', 'gcsfs.core', 'fsspec', 'google.auth', 'google.cloud'):
    logging.getLogger(name).setLevel(logging.ERROR)
