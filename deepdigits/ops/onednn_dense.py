"""Dense layers in bfloat16 through oneDNN's matmuls on XLA:CPU.

On a CPU with AMX or AVX512-BF16, oneDNN multiplies bfloat16 matrices several times faster
than XLA:CPU's float32 matmuls, which is what a bfloat16 dot with float32 results compiles
to there. The handlers are built with the convolutions' (`onednn_conv.cc`, loaded by
`onednn_conv`): one bf16 matmul with float32 accumulation, either operand transposed.
Forward and gradients as Flax's `nn.Dense` computes them with `dtype=bfloat16` and float32
results (`model.DeepDigitsCNN`): inputs and kernel rounded to bfloat16, products summed in
float32; the output gradient is rounded to bfloat16 for the input and kernel gradients, the
bias gradient is summed from it in float32.
"""

import jax
import jax.numpy as jnp

from deepdigits.ops import onednn_conv


def _matmul(a, b, out_dtype, transpose_a=False, transpose_b=False):
  """a @ b (a given as [k, m] where transpose_a, b as [n, k] where transpose_b), from
  bfloat16 operands with float32 accumulation, returned in out_dtype."""
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  if not onednn_conv.is_available():  # loads and registers the handlers
    raise RuntimeError(f'oneDNN matmuls are not available: {onednn_conv.unavailable_reason()}')
  suffix = 'BF16' if jnp.dtype(out_dtype) == jnp.bfloat16 else 'F32'
  return jax.ffi.ffi_call(f'deepdigits_matmul_bf16_to_{suffix}',
                          jax.ShapeDtypeStruct((m, n), out_dtype))(
                              a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@jax.custom_vjp
def dense_bf16(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias in float32 ([batch, in] @ [in, out]), from x, the kernel and the
  bias rounded to bfloat16 as `nn.Dense(dtype=bfloat16)` rounds them; the kernel and bias
  are float32 parameters, and their gradients float32."""
  return _forward(x, kernel.astype(jnp.bfloat16), bias)


def _forward(x, kernel_bf16, bias):
  return _matmul(x.astype(jnp.bfloat16), kernel_bf16, jnp.float32) + bias.astype(jnp.bfloat16)


def _dense_bf16_fwd(x, kernel, bias):
  kernel_bf16 = kernel.astype(jnp.bfloat16)
  return _forward(x, kernel_bf16, bias), (x, kernel_bf16)


def _dense_bf16_bwd(residuals, g):
  x, kernel_bf16 = residuals
  g_bf16 = g.astype(jnp.bfloat16)
  g_x = _matmul(g_bf16, kernel_bf16, jnp.bfloat16, transpose_b=True).astype(x.dtype)
  g_kernel = _matmul(x.astype(jnp.bfloat16), g_bf16, jnp.float32, transpose_a=True)
  return g_x, g_kernel, g.sum(0)


dense_bf16.defvjp(_dense_bf16_fwd, _dense_bf16_bwd)
