"""The DeepDigits network: the 20 layers of the original Keras Sequential, in Flax linen.

Layer for layer the original (see README): 3x3 VALID convolutions, ReLU, then BatchNorm
with Keras' defaults (momentum 0.99, epsilon 1e-3), max pooling, dropout, three dense
layers. Keras' initialisers (Glorot uniform kernels, zero biases) are kept. The module
returns logits; the softmax belongs to the loss.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepdigits.ops import onednn_conv, onednn_dense
from deepdigits.ops.batch_norm import relu_batch_norm, relu_batch_norm_inference
from deepdigits.ops.conv import conv3x3_shifted_matmul
from deepdigits.ops.dropout import keep_mask
from deepdigits.ops.pool import max_pool_2x2_strided
from deepdigits.ops.winograd import conv3x3_winograd

# Kernels that carry the original's `kernel_regularizer=l2(0.001)`.
L2_REGULARIZED_KERNELS = ('conv4', 'dense1', 'dense2')
CONV_IMPLS = ('native', 'shifted_matmul', 'onednn', 'winograd')
# The convolutions in order: name, input features, output features.
CONV_LAYERS = (('conv1', 1, 32), ('conv2', 32, 64), ('conv3', 64, 128), ('conv4', 128, 256))
POOL_IMPLS = ('native', 'strided_views')


def max_pool_2x2(x: jax.Array, impl: str) -> jax.Array:
  if impl == 'native':
    # window_shape by keyword: jax2onnx's stand-in for nn.max_pool takes only that form.
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')
  if impl == 'strided_views':
    return max_pool_2x2_strided(x)
  raise ValueError(f'pool_impl must be one of {POOL_IMPLS}, got {impl!r}')


def layer_conv_impls(conv_impl) -> dict[str, str]:
  """{convolution name: implementation} (CONV_LAYERS) from one name or one per layer."""
  impls = (conv_impl,) * len(CONV_LAYERS) if isinstance(conv_impl, str) else tuple(conv_impl)
  if len(impls) != len(CONV_LAYERS):
    raise ValueError(f'conv_impl needs one name or {len(CONV_LAYERS)}, got {conv_impl!r}')
  return {name: impl for (name, _, _), impl in zip(CONV_LAYERS, impls)}


def conv_impl_name(conv_impl) -> str:
  """A model's conv_impl as config.conv_impl spells it ('onednn,onednn,winograd,winograd')."""
  return conv_impl if isinstance(conv_impl, str) else ','.join(conv_impl)


class Conv3x3(nn.Module):
  """3x3 VALID convolution with bias; `impl` picks the implementation (deepdigits/ops):
the same function, at different speeds per backend."""
  features: int
  impl: str = 'native'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.xavier_uniform(),
                        (3, 3, in_features, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    if self.impl == 'onednn':  # float32 kernel and bias; float32 gradients of both
      return onednn_conv.conv3x3(x.astype(self.dtype), kernel, bias)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.impl == 'native':
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding='VALID',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    elif self.impl == 'shifted_matmul':
      y = conv3x3_shifted_matmul(x, kernel)
    elif self.impl == 'winograd':
      y = conv3x3_winograd(x, kernel)
    else:
      raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {self.impl!r}')
    return y + bias


class Dense(nn.Module):
  """`nn.Dense` with Keras' Glorot-uniform kernel, float32 parameters, and in bfloat16
  float32 results; `impl='onednn'` (bfloat16 only) computes it with oneDNN's bf16 matmuls
  (`ops/onednn_dense.py`)."""
  features: int
  dtype: Any = jnp.float32
  impl: str = 'native'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.xavier_uniform(),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    if self.impl == 'onednn':
      return onednn_dense.dense_bf16(x, kernel, bias)
    if self.impl != 'native':
      raise ValueError(f"dense_impl must be 'native' or 'onednn', got {self.impl!r}")
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # In bfloat16 the matmul accumulates and returns float32 (and so do its gradients,
    # which XLA:CPU computes much faster than a bfloat16 result).
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=(jnp.float32 if self.dtype != jnp.float32
                                                    else None))
    return y + bias


class ReluBatchNorm(nn.Module):
  """ReLU, then BatchNorm: every BatchNorm of the network follows a ReLU, and the pair is
  computed as one function (`ops/batch_norm.py`) in training.

  The variables are those of `nn.BatchNorm` ('scale', 'bias'; 'mean', 'var'), so
  checkpoints and evaluation do not depend on the grouping. With `group_size`, training
  normalises with the statistics of each group of that many consecutive examples
  ('ghost batches', as Keras' BatchNormalization does per replica under a TPUStrategy)
  and the running averages take the mean over groups; 0 normalises over the whole batch.
  `impl` computes the pair in training: 'native' (jax.numpy) or 'kernel' (the handlers of
  `ops/relu_batch_norm.cc`, CPU only).
  """
  group_size: int = 0
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = 'native'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      return relu_batch_norm_inference(x, scale, bias, ra_mean.value, ra_var.value,
                                       epsilon=self.epsilon, dtype=self.dtype)
    group_size = self.group_size or x.shape[0]
    if x.shape[0] % group_size:
      raise ValueError(f'a batch of {x.shape[0]} does not split into BatchNorm groups '
                       f'of {group_size}')
    y, mean, var = relu_batch_norm(x, scale, bias, group_size=group_size,
                                   epsilon=self.epsilon, dtype=self.dtype,
                                   impl=self.impl)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.mean(0)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var.mean(0)
    return y


