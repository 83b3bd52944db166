"""3x3 VALID convolutions through oneDNN on XLA:CPU, for `conv_impl='onednn'`.

XLA's CPU backend has no oneDNN convolution of its own: its native convolution is slow
to differentiate, and the shifted-view matmuls copy nine views of every input. oneDNN's
direct convolutions (the ones Keras/TensorFlow and PyTorch run on this CPU) need no
copies. `deepdigits/ops/onednn_conv.cc`, built by `pip install` (setup.py), wraps the
forward (bias added), input-gradient and kernel-and-bias-gradient primitives as XLA FFI
handlers; this module loads it, registers the handlers (and the bf16 matmul that
`onednn_dense` uses), and ties them together with a custom VJP. The handlers run oneDNN on
XLA's own intra-op threads, one chunk of the batch each, not on an OpenMP team of their
own. CPU only; on TPU/GPU the native convolution is the one to use.

Activations are float32, or bfloat16 where the CPU has bf16 instructions (AVX512-BF16 or
AMX: `bf16_problem`); kernels and biases are float32 in both cases, and in bfloat16 oneDNN
rounds the kernel to bfloat16 itself, accumulates in float32, adds the bias before rounding
the output, and returns the kernel and bias gradients in float32.
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
_SUFFIXES = {jnp.dtype(jnp.float32): 'F32', jnp.dtype(jnp.bfloat16): 'BF16'}
# A layer of the network (conv3's shapes at batch 128) whose kernels say which instructions
# oneDNN's bf16 convolutions use here.
_PROBE_LAYER = (128, 12, 12, 64, 128)


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
    for suffix in _SUFFIXES.values():
      jax.ffi.register_ffi_target(
          f'deepdigits_conv_{name}_{suffix}',
          jax.ffi.pycapsule(getattr(handlers, f'DeepdigitsConv{name}{suffix}')),
          platform='cpu')
  for suffix in _SUFFIXES.values():
    jax.ffi.register_ffi_target(
        f'deepdigits_matmul_bf16_to_{suffix}',
        jax.ffi.pycapsule(getattr(handlers, f'DeepdigitsMatmulBF16To{suffix}')), platform='cpu')
  handlers.DeepdigitsMatmulImpl.restype = ctypes.c_char_p
  handlers.DeepdigitsMatmulImpl.argtypes = [ctypes.c_int] * 3
  handlers.DeepdigitsConvImpls.restype = ctypes.c_char_p
  handlers.DeepdigitsConvImpls.argtypes = [ctypes.c_int] * 5 + [ctypes.c_bool]
  return handlers, ''


def is_available() -> bool:
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


def implementations(batch: int, height: int, width: int, in_features: int,
                    out_features: int, dtype='float32') -> str:
  """Which oneDNN kernels run a layer of these shapes with activations of `dtype`, e.g.
  'fwd brg_conv_fwd:avx512_core_bf16, ...', or 'unsupported: ...'."""
  handlers = _load()[0]
  if handlers is None:
    raise RuntimeError(unavailable_reason())
  return handlers.DeepdigitsConvImpls(batch, height, width, in_features, out_features,
                                      jnp.dtype(dtype) == jnp.bfloat16).decode()


def matmul_implementation(m: int, k: int, n: int) -> str:
  """Which oneDNN kernel runs a bf16 matmul [m, k] @ [k, n] with float32 results (the
  dense layers in bfloat16, `onednn_dense`), e.g. 'brg:avx512_core_amx'."""
  handlers = _load()[0]
  if handlers is None:
    raise RuntimeError(unavailable_reason())
  return handlers.DeepdigitsMatmulImpl(m, k, n).decode()


@functools.cache
def has_avx512_kernels() -> bool:
  """Whether oneDNN runs float32 convolutions on AVX-512 kernels here: they are stronger
  than its AVX2 ones, enough to change which layers Winograd's tiles beat them on."""
  return is_available() and 'avx512' in implementations(*_PROBE_LAYER)


@functools.cache
def bf16_problem() -> Optional[str]:
  """Why bfloat16 convolutions cannot run at full speed on this CPU, or None: oneDNN
  emulates bf16 (or has no kernel) without AVX512-BF16 or AMX instructions."""
  if not is_available():
    return unavailable_reason()
  kernels = implementations(*_PROBE_LAYER, dtype='bfloat16')
  if kernels.startswith('unsupported') or not all(
      'bf16' in part or 'amx' in part for part in kernels.split(', ')):
    return f'this CPU has no AVX512-BF16 or AMX instructions (oneDNN: {kernels})'
  return None


def _call(target: str, results, *operands):
  if not is_available():
    raise RuntimeError(f"conv_impl='onednn' is not available: {unavailable_reason()}")
  suffix = _SUFFIXES[jnp.dtype(operands[0].dtype)]
  return jax.ffi.ffi_call(f'deepdigits_conv_{target}_{suffix}', results)(*operands)


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The same function as `lax.conv_general_dilated` (3x3 VALID, stride 1, NHWC images,
  HWIO kernel) plus `bias`, computed by oneDNN in the dtype of `x` (float32 or bfloat16),
  from the kernel and bias in float32."""
  if jnp.dtype(x.dtype) not in _SUFFIXES:
    raise ValueError(f"conv_impl='onednn' computes in float32 or bfloat16, not {x.dtype}")
  return _conv3x3(x, kernel.astype(jnp.float32), bias.astype(jnp.float32))


@jax.custom_vjp
def _conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  n, h, w, _ = x.shape
  return _call('Forward', jax.ShapeDtypeStruct((n, h - 2, w - 2, kernel.shape[-1]), x.dtype),
               x, kernel, bias)


def _conv3x3_fwd(x, kernel, bias):
  return _conv3x3(x, kernel, bias), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  kernel_grad, bias_grad = _call(
      'KernelGrad', (jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                     jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32)), x, g)
  return (_call('InputGrad', jax.ShapeDtypeStruct(x.shape, x.dtype), g, kernel),
          kernel_grad, bias_grad)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
