"""Tests run on one CPU device, as a user's laptop does; the tests marked
`@pytest.mark.devices(8)` (sharding, device-count checks) run in a child pytest with 8
fake CPU devices (XLA_FLAGS, set before jax is imported): one child per module.

Tests that need the real MNIST digits take them from the folder DEEPDIGITS_MNIST_DIR
names (CI sets it to ../shared/data/mnist); else from the download cache, fetching
into it if a mirror answers; else they are skipped, with the reason.

A compilation cache shared by the tests, their pytest-xdist workers and the runs they
start in subprocesses saves compiling the same tiny-config steps over and over; it is kept
between runs of the suite in .pytest_cache (`--cache-clear` empties it first).
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

# The accelerator check (scripts/gpu_check.sh) runs the tests on a real device:
# DEEPDIGITS_TEST_PLATFORM=cuda. DEEPDIGITS_TEST_DEVICES=8 runs the whole suite on 8
# fake CPU devices in one process.
PLATFORM = os.environ.get('DEEPDIGITS_TEST_PLATFORM', 'cpu')
DEVICES = int(os.environ.get('DEEPDIGITS_TEST_DEVICES', '1'))
GIVEN_XLA_FLAGS = os.environ.get('XLA_FLAGS', '')  # what a child pytest starts from
# The tests' programs are small and many, and most run a few steps: compiling is most of
# the suite's CPU time, and LLVM most of a compile. The tests compile at LLVM's
# optimisation level 1 and with XLA's element-wise emitters instead of its newer fusion
# emitters: the tiny config's train step compiles in about a third of the CPU time, and
# runs slower (docs/testing.md). Every process of the suite compiles so, subprocesses
# included (xla_flags), so that what one computes can be compared bit for bit with
# another; the end-to-end run compiles as a user's does. DEEPDIGITS_TEST_COMPILE_FLAGS
# sets other flags ('' for XLA's defaults).
WANTED_COMPILE_FLAGS = ('--xla_backend_optimization_level=1',
                        '--xla_cpu_use_fusion_emitters=false')
COMPILE_FLAGS_VARIABLE = 'DEEPDIGITS_TEST_COMPILE_FLAGS'


def known_to_xla(flags: tuple[str, ...]) -> bool:
  """Whether this jaxlib's XLA takes `flags`: it aborts a process on a flag it does not
  know, and the fusion emitters' switch will go with the older emitters."""
  try:
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                           env=dict(os.environ, JAX_PLATFORMS='cpu',
                                    XLA_FLAGS=' '.join(flags)),
                           capture_output=True, timeout=300)
  except subprocess.TimeoutExpired:
    return False
  return probe.returncode == 0


# Decided once, by the process that starts the suite; its workers and children inherit it.
if COMPILE_FLAGS_VARIABLE not in os.environ and PLATFORM == 'cpu':
  os.environ[COMPILE_FLAGS_VARIABLE] = (
      ' '.join(WANTED_COMPILE_FLAGS) if known_to_xla(WANTED_COMPILE_FLAGS) else '')
TEST_COMPILE_FLAGS = tuple(os.environ.get(COMPILE_FLAGS_VARIABLE, '').split())


def xla_flags(devices: int, test_compile: bool = True) -> str:
  """XLA_FLAGS for a process of the tests on `devices` fake CPU devices: the tests'
  compile flags (unless not `test_compile`), then those the suite was started with (which
  may override them)."""
  given = [f for f in GIVEN_XLA_FLAGS.split() if f not in TEST_COMPILE_FLAGS and
           not f.startswith('--xla_force_host_platform_device_count=')]
  return ' '.join([*(TEST_COMPILE_FLAGS if test_compile else ()), *given,
                   f'--xla_force_host_platform_device_count={devices}'])


if PLATFORM == 'cpu':
  os.environ['XLA_FLAGS'] = xla_flags(DEVICES)
os.environ['JAX_PLATFORMS'] = PLATFORM
# JAX's cache keys hold the whole program, JAX's and XLA's versions and XLA's flags: a
# program that changed compiles anew, and a kept one is the one that would be compiled.
# The main pytest process chooses the folder; its workers and children inherit it.
OWN_COMPILATION_CACHE = None  # the folder this process chose, if the caller gave none
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  OWN_COMPILATION_CACHE = str(REPO / '.pytest_cache' / 'jax-compilation-cache')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = OWN_COMPILATION_CACHE
# Emptied at the start of a run beyond this (a whole run writes about 37 MB): programs
# of older code are never read again. JAX's own bound (jax_compilation_cache_max_size)
# rescans the whole folder at each write.
KEPT_COMPILATION_CACHE_BYTES = 1 << 30
# Every compile, even the many small ones (Orbax's first save slices each array: about
# 100 tiny programs a process), so that the workers and subprocesses compile each once.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import xml.etree.ElementTree as ElementTree  # pylint: disable=g-import-not-at-top

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from deepdigits import data, host_memory  # pylint: disable=g-import-not-at-top

