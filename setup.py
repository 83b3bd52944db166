"""Builds deepdigits/onednn_conv.cc (oneDNN convolutions for XLA:CPU) when oneDNN's
headers are installed in the build environment (Linux x86-64, see pyproject.toml). The
extension is optional: without it `conv_impl='auto'` uses the shifted-view matmuls."""

import importlib.metadata
import os

from setuptools import Extension, setup


def installed_file(distribution: str, suffix: str):
  """The absolute path of a file a pip distribution installed, or None."""
  try:
    files = importlib.metadata.distribution(distribution).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for path in files:
    if str(path).replace(os.sep, '/').endswith(suffix):
      return os.path.abspath(str(path.locate()))
  return None


def onednn_extensions():
  header = installed_file('onednn-devel-cpu-gomp', 'include/oneapi/dnnl/dnnl.hpp')
  library = installed_file('onednn-cpu-gomp', '/libdnnl.so')
  if not (header and library):
    return []
  import jax.ffi  # pylint: disable=g-import-not-at-top
  return [Extension(
      'deepdigits._onednn_conv', ['deepdigits/onednn_conv.cc'],
      include_dirs=[jax.ffi.include_dir(), os.path.dirname(os.path.dirname(os.path.dirname(header)))],
      library_dirs=[os.path.dirname(library)], libraries=['dnnl'],
      extra_compile_args=['-std=c++17', '-O2'], language='c++', optional=True)]


setup(ext_modules=onednn_extensions())
