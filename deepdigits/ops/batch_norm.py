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
"""

import functools
import math

import jax
import jax.numpy as jnp


def _normalise(x, scale, bias, epsilon):
  """(the output in float32, the mean and variance of ReLU(x) per group and feature,
  1 / sqrt(variance + epsilon))."""
  values = jnp.maximum(x, 0).astype(jnp.float32)
  axes = tuple(range(1, values.ndim - 1))
  mean = values.mean(axes, keepdims=True)
  var = jnp.maximum(0.0, jnp.square(values).mean(axes, keepdims=True) - jnp.square(mean))
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (values - mean) * (rstd * scale) + bias
  return y, mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _relu_batch_norm(x, scale, bias, epsilon, dtype):
  y, mean, var, _ = _normalise(x, scale, bias, epsilon)
  return y.astype(dtype), mean, var


def _relu_batch_norm_fwd(x, scale, bias, epsilon, dtype):
  y, mean, var, rstd = _normalise(x, scale, bias, epsilon)
  return (y.astype(dtype), mean, var), (x, mean, var, rstd, scale)


def _relu_batch_norm_bwd(epsilon, dtype, residuals, cotangents):
  del epsilon, dtype
  x, mean, var, rstd, scale = residuals
  g = cotangents[0].astype(jnp.float32)  # the statistics' cotangents are zero (below)
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
  feature_shape = scale.shape
  return (g_x, g_x_hat_sum.sum(0).reshape(feature_shape),
          g_sum.sum(0).reshape(feature_shape))


_relu_batch_norm.defvjp(_relu_batch_norm_fwd, _relu_batch_norm_bwd)


def relu_batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, group_size: int,
                    epsilon: float, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm of ReLU(x) with the statistics of its batch: (the output in `dtype`, the
  mean and variance of each group of `group_size` consecutive examples, shape [groups,
  features]). The statistics feed only the running averages and carry no gradient."""
  groups = x.reshape((-1, group_size) + x.shape[1:])
  y, mean, var = _relu_batch_norm(groups, scale, bias, epsilon, dtype)
  features = x.shape[-1]
  return (y.reshape(x.shape), jax.lax.stop_gradient(mean.reshape(-1, features)),
          jax.lax.stop_gradient(var.reshape(-1, features)))


def relu_batch_norm_inference(x: jax.Array, scale: jax.Array, bias: jax.Array,
                              mean: jax.Array, var: jax.Array, *, epsilon: float,
                              dtype) -> jax.Array:
  """BatchNorm of ReLU(x) with given (running) statistics, Flax's formula."""
  values = jnp.maximum(x, 0).astype(jnp.float32)
  return ((values - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)
