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

Both passes run in jax.numpy, or with `impl='kernel'` (CPU, one device) in the handlers of
`relu_batch_norm.cc`, built by `pip install` (setup.py): the same formulas, two passes
over the activations each way in their own type and on all of XLA's threads, where
XLA:CPU writes ReLU(x) in float32 (and in the backward the products) to memory before
each reduction and reads it back.
"""

import ctypes
import functools
import glob
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ('native', 'kernel')
_KERNEL_SUFFIXES = {jnp.dtype(jnp.float32): 'F32', jnp.dtype(jnp.bfloat16): 'BF16'}


@functools.cache
def kernel_problem() -> Optional[str]:
  """Why the C++ handlers cannot run in this process, or None (they are then registered)."""
  built = glob.glob(os.path.join(os.path.dirname(__file__), '_relu_batch_norm*.so'))
  if not built:
    return ('deepdigits/ops/relu_batch_norm.cc was not built: reinstall with '
            "pip install -e '.[dev]' (it needs a C++17 compiler)")
  try:
    handlers = ctypes.CDLL(built[0])
    symbols = {f'deepdigits_relu_batch_norm_{name}_{suffix}':
               getattr(handlers, f'DeepdigitsReluBatchNorm{name}{suffix}')
               for name in ('Forward', 'Backward') for suffix in _KERNEL_SUFFIXES.values()}
  except (OSError, AttributeError) as e:  # AttributeError: a build of older sources
    return (f"cannot load {built[0]}: {e}; rebuild it with pip install -e '.[dev]'")
  for target, symbol in symbols.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform='cpu')
  return None


def _kernel(name: str, results, x, *operands, epsilon: float):
  if problem := kernel_problem():
    raise RuntimeError(f"ReLU-BatchNorm's impl='kernel' is not available: {problem}")
  return jax.ffi.ffi_call(
      f'deepdigits_relu_batch_norm_{name}_{_KERNEL_SUFFIXES[jnp.dtype(x.dtype)]}', results)(
          x, *operands, epsilon=np.float32(epsilon))


def _keepdims(stat, x):
  """A [groups, features] statistic as [groups, 1, ..., 1, features], to broadcast on x."""
  return stat.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def _normalise(x, scale, bias, epsilon):
  """(the output in float32, the mean and variance of ReLU(x) per group and feature)."""
  values = jnp.maximum(x, 0).astype(jnp.float32)
  axes = tuple(range(1, values.ndim - 1))
  mean = values.mean(axes, keepdims=True)
  var = jnp.maximum(0.0, jnp.square(values).mean(axes, keepdims=True) - jnp.square(mean))
  y = (values - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  return y, mean, var


def _uses_kernel(impl, x, dtype) -> bool:
  """The handlers compute in x's type and return the output in it."""
  return impl == 'kernel' and jnp.dtype(x.dtype) == jnp.dtype(dtype) in _KERNEL_SUFFIXES


def _forward(x, scale, bias, epsilon, dtype, impl):
  """(the output in `dtype`, the mean and variance of ReLU(x) per group and feature)."""
  if _uses_kernel(impl, x, dtype):
    stat = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)
    y, mean, var = _kernel('Forward', (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat), x,
                           scale.astype(jnp.float32), bias.astype(jnp.float32),
                           epsilon=epsilon)
    return y, _keepdims(mean, x), _keepdims(var, x)
  y, mean, var = _normalise(x, scale, bias, epsilon)
  return y.astype(dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _relu_batch_norm(x, scale, bias, epsilon, dtype, impl):
  return _forward(x, scale, bias, epsilon, dtype, impl)


def _relu_batch_norm_fwd(x, scale, bias, epsilon, dtype, impl):
  y, mean, var = _forward(x, scale, bias, epsilon, dtype, impl)
  return (y, mean, var), (x, mean, var, scale)


def _relu_batch_norm_bwd(epsilon, dtype, impl, residuals, cotangents):
  x, mean, var, scale = residuals
  g = cotangents[0]  # the statistics' cotangents are zero (below)
  feature_shape = scale.shape
  if _uses_kernel(impl, x, dtype):
    features = jax.ShapeDtypeStruct(feature_shape, jnp.float32)
    g_x, g_scale, g_bias = _kernel(
        'Backward', (jax.ShapeDtypeStruct(x.shape, x.dtype), features, features), x,
        g.astype(x.dtype), mean.reshape(x.shape[0], -1), var.reshape(x.shape[0], -1),
        scale.astype(jnp.float32), epsilon=epsilon)
    return g_x, g_scale, g_bias
  g = g.astype(jnp.float32)
  rstd = jax.lax.rsqrt(var + epsilon)
  x_hat = (jnp.maximum(x, 0).astype(jnp.float32) - mean) * rstd
  group_axes = tuple(range(1, x.ndim - 1))
  group_count = math.prod(x.shape[1:-1])
  # Two reductions over the activations serve the input's gradient (per group) and the
  # scale's and bias's (their sums over the groups).
  g_sum = g.sum(group_axes, keepdims=True)
  g_x_hat_sum = (g * x_hat).sum(group_axes, keepdims=True)
  # Where the variance was clipped at 0 it passes no gradient back.
  g_x_hat_mean = jnp.where(var > 0, g_x_hat_sum / group_count, 0.0)
  g_values = (rstd * scale) * (g - g_sum / group_count - x_hat * g_x_hat_mean)
  g_x = jnp.where(x > 0, g_values, 0.0).astype(x.dtype)
  return (g_x, g_x_hat_sum.sum(0).reshape(feature_shape),
          g_sum.sum(0).reshape(feature_shape))


_relu_batch_norm.defvjp(_relu_batch_norm_fwd, _relu_batch_norm_bwd)


def relu_batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, group_size: int,
                    epsilon: float, dtype, impl: str = 'native'
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm of ReLU(x) with the statistics of its batch: (the output in `dtype`, the
  mean and variance of each group of `group_size` consecutive examples, shape [groups,
  features]). The statistics feed only the running averages and carry no gradient.
  `impl`: 'native' (jax.numpy) or 'kernel' (relu_batch_norm.cc; CPU only)."""
  groups = x.reshape((-1, group_size) + x.shape[1:])
  y, mean, var = _relu_batch_norm(groups, scale, bias, epsilon, dtype, impl)
  features = x.shape[-1]
  return (y.reshape(x.shape), jax.lax.stop_gradient(mean.reshape(-1, features)),
          jax.lax.stop_gradient(var.reshape(-1, features)))


def relu_batch_norm_inference(x: jax.Array, scale: jax.Array, bias: jax.Array,
                              mean: jax.Array, var: jax.Array, *, epsilon: float,
                              dtype) -> jax.Array:
  """BatchNorm of ReLU(x) with given (running) statistics, Flax's formula."""
  values = jnp.maximum(x, 0).astype(jnp.float32)
  return ((values - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)