host_memory.keep_freed_memory()  # as every command does, before JAX starts its threads

MNIST_DIR_VARIABLE = 'DEEPDIGITS_MNIST_DIR'


def write_idx(path, array: np.ndarray, magic: int) -> None:
  """Writes an IDX file of unsigned bytes (the format of the MNIST files)."""
  header = magic.to_bytes(4, 'big') + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  pathlib.Path(path).write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_mnist_idx(directory, train: data.Split, test: data.Split) -> str:
  """Writes the four MNIST IDX files (raw, not gzipped) for the given splits."""
  for split, (images_stem, labels_stem) in (('train', data.IDX_STEMS['train']),
                                            ('test', data.IDX_STEMS['test'])):
    s = train if split == 'train' else test
    write_idx(pathlib.Path(directory) / images_stem, s.images[..., 0],
              data.IDX_IMAGES_MAGIC)
    write_idx(pathlib.Path(directory) / labels_stem, s.labels, data.IDX_LABELS_MAGIC)
  return str(directory)


def real_mnist_dir() -> tuple[str, str]:
  """(the folder of the real MNIST files, '') or ('', why there is none)."""
  from deepdigits import mnist_download  # pylint: disable=g-import-not-at-top
  from deepdigits.errors import DataError  # pylint: disable=g-import-not-at-top
  given = os.environ.get(MNIST_DIR_VARIABLE)
  if given:
    return given, ''  # checked by reading it: a wrong folder fails, never skips
  cache = mnist_download.cache_dir()
  try:
    mnist_download.ensure_mnist(
        cache, mnist_download.parse_mirrors(mnist_download.DEFAULT_MIRRORS))
  except DataError as e:
    return '', (f'no real MNIST digits: {MNIST_DIR_VARIABLE} is not set and the '
                f'download cache {cache} could not be filled ({str(e)[:300]})')
  return cache, ''


def require_onednn() -> None:
  """Skips a test of the oneDNN extension where it is not built; under
  DEEPDIGITS_REQUIRE_ONEDNN (CI) fails it instead."""
  from deepdigits.ops import onednn_conv  # pylint: disable=g-import-not-at-top
  if not onednn_conv.is_available():
    reason = f'the oneDNN convolutions are not built: {onednn_conv.unavailable_reason()}'
    if os.environ.get('DEEPDIGITS_REQUIRE_ONEDNN'):
      pytest.fail(reason)
    pytest.skip(reason)


def require_bn_kernel() -> None:
  """Skips a test of the BatchNorm sums' extension where it is not built; under
  DEEPDIGITS_REQUIRE_ONEDNN (CI, which builds both extensions) fails it instead."""
  from deepdigits.ops import batch_norm  # pylint: disable=g-import-not-at-top
  if problem := batch_norm.kernel_problem():
    if os.environ.get('DEEPDIGITS_REQUIRE_ONEDNN'):
      pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope='session')
def mnist_dir() -> str:
  directory, reason = real_mnist_dir()
  if not directory:
    pytest.skip(reason)
  return directory


@pytest.fixture(scope='session')
def mnist(mnist_dir) -> dict:
  return {split: data.read_idx_split(mnist_dir, split) for split in ('train', 'test')}


@pytest.fixture(scope='session')
def tiny_mnist_dir(tmp_path_factory, mnist) -> str:
  """Real digits, few of them: 512 training and 300 test images as raw IDX files
  (300 is not a multiple of any test batch size, so padding is exercised). Few images
  keep the many short runs of the full network quick: 8 steps of 64 per epoch."""
  directory = tmp_path_factory.mktemp('tiny_mnist')
  train = data.Split(mnist['train'].images[:512], mnist['train'].labels[:512])
  test = data.Split(mnist['test'].images[:300], mnist['test'].labels[:300])
  return write_mnist_idx(directory, train, test)


