"""3x3 VALID convolutions through oneDNN on XLA:CPU, for `conv_impl='onednn'`.

XLA's CPU backend has no oneDNN convolution of its own: its native convolution is slow
to differentiate, and the shifted-view matmuls copy nine views of every input. oneDNN's
direct convolutions (the ones Keras/TensorFlow and PyTorch run on this CPU) need no
copies. `deepdigits/ops/onednn_conv.cc`, built by `pip install` (setup.py), wraps the
forward, input-gradient and kernel-gradient primitives as XLA FFI handlers; this module
loads it, registers the handlers, and ties them together with a custom VJP. CPU and
float32 only; on TPU/GPU the native convolution is the one to use.
"""

import ctypes
import functools
import glob
import importlib.metadata
import os
from typing import Optional

import jax
import jax.numpy as jnp

_TARGETS = ('Forward', 'InputGrad', 'KernelGrad')


def installed_file(distribution: str, suffix: str) -> Optional[str]:
  """The absolute path of a file that a pip distribution installed, or None (also used
  by setup.py to find oneDNN's headers and library)."""
  try:
    files = importlib.metadata.distribution(distribution).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for path in files:
    if str(path).replace(os.sep, '/').endswith(suffix):
      return os.path.abspath(str(path.locate()))
  return None


@functools.cache
def _load() -> tuple[Optional[ctypes.CDLL], str]:
  """(the loaded handlers, '') or (None, why they are not available)."""
  library = installed_file('onednn-cpu-gomp', '/libdnnl.so.3')
  if library is None:
    return None, ('the onednn-cpu-gomp package is not installed (it is installed with '
                  "deepdigits on Linux x86-64: pip install -e '.[dev]')")
  built = glob.glob(os.path.join(os.path.dirname(__file__), '_onednn_conv*.so'))
  if not built:
    return None, ('deepdigits/ops/onednn_conv.cc was not built: reinstall with '
                  "pip install -e '.[dev]' (it needs a C++17 compiler)")
  try:
    # Loaded globally first, so that the extension's link to libdnnl.so.3 resolves to it.
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    handlers = ctypes.CDLL(built[0])
  except OSError as e:
    return None, f'cannot load oneDNN: {e}'
  for name in _TARGETS:
    jax.ffi.register_ffi_target(f'deepdigits_conv_{name}',
                                jax.ffi.pycapsule(getattr(handlers, f'DeepdigitsConv{name}')),
                                platform='cpu')
  handlers.DeepdigitsConvImpls.restype = ctypes.c_char_p
  return handlers, ''


def is_available() -> bool:
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


def implementations(batch: int, height: int, width: int, in_features: int,
                    out_features: int) -> str:
  """Which oneDNN kernels run a layer of these shapes, e.g. 'fwd brgconv:avx512_core, ...'."""
  handlers = _load()[0]
  if handlers is None:
    raise RuntimeError(unavailable_reason())
  return handlers.DeepdigitsConvImpls(batch, height, width, in_features,
                                      out_features).decode()


def _call(target: str, shape, *operands) -> jax.Array:
  if not is_available():
    raise RuntimeError(f"conv_impl='onednn' is not available: {unavailable_reason()}")
  return jax.ffi.ffi_call(f'deepdigits_conv_{target}',
                          jax.ShapeDtypeStruct(shape, jnp.float32))(*operands)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same function as `lax.conv_general_dilated` (3x3 VALID, stride 1, NHWC images,
  HWIO kernel, float32), computed by oneDNN."""
  n, h, w, _ = x.shape
  return _call('Forward', (n, h - 2, w - 2, kernel.shape[-1]), x, kernel)


def _conv3x3_fwd(x, kernel):
  return conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  return _call('InputGrad', x.shape, g, kernel), _call('KernelGrad', kernel.shape, x, g)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
