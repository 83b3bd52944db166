"""The network for a config: its dtype and, per backend and pass, which implementation of
the convolution and pooling ops computes it. Everything that builds the model (trainer,
evaluation, commands) builds it here, so none of them imports the trainer to do so."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepdigits.data import IMAGE_SHAPE
from deepdigits.model import CONV_IMPLS, DeepDigitsCNN
from deepdigits.ops import onednn_conv

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


def resolve_impl(impl: str, cpu_choice: str, differentiated: bool) -> str:
  """'auto' is XLA's own op, except in the differentiated (training) pass on CPU, where
  XLA's convolution and pooling gradients are slow and `cpu_choice` is the same function
  computed faster. Forward-only passes (evaluation) are fastest native on CPU too."""
  if impl != 'auto':
    return impl
  return cpu_choice if differentiated and jax.default_backend() == 'cpu' else 'native'


def cpu_conv_choice(dtype: str) -> str:
  """oneDNN's convolutions where they run, else the shifted-view matmuls."""
  return 'shifted_matmul' if onednn_problem(dtype) else 'onednn'


def make_model(config, differentiated: bool = True) -> DeepDigitsCNN:
  """The network for the train step (differentiated) or for evaluation; both compute the
  same function with the same parameters."""
  return DeepDigitsCNN(
      dtype=DTYPES[config.dtype],
      conv_impl=resolve_impl(config.conv_impl, cpu_conv_choice(config.dtype), differentiated),
      pool_impl=resolve_impl(config.pool_impl, 'strided_views', differentiated),
      bn_group_size=config.bn_group_size)


def model_summary(model: nn.Module) -> str:
  """Flax's layer table: shapes and parameter counts per layer, 2,624,394 in all."""
  return nn.tabulate(model, jax.random.PRNGKey(0), depth=1,
                     console_kwargs={'width': 110, 'force_terminal': False})(
                         jnp.zeros((1,) + IMAGE_SHAPE), train=False)