def tiny_config(data_dir: str, **overrides):
  """The default config shrunk for tests: small batches, one epoch, 8-device friendly."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data_dir = data_dir
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 1
  config.model_summary = False  # printed and tested once, in test_reporting.py
  for name, value in overrides.items():
    config[name] = value
  return config


@pytest.fixture(scope='session')
def tiny_trained_workdir(tmp_path_factory, tiny_mnist_dir) -> str:
  """A finished run on the tiny data (two epochs, 16 steps, BatchNorm recalibrated as
  in cpu_quick; about 20 s), shared by the commands that read a workdir."""
  from deepdigits import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  train.train_and_evaluate(
      tiny_config(tiny_mnist_dir, num_epochs=2, bn_recalibration_batches=4), workdir)
  return workdir


def validated_config(data_dir: str, **overrides):
  """tiny_config with a validation slice (so a best checkpoint) and recalibration: 256
  training images (4 steps an epoch), 128 held out."""
  return tiny_config(data_dir, train_subset=256, validation_size=128,
                     bn_recalibration_batches=2, **overrides)


@pytest.fixture(scope='session')
def tiny_validated_workdir(tmp_path_factory, tiny_mnist_dir) -> str:
  """A finished run of validated_config (two epochs), read by the evaluate command's
  tests and by the TensorBoard test."""
  from deepdigits import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('validated') / 'run'
  train.train_and_evaluate(validated_config(tiny_mnist_dir, num_epochs=2), str(workdir))
  return workdir


@pytest.fixture(scope='session')
def tiny_seeds_folder(tmp_path_factory, tiny_mnist_dir) -> dict:
  """Seeds 0 and 1 of validated_config (one epoch) trained by the seeds command into one
  folder: the seeds tests read its tables, the ensemble tests its two members."""
  from deepdigits.tools import seeds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('seeds') / 'runs'
  config = validated_config(tiny_mnist_dir)
  rows, summary = seeds.run_seeds(config, str(root), [0, 1], say=lambda _: None)
  return {'root': root, 'config': config, 'rows': rows, 'summary': summary}


# pytest-xdist hands each worker whole units of work: one test module, or the modules
# that read one costly session fixture (so that it is built once, on that worker).
# pytest-xdist's own grouping (`--dist loadgroup`, the xdist_group mark) changes node
# ids, which pytest 9 no longer reads, so the units are made here
# (`ModuleGroupScheduling`, chosen by `--dist loadscope`).
SHARED_WORKER = {'test_plots': 'tiny_trained_workdir', 'test_predict': 'tiny_trained_workdir',
                 'test_inference': 'tiny_trained_workdir', 'test_export': 'tiny_trained_workdir',
                 'test_dispatch': 'tiny_trained_workdir',
                 'test_evaluate': 'tiny_validated_workdir',
                 'test_reporting': 'tiny_validated_workdir',
                 'test_seeds': 'tiny_seeds_folder', 'test_ensemble': 'tiny_seeds_folder'}
# The units that take longest, longest first (measured: docs/testing.md), handed out
# before the others, so that no worker is left with a long one while the other idles.
# test_train goes second: it compiles programs of its own, while the first unit compiles
# the tiny config's train step, which test_study would otherwise compile at once too.
LONGEST_UNITS = ('tiny_trained_workdir', 'test_train', 'test_study', 'test_failures',
                 'test_main', 'test_multihost', 'tiny_seeds_folder', 'test_recipe',
                 'test_model', 'test_gcs')


def work_unit(nodeid: str) -> str:
  """The unit of work of a test: its module's, or its shared fixture's."""
  module = nodeid.split('::', 1)[0].rsplit('/', 1)[-1].removesuffix('.py')
  return SHARED_WORKER.get(module, module)


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'devices(n): needs n devices; where this process has fewer, it runs in a '
      'child pytest on n fake CPU devices')
  # `--cache-clear` empties the kept compilation cache too: a run that compiles all.
  # In the main process (the only one with its own cache folder), before it starts the
  # xdist workers and anything compiles.
  if OWN_COMPILATION_CACHE and (config.getoption('cacheclear', False) or kept_cache_bytes(
      OWN_COMPILATION_CACHE) > KEPT_COMPILATION_CACHE_BYTES):
    shutil.rmtree(OWN_COMPILATION_CACHE, ignore_errors=True)


def kept_cache_bytes(path: str) -> int:
  """The size of the entries in the cache folder `path` (0 if there is none), after
  removing the empty ones: a process killed between creating an entry's file and
  writing it leaves one, which JAX would warn about, and never replace, in every run."""
  try:
    sizes = {e.path: e.stat().st_size for e in os.scandir(path) if e.is_file()}
  except FileNotFoundError:
    return 0
  for entry, size in sizes.items():
    if size == 0:
      os.remove(entry)
  return sum(sizes.values())


@pytest.hookimpl(optionalhook=True)  # a child pytest runs without pytest-xdist
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue('dist') == 'loadscope':
    return ModuleGroupScheduling(config, log)
  return None


def unit_rank(nodeid: str) -> int:
  unit = work_unit(nodeid)
  return LONGEST_UNITS.index(unit) if unit in LONGEST_UNITS else len(LONGEST_UNITS)


def pytest_collection_modifyitems(items):
  # The longest units first (`--no-loadscope-reorder` keeps this order); a stable sort,
  # so each module's tests keep theirs.
  items.sort(key=lambda item: unit_rank(item.nodeid))
  for i, item in enumerate(items):
    marker = item.get_closest_marker('devices')
    if marker and marker.args[0] > DEVICES:
      if PLATFORM != 'cpu':
        item.add_marker(pytest.mark.skip(
            reason=f'needs {marker.args[0]} devices; fake ones exist on the CPU only'))
      else:
        items[i] = InChildProcess.from_parent(
            item.parent, name=item.name, original=item, devices=marker.args[0])


if importlib.util.find_spec('xdist'):
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ModuleGroupScheduling(LoadScopeScheduling):
    """pytest-xdist's scheduling by scope, with `work_unit` as the scope."""

    def _split_scope(self, nodeid: str) -> str:
      return work_unit(nodeid)


