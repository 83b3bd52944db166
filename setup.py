"""Builds the C++ kernels of deepdigits/ops as XLA FFI handlers: ReLU then BatchNorm in
training (relu_batch_norm.cc, any CPU with a C++17 compiler), and oneDNN's convolutions
and matmuls (onednn_conv.cc) where oneDNN's headers are installed in the build environment
(Linux x86-64, see pyproject.toml). Both are optional: without them the code runs the same
functions in jax.numpy (`conv_impl='auto'` the shifted-view matmuls)."""

import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepdigits.ops.onednn_conv import installed_file  # pylint: disable=g-import-not-at-top

OPS = 'deepdigits/ops'


def extensions():
  import jax.ffi  # pylint: disable=g-import-not-at-top (jax is a build requirement)
  common = dict(language='c++', optional=True, depends=[f'{OPS}/thread_chunks.h'])
  # -fno-trapping-math lets GCC vectorise ReLU's compare-and-select; -ffp-contract=off keeps
  # a * b + c two roundings on every instruction set (neither changes a result).
  built = [Extension('deepdigits.ops._relu_batch_norm', [f'{OPS}/relu_batch_norm.cc'],
                     include_dirs=[jax.ffi.include_dir()],
                     extra_compile_args=['-std=c++17', '-O3', '-fno-trapping-math',
                                         '-ffp-contract=off'], **common)]
  header = installed_file('onednn-devel-cpu-gomp', 'include/oneapi/dnnl/dnnl.hpp')
  library = installed_file('onednn-cpu-gomp', '/libdnnl.so')
  if header and library:
    built.append(Extension(
        'deepdigits.ops._onednn_conv', [f'{OPS}/onednn_conv.cc'],
        include_dirs=[jax.ffi.include_dir(),
                      os.path.dirname(os.path.dirname(os.path.dirname(header)))],
        library_dirs=[os.path.dirname(library)], libraries=['dnnl', 'gomp'],
        extra_compile_args=['-std=c++17', '-O2'], **common))
  return built


setup(ext_modules=extensions())
