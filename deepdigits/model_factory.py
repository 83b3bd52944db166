"""The network for a config: its dtype and, per backend and pass, which implementation of
the convolution and pooling ops computes it. Everything that builds the model (trainer,
evaluation, commands) builds it here, so none of them imports the trainer to do so."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepdigits.data import IMAGE_SHAPE
from deepdigits.model import CONV_IMPLS, CONV_LAYERS, DeepDigitsCNN
from deepdigits.ops import batch_norm, onednn_conv

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def onednn_problem(dtype: str) -> Optional[str]:
  """Why oneDNN's convolutions cannot run in this process with this dtype, or None."""
  if jax.default_backend() != 'cpu':
    return f"runs on the CPU only, not {jax.default_backend()}: use conv_impl='auto' or 'native'"
  if jax.local_device_count() > 1:
    return (f'needs one CPU device per process, not {jax.local_device_count()} (oneDNN '
            "called from several XLA devices at once deadlocks): use conv_impl='auto' or "
            "'shifted_matmul'")
  if not onednn_conv.is_available():
    return f"is not available: {onednn_conv.unavailable_reason()}. Or use conv_impl='auto'"
  if dtype == 'bfloat16' and (problem := onednn_conv.bf16_problem()):
    return (f"computes bfloat16 only where the CPU has bf16 instructions, and {problem}: "
            "use dtype='float32', or conv_impl='auto'")
  return None


def available_conv_impls() -> tuple[str, ...]:
  """The convolution implementations this installation has (oneDNN's only if built)."""
  return tuple(i for i in CONV_IMPLS if i != 'onednn' or onednn_conv.is_available())


def config_conv_impls(conv_impl: str) -> tuple[str, ...]:
  """The names in `config.conv_impl`: 'auto', one implementation for every convolution,
  or one per convolution separated by commas ('onednn,onednn,winograd,winograd')."""
  names = tuple(name.strip() for name in conv_impl.split(','))
  return names if len(names) > 1 else names * len(CONV_LAYERS)


def conv_impl_problem(conv_impl: str) -> Optional[str]:
  """Why `config.conv_impl` names no implementation for each convolution, or None."""
  names = config_conv_impls(conv_impl)
  if len(names) != len(CONV_LAYERS):
    return (f'names {len(names)} implementations: give one for every convolution, or one '
            f'for each of the {len(CONV_LAYERS)} ({", ".join(n for n, _, _ in CONV_LAYERS)})')
  if unknown := [n for n in names if n not in CONV_IMPLS + ('auto',)]:
    return f'names {unknown[0]!r}: use one of {CONV_IMPLS + ("auto",)}'
  return None


def resolve_impl(impl: str, cpu_choice, differentiated: bool):
  """'auto' is XLA's own op, except in the differentiated (training) pass on CPU, where
  XLA's convolution and pooling gradients are slow and `cpu_choice` is the same function
  computed faster. Forward-only passes (evaluation) are fastest native on CPU too."""
  if impl != 'auto':
    return impl
  return cpu_choice if differentiated and jax.default_backend() == 'cpu' else 'native'


def cpu_conv_choice(dtype: str, in_features: int) -> str:
  """The fastest differentiated convolution on CPU for a layer with this many input
  features (docs/speed.md, `python -m deepdigits.tools.conv_benchmark`): in float32,
  Winograd's tiles from 64 input features up (conv3 and conv4), or from 128 (conv4) where
  oneDNN has AVX-512 kernels, below that oneDNN's direct convolutions (or, where they do
  not run, the shifted-view matmuls for one input feature and Winograd for more); in
  bfloat16, oneDNN's where the CPU has bf16 instructions, else the shifted-view matmuls."""
  onednn = onednn_problem(dtype) is None
  if dtype != 'float32':
    return 'onednn' if onednn else 'shifted_matmul'
  if in_features >= (128 if onednn and onednn_conv.has_avx512_kernels() else 64):
    return 'winograd'
  if onednn:
    return 'onednn'
  return 'shifted_matmul' if in_features == 1 else 'winograd'


def dense_impl(dtype: str, differentiated: bool) -> str:
  """oneDNN's bf16 matmuls for the dense layers in a bfloat16 train step on a CPU where
  oneDNN's bf16 kernels run (where its convolutions do); XLA's dot elsewhere."""
  if (dtype == 'bfloat16' and differentiated and jax.default_backend() == 'cpu'
      and onednn_problem(dtype) is None):
    return 'onednn'
  return 'native'


def bn_impl(differentiated: bool) -> str:
  """ReLU-BatchNorm's C++ handlers in a train step on one CPU device, where they are
  built; jax.numpy elsewhere (on several devices XLA would gather a sharded
  batch onto each device for a call it cannot split)."""
  if (differentiated and jax.default_backend() == 'cpu' and jax.local_device_count() == 1
      and batch_norm.kernel_problem() is None):
    return 'kernel'
  return 'native'


def make_model(config, differentiated: bool = True) -> DeepDigitsCNN:
  """The network for the train step (differentiated) or for evaluation; both compute the
  same function with the same parameters."""
  conv_impl = tuple(
      resolve_impl(impl, cpu_conv_choice(config.dtype, in_features), differentiated)
      for impl, (_, in_features, _) in zip(config_conv_impls(config.conv_impl), CONV_LAYERS))
  return DeepDigitsCNN(
      dtype=DTYPES[config.dtype],
      conv_impl=conv_impl[0] if len(set(conv_impl)) == 1 else conv_impl,
      dense_impl=dense_impl(config.dtype, differentiated),
      pool_impl=resolve_impl(config.pool_impl, 'strided_views', differentiated),
      bn_group_size=config.bn_group_size,
      bn_impl=bn_impl(differentiated))


def model_summary(model: nn.Module) -> str:
  """Flax's layer table: shapes and parameter counts per layer, 2,624,394 in all."""
  return nn.tabulate(model, jax.random.PRNGKey(0), depth=1,
                     console_kwargs={'width': 110, 'force_terminal': False})(
                         jnp.zeros((1,) + IMAGE_SHAPE), train=False)