class Dropout(nn.Dropout):
  """`nn.Dropout` with its keep masks drawn 8 bits an element where that is exact
  (`ops/dropout.py`): the same distribution for a quarter of the random numbers."""

  @nn.compact
  def __call__(self, inputs, deterministic=None, rng=None):
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = tuple(1 if dim in self.broadcast_dims else size
                  for dim, size in enumerate(inputs.shape))
    mask = jnp.broadcast_to(keep_mask(rng, keep_prob, shape), inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class DeepDigitsCNN(nn.Module):
  """The original DeepDigits CNN (2,624,394 numbers with BatchNorm statistics).

  Attributes:
    num_classes: size of the output layer.
    dtype: computation dtype of activations and matmuls; parameters stay float32.
    conv_impl: 'native' (lax convolution, best on TPU/GPU), 'shifted_matmul' (one GEMM
      over nine shifted views), 'onednn' (oneDNN's convolutions, CPU only; bfloat16
      where the CPU has bf16 instructions) or 'winograd' (F(2x2, 3x3) tiles on XLA's
      matmuls); one name for every convolution, or a tuple of one per CONV_LAYERS.
    pool_impl: 'native' (nn.max_pool) or 'strided_views' (faster gradient on CPU).
    bn_momentum: BatchNorm running-average momentum (Keras default 0.99).
    bn_epsilon: BatchNorm epsilon (Keras default 1e-3).
    bn_group_size: in training, BatchNorm's statistics over groups of this many
      consecutive examples (Keras' per-replica statistics on a TPU); 0: the whole batch.
    use_dropout: False turns every dropout layer off even in training mode, for
      re-estimating BatchNorm statistics without dropout noise.
    dense_impl: 'native' (XLA's dot) or 'onednn' (oneDNN's bf16 matmuls, CPU, bfloat16
      only) for the three dense layers.
    bn_impl: ReLU-BatchNorm in training, 'native' (jax.numpy) or 'kernel'
      (`ops/relu_batch_norm.cc`, CPU only).
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  conv_impl: str | tuple[str, ...] = 'native'
  pool_impl: str = 'native'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_group_size: int = 0
  use_dropout: bool = True
  dense_impl: str = 'native'
  bn_impl: str = 'native'

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Maps float images [N, 28, 28, 1] in [0, 1] to logits [N, num_classes]."""
    batch_norm = lambda name: ReluBatchNorm(
        self.bn_group_size, use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype, impl=self.bn_impl, name=name)
    dropout = lambda rate: Dropout(rate, deterministic=not (train and self.use_dropout))
    impls = layer_conv_impls(self.conv_impl)
    conv = lambda features, name: Conv3x3(
        features, impl=impls[name], dtype=self.dtype, name=name)
    dense = lambda features, name: Dense(features, self.dtype, self.dense_impl, name=name)
    max_pool = lambda x: max_pool_2x2(x, self.pool_impl)

    x = images.astype(self.dtype)
    x = batch_norm('bn1')(conv(32, 'conv1')(x))   # ReLU, BatchNorm: 26x26x32
    x = batch_norm('bn2')(conv(64, 'conv2')(x))   # 24x24x64
    x = dropout(0.25)(max_pool(x))                # 12x12x64
    x = batch_norm('bn3')(conv(128, 'conv3')(x))  # 10x10x128
    x = batch_norm('bn4')(conv(256, 'conv4')(x))  # 8x8x256
    x = dropout(0.25)(max_pool(x))                # 4x4x256
    x = x.reshape((x.shape[0], -1))               # 4096
    x = dropout(0.5)(batch_norm('bn5')(dense(512, 'dense1')(x)))
    x = dropout(0.5)(batch_norm('bn6')(dense(256, 'dense2')(x)))
    logits = dense(self.num_classes, 'logits')(x)
    return logits.astype(jnp.float32)


def l2_penalty(params, weight: float) -> jax.Array:
  """Keras' L2 regulariser: `weight * sum(kernel**2)` for each regularised kernel."""
  return weight * sum(jnp.sum(jnp.square(params[name]['kernel']))
                      for name in L2_REGULARIZED_KERNELS)
