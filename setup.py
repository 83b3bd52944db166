"""Builds deepdigits/ops/onednn_conv.cc (oneDNN convolutions for XLA:CPU) when oneDNN's
headers are installed in the build environment (Linux x86-64, see pyproject.toml). The
extension is optional: without it `conv_impl='auto'` uses the shifted-view matmuls."""

import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepdigits.ops.onednn_conv import installed_file  # pylint: disable=g-import-not-at-top


def onednn_extensions():
  header = installed_file('onednn-devel-cpu-gomp', 'include/oneapi/dnnl/dnnl.hpp')
  library = installed_file('onednn-cpu-gomp', '/libdnnl.so')
  if not (header and library):
    return []
  import jax.ffi  # pylint: disable=g-import-not-at-top (jax is a build requirement)
  return [Extension(
      'deepdigits.ops._onednn_conv', ['deepdigits/ops/onednn_conv.cc'],
      include_dirs=[jax.ffi.include_dir(),
                    os.path.dirname(os.path.dirname(os.path.dirname(header)))],
      library_dirs=[os.path.dirname(library)], libraries=['dnnl', 'gomp'],
      extra_compile_args=['-std=c++17', '-O2'], language='c++', optional=True)]


setup(ext_modules=onednn_extensions())