class ChildTestFailed(Exception):
  """A test that failed in its child pytest; its report is the child's."""


class InChildProcess(pytest.Item):
  """A test that needs more devices than this process has, run with the other such
  tests of its module in one child pytest on that many fake CPU devices (XLA fixes the
  device count when it starts). Its outcome, and a failure's report, are the child's."""

  def __init__(self, *, original, devices, **kwargs):
    super().__init__(**kwargs)
    self.original = original
    self.devices = devices
    self.own_markers = list(original.own_markers)
    self.keywords.update(original.keywords)

  def reportinfo(self):
    return self.original.reportinfo()

  def runtest(self):
    outcomes = child_outcomes(self.session, self.path, self.devices)
    if self.nodeid not in outcomes:
      raise ChildTestFailed(f'the child pytest did not run {self.nodeid}:\n'
                            f'{outcomes.get("", "")}')
    kind, text = outcomes[self.nodeid]
    if kind == 'skipped':
      pytest.skip(text)
    if kind != 'passed':
      raise ChildTestFailed(text)

  def repr_failure(self, excinfo):
    if excinfo.errisinstance(ChildTestFailed):
      return f'in a child pytest on {self.devices} fake CPU devices:\n{excinfo.value}'
    return super().repr_failure(excinfo)


def child_outcomes(session, path, devices) -> dict:
  """{nodeid: (passed|failed|skipped, text)} of every test of the module at `path` marked
  for `devices`, run once per pytest process in a child pytest; '' holds its output."""
  cache = session.stash.setdefault(CHILD_OUTCOMES, {})
  if (path, devices) in cache:
    return cache[(path, devices)]
  nodeids = [item.nodeid for item in session.items
             if isinstance(item, InChildProcess) and item.path == path and
             item.devices == devices]
  report = pathlib.Path(tempfile.mkdtemp(prefix='child_pytest_')) / 'report.xml'
  env = dict(os.environ, DEEPDIGITS_TEST_DEVICES=str(devices), XLA_FLAGS=GIVEN_XLA_FLAGS)
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', '-p', 'no:cacheprovider',
       '-o', 'addopts=', f'--junitxml={report}', *nodeids],
      cwd=session.config.rootpath, env=env, capture_output=True, text=True, timeout=900)
  outcomes = {'': (result.stdout + result.stderr)[-5000:]}
  if report.exists():
    for case in ElementTree.parse(report).iter('testcase'):
      nodeid = case.get('classname', '').replace('.', '/') + '.py::' + case.get('name')
      kind, text = 'passed', ''
      for child in case:
        if child.tag in ('failure', 'error'):  # a failed call, or a failed setup/teardown
          kind, text = 'failed', (child.get('message') or '') + '\n' + (child.text or '')
          break
        if child.tag == 'skipped':
          kind, text = 'skipped', child.get('message') or ''
      outcomes[nodeid] = (kind, text)
  shutil.rmtree(report.parent, ignore_errors=True)
  cache[(path, devices)] = outcomes
  return outcomes


CHILD_OUTCOMES = pytest.StashKey[dict]()


