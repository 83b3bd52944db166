"""ReLU then BatchNorm in training, as one function with its gradient written out.

Every BatchNorm of the network follows a ReLU. Differentiated by JAX, the pair costs XLA
several passes over the activations each way, and in bfloat16 a conversion in each. Here
the forward pass is one reduction (the mean and mean square of each feature) and one
element-wise pass, and the backward pass one reduction (the sums of the output gradient
and of its product with the normalised input, per group; the scale's and bias's
gradients are their sums over the groups) and one element-wise pass that also applies
the ReLU's mask. The forward is Flax's formula (`nn.BatchNorm`: the variance as E[x^2] -
E[x]^2 in float32, clipped at 0); the gradient is its exact derivative, rounded
differently from JAX's own.

The per-feature sums of both reductions are XLA's, or with `sums_impl='kernel'` (CPU, one
device) those of `batch_norm_stats.cc`, built by `pip install` (setup.py): XLA:CPU writes
ReLU(x) in float32 (and in the backward the products) to memory before each reduction and
reads it back, where the kernel reads the activations once, in their own type.
"""

import ctypes
import functools
import glob
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

SUMS_IMPLS = ('native', 'kernel')
_KERNEL_SUFFIXES = {jnp.dtype(jnp.float32): 'F32', jnp.dtype(jnp.bfloat16): 'BF16'}


@functools.cache
def kernel_problem() -> Optional[str]:
  """Why the C++ sums cannot run in this process, or None (they are then registered)."""
  built = glob.glob(os.path.join(os.path.dirname(__file__), '_batch_norm_stats*.so'))
  if not built:
    return ('deepdigits/ops/batch_norm_stats.cc was not built: reinstall with '
            "pip install -e '.[dev]' (it needs a C++17 compiler)")
  try:
    handlers = ctypes.CDLL(built[0])
  except OSError as e:
    return f'cannot load {built[0]}: {e}'
  for name, symbol in (('relu_stats', 'ReluStats'), ('relu_grad_stats', 'ReluGradStats')):
    for suffix in _KERNEL_SUFFIXES.values():
      jax.ffi.register_ffi_target(
          f'deepdigits_{name}_{suffix}',
          jax.ffi.pycapsule(getattr(handlers, f'Deepdigits{symbol}{suffix}')), platform='cpu')
  return None


def _kernel_sums(target: str, x, *operands):
  """The two [groups, 1, ..., 1, features] float32 sums of a stats handler."""
  if problem := kernel_problem():
    raise RuntimeError(f"sums_impl='kernel' is not available: {problem}")
  sums = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)
  first, second = jax.ffi.ffi_call(
      f'deepdigits_{target}_{_KERNEL_SUFFIXES[jnp.dtype(x.dtype)]}', (sums, sums))(
          x, *operands)
  keepdims = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  return first.reshape(keepdims), second.reshape(keepdims)


def relu_sums(x, sums_impl: str = 'native'):
  """The sums of ReLU(x) and of its square per group (axis 0) and feature (the last),
  in float32, keeping x's dimensions."""
  if sums_impl == 'kernel' and jnp.dtype(x.dtype) in _KERNEL_SUFFIXES:
    return _kernel_sums('relu_stats', x)
  values = jnp.maximum(x, 0).astype(jnp.float32)
  axes = tuple(range(1, values.ndim - 1))
  return values.sum(axes, keepdims=True), jnp.square(values).sum(axes, keepdims=True)


def relu_grad_sums(x, g, mean, sums_impl: str = 'native'):
  """The sums of g and of g * (ReLU(x) - mean) per group and feature, in float32, keeping
  x's dimensions (mean: [groups, 1, ..., 1, features], float32)."""
  if sums_impl == 'kernel':
    common = jnp.promote_types(x.dtype, g.dtype)
    if common in _KERNEL_SUFFIXES:
      return _kernel_sums('relu_grad_stats', x.astype(common), g.astype(common),
                          mean.reshape(x.shape[0], x.shape[-1]))
  g = g.astype(jnp.float32)
  centred = jnp.maximum(x, 0).astype(jnp.float32) - mean
  axes = tuple(range(1, x.ndim - 1))
  return g.sum(axes, keepdims=True), (g * centred).sum(axes, keepdims=True)


def _normalise(x, scale, bias, epsilon, sums_impl):
  """(the output in float32, the mean and variance of ReLU(x) per group and feature,
  1 / sqrt(variance + epsilon))."""
  count = math.prod(x.shape[1:-1])
  total, total_of_squares = relu_sums(x, sums_impl)
  mean = total / count
  var = jnp.maximum(0.0, total_of_squares / count - jnp.square(mean))
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (jnp.maximum(x, 0).astype(jnp.float32) - mean) * (rstd * scale) + bias
  return y, mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _relu_batch_norm(x, scale, bias, epsilon, dtype, sums_impl):
  y, mean, var, _ = _normalise(x, scale, bias, epsilon, sums_impl)
  return y.astype(dtype), mean, var


def _relu_batch_norm_fwd(x, scale, bias, epsilon, dtype, sums_impl):
  y, mean, var, rstd = _normalise(x, scale, bias, epsilon, sums_impl)
  return (y.astype(dtype), mean, var), (x, mean, var, rstd, scale)


def _relu_batch_norm_bwd(epsilon, dtype, sums_impl, residuals, cotangents):
  del epsilon, dtype
  x, mean, var, rstd, scale = residuals
  g = cotangents[0]  # the statistics' cotangents are zero (below)
  group_count = math.prod(x.shape[1:-1])
  # Two reductions over the activations serve the input's gradient (per group) and the
  # scale's and bias's (their sums over the groups).
  g_sum, g_centred_sum = relu_grad_sums(x, g, mean, sums_impl)
  g_x_hat_sum = g_centred_sum * rstd
  # Where the variance was clipped at 0 it passes no gradient back.
  g_x_hat_mean = jnp.where(var > 0, g_x_hat_sum / group_count, 0.0)
  x_hat = (jnp.maximum(x, 0).astype(jnp.float32) - mean) * rstd
  g_values = (rstd * scale) * (g.astype(jnp.float32) - g_sum / group_count
                               - x_hat * g_x_hat_mean)
  g_x = jnp.where(x > 0, g_values, 0.0).astype(x.dtype)
  feature_shape = scale.shape
  return (g_x, g_x_hat_sum.sum(0).reshape(feature_shape),
          g_sum.sum(0).reshape(feature_shape))


_relu_batch_norm.defvjp(_relu_batch_norm_fwd, _relu_batch_norm_bwd)


def relu_batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, group_size: int,
                    epsilon: float, dtype, sums_impl: str = 'native'
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm of ReLU(x) with the statistics of its batch: (the output in `dtype`, the
  mean and variance of each group of `group_size` consecutive examples, shape [groups,
  features]). The statistics feed only the running averages and carry no gradient.
  `sums_impl`: 'native' (XLA's reductions) or 'kernel' (batch_norm_stats.cc; CPU only)."""
  groups = x.reshape((-1, group_size) + x.shape[1:])
  y, mean, var = _relu_batch_norm(groups, scale, bias, epsilon, dtype, sums_impl)
  features = x.shape[-1]
  return (y.reshape(x.shape), jax.lax.stop_gradient(mean.reshape(-1, features)),
          jax.lax.stop_gradient(var.reshape(-1, features)))


def relu_batch_norm_inference(x: jax.Array, scale: jax.Array, bias: jax.Array,
                              mean: jax.Array, var: jax.Array, *, epsilon: float,
                              dtype) -> jax.Array:
  """BatchNorm of ReLU(x) with given (running) statistics, Flax's formula."""
  values = jnp.maximum(x, 0).astype(jnp.float32)
  return ((values - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)
