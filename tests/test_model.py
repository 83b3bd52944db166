"""The network is the original's: size, outputs, dropout, L2, convolution algorithms."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_bn_kernel, require_onednn, tiny_config
from deepdigits import sharding, train_state
from deepdigits import train as trainer
from deepdigits.model import (
  CONV_LAYERS,
  L2_REGULARIZED_KERNELS,
  DeepDigitsCNN,
  Dense,
  ReluBatchNorm,
  l2_penalty,
)
from deepdigits.ops import batch_norm, onednn_conv
from deepdigits.ops.conv import conv3x3_shifted_matmul
from deepdigits.ops.dropout import keep_mask
from deepdigits.ops.pool import max_pool_2x2_strided
from deepdigits.ops.winograd import conv3x3_winograd
from deepdigits.tools.conv_benchmark import conv_layers


@pytest.fixture(scope='module')
def variables():
  # Jitted: one compile instead of one per initialiser call.
  return jax.jit(lambda key: DeepDigitsCNN().init(key, jnp.zeros((1, 28, 28, 1)),
                                                   train=False))(jax.random.PRNGKey(0))


def test_parameter_and_batch_stats_count_is_the_originals(variables):
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(variables['params']) + count(variables['batch_stats']) == 2_624_394
  # BatchNorm: scale, bias, mean, variance over 32+64+128+256+512+256 channels.
  bn = sum(count(variables['params'][f'bn{i}']) for i in range(1, 7))
  assert bn + count(variables['batch_stats']) == 4_992
  assert variables['params']['conv4']['kernel'].shape == (3, 3, 128, 256)
  assert variables['params']['dense1']['kernel'].shape == (4096, 512)


# Jitted, as the trainer and the evaluator run the network: one compile each, where
# calling it eagerly compiles and dispatches every operation of it on its own.
evaluation_logits = jax.jit(functools.partial(DeepDigitsCNN().apply, train=False))
training_logits = jax.jit(lambda variables, x, key: DeepDigitsCNN().apply(
    variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})[0])


def test_output_shape_and_dtype(variables):
  logits = evaluation_logits(variables, jnp.ones((4, 28, 28, 1)))
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32


def test_eval_is_deterministic_and_dropout_follows_the_rng(variables):
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  np.testing.assert_array_equal(evaluation_logits(variables, x), evaluation_logits(variables, x))
  run = lambda seed: training_logits(variables, x, jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(run(0), run(0))
  assert np.abs(run(0) - run(1)).max() > 1e-3


def test_l2_penalty_is_keras_l2_on_exactly_three_kernels(variables):
  params = variables['params']
  expected = sum(0.001 * np.sum(np.square(np.asarray(params[name]['kernel'], np.float64)))
                 for name in ('conv4', 'dense1', 'dense2'))
  assert L2_REGULARIZED_KERNELS == ('conv4', 'dense1', 'dense2')
  np.testing.assert_allclose(l2_penalty(params, 0.001), expected, rtol=1e-5)
  # Kernels outside the three do not count.
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed['conv1'] = {**params['conv1'], 'kernel': params['conv1']['kernel'] * 10}
  changed['logits'] = {**params['logits'], 'kernel': params['logits']['kernel'] * 10}
  np.testing.assert_allclose(l2_penalty(changed, 0.001), expected, rtol=1e-5)


@pytest.mark.parametrize('cin,cout,size', [(1, 32, 28), (32, 64, 26), (128, 256, 10)])
def test_shifted_matmul_conv_equals_lax_conv(cin, cout, size):
  kx, kk = jax.random.split(jax.random.PRNGKey(cin))
  x = jax.random.normal(kx, (3, size, size, cin))
  kernel = jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)
  native = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(conv3x3_shifted_matmul(x, kernel), native(x, kernel),
                             rtol=1e-4, atol=1e-4)


def _conv_outputs_and_gradients(conv, *operands_and_cotangent):
  *operands, cotangent = operands_and_cotangent
  y, vjp = jax.vjp(conv, *operands)
  return y, vjp(cotangent.astype(y.dtype))


def _native_conv(x, kernel, bias):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias


def _conv_operands(cin, cout, size):
  kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(cin), 4)
  return (jax.random.normal(kx, (3, size, size, cin)),
          jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin),
          jax.random.normal(kb, (cout,)),
          jax.random.normal(kg, (3, size - 2, size - 2, cout)))


@pytest.mark.parametrize('cin,cout,size', [(1, 32, 28), (32, 64, 26), (128, 256, 10)])
def test_onednn_conv_gives_lax_convs_outputs_and_gradients(cin, cout, size):
  require_onednn()
  x, kernel, bias, cotangent = _conv_operands(cin, cout, size)
  y_native, grads_native = _conv_outputs_and_gradients(_native_conv, x, kernel, bias,
                                                       cotangent)
  y, grads = _conv_outputs_and_gradients(jax.jit(onednn_conv.conv3x3), x, kernel, bias,
                                         cotangent)
  np.testing.assert_allclose(y, y_native, rtol=1e-4, atol=1e-4)
  for g_onednn, g_native in zip(grads, grads_native):  # input, kernel, bias
    scale = float(jnp.abs(g_native).max())
    np.testing.assert_allclose(g_onednn / scale, g_native / scale, atol=1e-5)
  assert 'avx' in onednn_conv.implementations(3, size, size, cin, cout)  # not a ref kernel


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_onednn_calls_at_once_give_each_calls_results_alone_bitwise(dtype):
  """The handlers cut each call's batch (7 images: chunks of unequal size) into chunks
  that XLA's threads share, and XLA runs independent calls at once: whichever thread
  takes which chunk, the results, kernel gradients summed over chunks included, are those
  of each call run alone."""
  require_onednn_bf16() if dtype == 'bfloat16' else require_onednn()
  conv = lambda x, kernel, bias: onednn_conv.conv3x3(x.astype(dtype), kernel, bias)
  operand_sets = []
  for seed in range(3):
    kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    operand_sets.append((jax.random.normal(kx, (7, 12, 12, 64)),
                         jax.random.normal(kk, (3, 3, 64, 128)) / 24,
                         jax.random.normal(kb, (128,)),
                         jax.random.normal(kg, (7, 10, 10, 128))))
  alone = [jax.jit(functools.partial(_conv_outputs_and_gradients, conv))(*operands)
           for operands in operand_sets]
  together = jax.jit(lambda sets: [_conv_outputs_and_gradients(conv, *operands)
                                   for operands in sets])
  for _ in range(3):
    for got, want in zip(jax.tree.leaves(together(operand_sets)), jax.tree.leaves(alone)):
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_conv_layers_lists_the_networks_convolutions_for_per_layer_impls():
  traced = [(layer.name, layer.input_shape[-1], layer.features)
            for layer in conv_layers(tiny_config(''))]
  assert traced == list(CONV_LAYERS)
  with pytest.raises(ValueError, match='conv_impl needs one name or 4'):
    DeepDigitsCNN(conv_impl=('native', 'winograd')).init(
        jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)


# The network's layers, then odd output sizes (computed one larger and cut back) and the
# smallest input.
@pytest.mark.parametrize('cin,cout,height,width', [
    (1, 32, 28, 28), (32, 64, 26, 26), (64, 128, 12, 12), (128, 256, 10, 10),
    (3, 5, 9, 12), (4, 6, 11, 7), (2, 2, 3, 3)])
def test_winograd_conv_gives_lax_convs_outputs_and_gradients(cin, cout, height, width):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(cin), 3)
  x = jax.random.normal(kx, (3, height, width, cin))
  kernel = jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)
  cotangent = jax.random.normal(kg, (3, height - 2, width - 2, cout))
  native = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  y_native, grads_native = _conv_outputs_and_gradients(native, x, kernel, cotangent)
  y, grads = _conv_outputs_and_gradients(jax.jit(conv3x3_winograd), x, kernel, cotangent)
  # Measured: at most 1.3e-6 of the largest value, in outputs and both gradients (float32
  # rounding; a wrong sign in any one transform is off by 1 or more).
  for got, want in zip((y,) + grads, (y_native,) + grads_native):
    assert got.shape == want.shape
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)


def require_onednn_bf16() -> None:
  """Skips a test of oneDNN's bf16 convolutions on a CPU without bf16 instructions."""
  require_onednn()
  if problem := onednn_conv.bf16_problem():
    pytest.skip(f'no bf16 convolutions here: {problem}')


# bfloat16 keeps 8 significant bits (a relative rounding of up to 2**-8 = 0.4%) of each
# input, kernel and output value; oneDNN accumulates in float32. Measured: at most 0.5%
# of the largest value, in outputs and in every gradient.
BF16_TOLERANCE = 1e-2


@pytest.mark.parametrize('cin,cout,size', [(1, 32, 28), (32, 64, 26), (128, 256, 10)])
def test_onednn_bf16_conv_is_float32s_within_bf16_rounding_with_float32_kernel_gradients(
    cin, cout, size):
  require_onednn_bf16()
  x, kernel, bias, cotangent = _conv_operands(cin, cout, size)
  y_native, grads_native = _conv_outputs_and_gradients(_native_conv, x, kernel, bias,
                                                       cotangent)
  y, grads = _conv_outputs_and_gradients(jax.jit(onednn_conv.conv3x3),
                                         x.astype(jnp.bfloat16), kernel, bias, cotangent)
  assert y.dtype == jnp.bfloat16
  # The input's gradient in bfloat16 as the input; kernel and bias gradients in float32.
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
  for got, want in zip((y,) + grads, (y_native,) + grads_native):
    error = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
    assert 1e-4 < error < BF16_TOLERANCE, error  # rounded as bfloat16 is, and no more
  kernels = onednn_conv.implementations(3, size, size, cin, cout, dtype='bfloat16')
  assert kernels.count('bf16') + kernels.count('amx') >= 3, kernels  # native bf16 kernels


@pytest.mark.parametrize('kernels,supported', [
    ('fwd brgconv:avx512_core_bf16, bwd_data brg_fwd:avx512_core_bf16+brgconv:avx512_core_'
     'bf16, bwd_weights jit_bf16:avx512_core_bf16', True),
    ('fwd brgconv:avx512_core_amx, bwd_data brgconv_bwd_d:avx512_core_amx, bwd_weights '
     'brgconv_bwd_w:avx512_core_amx', True),
    # oneDNN's bf16 emulation on AVX-512 without the bf16 instructions: slower than float32
    ('fwd brgconv:avx512_core, bwd_data brg_fwd:avx512_core+brgconv:avx512_core, '
     'bwd_weights jit_bf16:avx512_core_bf16', False),
    ('unsupported: could not create a primitive descriptor', False)])
def test_bf16_convs_are_offered_only_where_onednn_runs_native_bf16_kernels(
    monkeypatch, kernels, supported):
  monkeypatch.setattr(onednn_conv, 'is_available', lambda: True)
  monkeypatch.setattr(onednn_conv, 'implementations', lambda *a, **k: kernels)
  onednn_conv.bf16_problem.cache_clear()
  try:
    problem = onednn_conv.bf16_problem()
  finally:
    onednn_conv.bf16_problem.cache_clear()
  if supported:
    assert problem is None
  else:
    assert problem == f'this CPU has no AVX512-BF16 or AMX instructions (oneDNN: {kernels})'


def test_strided_max_pool_equals_nn_max_pool_with_ties():
  # Few distinct values, so many windows hold ties: the gradient must go to the same
  # (first) maximum as XLA's select-and-scatter picks.
  x = jax.random.randint(jax.random.PRNGKey(0), (4, 8, 8, 3), 0, 3).astype(jnp.float32)
  g = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4, 3))
  native = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  np.testing.assert_array_equal(max_pool_2x2_strided(x), native(x))
  grad = lambda f: jax.vjp(f, x)[1](g)[0]
  np.testing.assert_array_equal(grad(max_pool_2x2_strided), grad(native))
  assert np.count_nonzero(grad(native)) == g.size  # one winner per window


def test_conv_impls_give_the_same_network_outputs_and_gradients(variables):
  x = jax.random.uniform(jax.random.PRNGKey(2), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10

  def loss_and_grads(conv_impl, pool_impl):
    model = DeepDigitsCNN(conv_impl=conv_impl, pool_impl=pool_impl)
    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              x, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.PRNGKey(0)})
      return jax.nn.log_softmax(logits)[jnp.arange(8), labels].mean()
    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  (loss_native, grads_native) = loss_and_grads('native', 'native')
  # Each implementation in two layers or more (each one's own test holds it to lax's
  # convolution on these layers' shapes): two programs of the whole network to compile,
  # rather than one for each implementation and for each mix.
  onednn = ('onednn' if onednn_conv.is_available() or os.environ.get('DEEPDIGITS_REQUIRE_ONEDNN')
            else 'native')
  others = [('shifted_matmul', 'winograd', onednn, 'winograd'),
            ('winograd', onednn, 'shifted_matmul', onednn)]
  for conv_impl in others:
    (loss_other, grads_other) = loss_and_grads(conv_impl, 'strided_views')
    np.testing.assert_allclose(loss_native, loss_other, rtol=1e-5)
    for g_native, g_other in zip(jax.tree.leaves(grads_native), jax.tree.leaves(grads_other)):
      scale = np.abs(g_native).max() + 1e-12
      np.testing.assert_allclose(g_other / scale, g_native / scale, atol=1e-4)


def test_onednn_dense_is_nn_dense_in_bfloat16_with_float32_gradients():
  """oneDNN's bf16 matmuls compute the dense layer XLA computes from the same bfloat16
  inputs (float32 accumulation, float32 results), and its gradients within bfloat16's
  rounding."""
  require_onednn_bf16()
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (64, 4096)).astype(jnp.bfloat16)
  weights = jax.random.normal(keys[1], (64, 512))
  params = Dense(512).init(keys[2], x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a bias that is not 0

  def forward_and_grads(impl):
    layer = Dense(512, dtype=jnp.bfloat16, impl=impl)
    loss = lambda params, x: jnp.sum(layer.apply(params, x) * weights)
    y = jax.jit(layer.apply)(params, x)
    return y, jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  (y, (g_params, g_x)), (y_ref, (g_params_ref, g_x_ref)) = (
      forward_and_grads('onednn'), forward_and_grads('native'))
  assert y.dtype == jnp.float32 and g_x.dtype == jnp.bfloat16
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
  for got, want in [(g_x, g_x_ref)] + list(zip(jax.tree.leaves(g_params),
                                               jax.tree.leaves(g_params_ref))):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # One bfloat16 step (2**-7 of a value) at the largest: the input gradient is bfloat16,
    # and the output gradient in both is rounded to bfloat16 here only.
    np.testing.assert_allclose(got, want, atol=2 ** -7 * np.abs(want).max())
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_params))


@pytest.mark.parametrize('conv_impl', ['native', 'onednn'])
def test_bfloat16_compute_gives_a_loss_and_gradients_close_to_float32(
    variables, mnist, conv_impl):
  if conv_impl == 'onednn':
    require_onednn_bf16()
  images = jnp.asarray(mnist['test'].images[:64], jnp.float32) / 255
  labels = jnp.asarray(mnist['test'].labels[:64])

  def loss_and_grads(dtype):
    # Dropout off: with it, each key's masks make another function, and one batch's
    # gradients in the two dtypes agreed from 0.88 to 0.98 (the worst layer's cosine) over
    # four keys.
    model = DeepDigitsCNN(dtype=dtype, conv_impl=conv_impl, use_dropout=False)
    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              images, train=True, mutable=['batch_stats'])
      assert logits.dtype == jnp.float32  # logits come back in float32 either way
      return -jax.nn.log_softmax(logits)[jnp.arange(64), labels].mean()
    # Gradients only where they are held to float32's (below); the loss alone compiles
    # in a fraction of the time.
    with_grads = (jax.value_and_grad(loss) if conv_impl == 'onednn'
                  else lambda params: (loss(params), {}))
    return jax.jit(with_grads)(variables['params'])

  (fp32, grads32), (bf16, grads16) = loss_and_grads(jnp.float32), loss_and_grads(jnp.bfloat16)
  assert bf16 != fp32  # the bfloat16 path really computed in bfloat16
  assert abs(bf16 - fp32) < 0.02 * fp32, (fp32, bf16)
  # With oneDNN's convolutions (float32 accumulation, float32 kernel and bias gradients)
  # every gradient is float32 and each layer's points where float32's does: cosine
  # similarity 0.975 measured for bn2's bias, 0.98 and over for the others. XLA's bfloat16
  # convolutions sum the bias gradients in bfloat16 (conv2's bias: 0.61), so only the
  # loss is held there.
  assert len(jax.tree.leaves(grads32)) == (26 if conv_impl == 'onednn' else 0)
  for path, g32 in jax.tree_util.tree_leaves_with_path(grads32):
    g16 = functools.reduce(lambda tree, key: tree[key.key], path, grads16)
    assert g16.dtype == jnp.float32, path
    cosine = float(jnp.vdot(g16, g32) / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
    assert cosine > 0.97, (jax.tree_util.keystr(path), cosine)
  # Parameters stay float32 whatever the compute dtype.
  params = jax.eval_shape(lambda: DeepDigitsCNN(dtype=jnp.bfloat16).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))['params']
  assert len(jax.tree.leaves(params)) == 26
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def _batch_norm_variables(features, rng):
  """nn.BatchNorm's variables with random scale, bias and running statistics."""
  keys = jax.random.split(rng, 4)
  return {'params': {'scale': 1 + jax.random.normal(keys[0], (features,)),
                     'bias': jax.random.normal(keys[1], (features,))},
          'batch_stats': {'mean': jax.random.normal(keys[2], (features,)),
                          'var': jax.random.uniform(keys[3], (features,), minval=0.5)}}


def _relu_then_flax_batch_norm(variables, x, group_size, use_running_average=False):
  """nn.relu then nn.BatchNorm on each group of group_size examples: (outputs, the
  running statistics' updates, the mean over groups as Keras reads per-replica ones)."""
  flax_bn = nn.BatchNorm(use_running_average=use_running_average, epsilon=1e-3)
  if use_running_average:
    return flax_bn.apply(variables, nn.relu(x)), None
  per_group = [flax_bn.apply(variables, nn.relu(x[i:i + group_size]), mutable=['batch_stats'])
               for i in range(0, x.shape[0], group_size)]
  stats = {stat: jnp.mean(jnp.stack([new['batch_stats'][stat] for _, new in per_group]), 0)
           for stat in ('mean', 'var')}
  return jnp.concatenate([out for out, _ in per_group]), stats


@pytest.mark.parametrize('shape', [(12, 5, 5, 3), (12, 7)])
@pytest.mark.parametrize('group_size', [0, 4])
def test_relu_batch_norm_is_relu_then_flax_batch_norm_per_group(shape, group_size):
  x = 1 + 2 * jax.random.normal(jax.random.PRNGKey(0), shape)
  variables = _batch_norm_variables(shape[-1], jax.random.PRNGKey(1))
  layer = ReluBatchNorm(group_size, epsilon=1e-3)
  # Its variables are nn.BatchNorm's, so checkpoints and evaluation carry over.
  assert (jax.tree.structure(layer.init(jax.random.PRNGKey(2), x))
          == jax.tree.structure(nn.BatchNorm(epsilon=1e-3, use_running_average=False).init(
              jax.random.PRNGKey(2), x)))
  y, updates = layer.apply(variables, x, mutable=['batch_stats'])
  expected, stats = _relu_then_flax_batch_norm(variables, x, group_size or shape[0])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  # Running statistics: the mean over groups of each group's update, as Keras reads a
  # per-replica variable.
  for stat in ('mean', 'var'):
    np.testing.assert_allclose(updates['batch_stats'][stat], stats[stat], rtol=1e-5)
  # At evaluation the groups play no part.
  np.testing.assert_allclose(
      ReluBatchNorm(group_size, use_running_average=True, epsilon=1e-3).apply(variables, x),
      _relu_then_flax_batch_norm(variables, x, 0, use_running_average=True)[0],
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='groups of 5'):
    ReluBatchNorm(5).apply(variables, x, mutable=['batch_stats'])


def _relu_batch_norm_and_gradients(impl, x, scale, bias, weights, group_size):
  """The layer's output, statistics, and the input, scale and bias gradients of a weighted
  sum of its output, as `impl` computes them."""
  def loss(x, scale, bias):
    y, mean, var = batch_norm.relu_batch_norm(x, scale, bias, group_size=group_size,
                                              epsilon=1e-3, dtype=x.dtype, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * weights), (y, mean, var)
  grads, outputs = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  return outputs + grads


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape,group_size', [
    ((128, 24, 24, 64), 128),  # bn2 at batch 128: many blocks of rows per chunk
    ((12, 3, 5, 67), 4),       # groups; rows and features that divide by nothing
    ((6, 512), 3), ((2, 1, 1, 3), 1)])
def test_relu_batch_norm_kernel_is_the_jax_numpy_one(dtype, shape, group_size):
  """The C++ handlers' output, statistics and gradients against the jax.numpy forms (the
  same formulas, summed in other orders); one feature is never positive (variance 0)."""
  require_bn_kernel()
  kx, ks, kb, kw = jax.random.split(jax.random.PRNGKey(shape[-1]), 4)
  x = (0.3 + jax.random.normal(kx, shape)).at[..., 1].set(-1.0).astype(dtype)
  scale = 1 + jax.random.normal(ks, shape[-1:])
  bias = jax.random.normal(kb, shape[-1:])
  weights = jax.random.normal(kw, shape)
  got = _relu_batch_norm_and_gradients('kernel', x, scale, bias, weights, group_size)
  want = _relu_batch_norm_and_gradients('native', x, scale, bias, weights, group_size)
  # float32: rounding only. bfloat16: the output and input gradient are rounded to
  # bfloat16, from float32 values that differ by rounding.
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  for name, g, w in zip(('y', 'mean', 'var', 'x grad', 'scale grad', 'bias grad'), got, want):
    assert g.dtype == w.dtype and g.shape == w.shape, name
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    atol = (tolerance if name in ('y', 'x grad') else 1e-5) * np.abs(w).max()
    np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=name)
  assert not np.asarray(got[3][..., 1], np.float32).any()  # ReLU passes nothing back


def test_relu_batch_norm_kernel_passes_non_finite_activations_on_as_jax_numpy_does():
  """NaN and +inf activations make their features' statistics non-finite, so the train
  step refuses the update (ReLU keeps NaN, as jnp.maximum does); -inf is ReLU's 0."""
  require_bn_kernel()
  x = jnp.ones((2, 35, 4)).at[0, 30, 0].set(jnp.nan).at[1, 3, 1].set(jnp.inf).at[
      0, 9, 2].set(-jnp.inf).at[0, 10, 2].set(2.0)
  weights = jnp.ones_like(x)
  got, want = (_relu_batch_norm_and_gradients(impl, x, jnp.ones(4), jnp.zeros(4), weights,
                                              1) for impl in batch_norm.IMPLS)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.isfinite(g), np.isfinite(w))
  assert np.isnan(got[1][0, 0]) and not np.isfinite(got[1][1, 1])
  assert np.isfinite(got[1][0, 2])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('group_size', [0, 4])
@pytest.mark.parametrize('impl', batch_norm.IMPLS)
def test_relu_batch_norm_gradients_are_autodiffs_of_relu_then_flax_batch_norm(
    dtype, group_size, impl):
  """The written-out backward pass against JAX's derivative of nn.relu then nn.BatchNorm,
  for the input, scale and bias; one feature is never positive (its variance is 0)."""
  shape = (12, 5, 5, 8)
  x = (1 + 2 * jax.random.normal(jax.random.PRNGKey(0), shape)).at[..., 3].set(-1.0)
  x = x.astype(dtype)
  variables = _batch_norm_variables(shape[-1], jax.random.PRNGKey(1))
  weights = jax.random.normal(jax.random.PRNGKey(2), shape)

  def loss(forward):
    def of(x, params):
      y = forward({'params': params, 'batch_stats': variables['batch_stats']}, x)
      return jnp.sum(y.astype(jnp.float32) * weights)
    return jax.jit(jax.grad(of, argnums=(0, 1)))(x, variables['params'])

  if impl == 'kernel':
    require_bn_kernel()
  ours = loss(lambda v, x: ReluBatchNorm(group_size, epsilon=1e-3, dtype=dtype,
                                         impl=impl).apply(
      v, x, mutable=['batch_stats'])[0])
  flax_bn = nn.BatchNorm(use_running_average=False, epsilon=1e-3, dtype=dtype)
  groups = group_size or shape[0]
  reference = loss(lambda v, x: jnp.concatenate([
      flax_bn.apply(v, nn.relu(x[i:i + groups]), mutable=['batch_stats'])[0]
      for i in range(0, shape[0], groups)]))
  # float32: rounding only. bfloat16: the input gradient is rounded to bfloat16 either way.
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=tolerance * np.abs(want).max())
  assert not np.asarray(ours[0][..., 3], np.float32).any()  # ReLU passes nothing back


def test_network_with_batch_norm_groups_differs_in_training_only(variables):
  x = jax.random.uniform(jax.random.PRNGKey(3), (8, 28, 28, 1))
  whole, grouped = DeepDigitsCNN(use_dropout=False), DeepDigitsCNN(use_dropout=False,
                                                                    bn_group_size=4)
  grouped_evaluation = jax.jit(functools.partial(grouped.apply, train=False))
  np.testing.assert_array_equal(grouped_evaluation(variables, x), evaluation_logits(variables, x))
  train = lambda model: jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                         mutable=['batch_stats'])[0])(
      variables, x)
  assert not np.allclose(train(grouped), train(whole), atol=1e-3)
  np.testing.assert_allclose(train(DeepDigitsCNN(use_dropout=False, bn_group_size=8)),
                             train(whole), rtol=1e-4, atol=1e-4)


def test_recalibration_moments_are_whole_batch_statistics_for_grouped_models(variables):
  # Re-estimated statistics describe the population, not the training groups.
  from deepdigits.evaluate import batch_moments  # pylint: disable=g-import-not-at-top
  images = jax.random.randint(jax.random.PRNGKey(4), (8, 28, 28, 1), 0, 256).astype(jnp.uint8)
  moments = lambda model: batch_moments(model, variables['params'],
                                        variables['batch_stats'], images)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               moments(DeepDigitsCNN(bn_group_size=2)), moments(DeepDigitsCNN()))


def test_dropout_rates_and_places_are_the_originals(variables):
  """In training, each dropout layer zeroes its rate of the activations it is given
  (0.25 after each pooling, 0.5 after each hidden dense block) and scales the rest by
  1 / (1 - rate); in evaluation none drops anything."""
  x = jax.random.uniform(jax.random.PRNGKey(5), (64, 28, 28, 1))

  def dropouts_seen(train):
    """(rate, input, output) of each dropout layer as the network runs, jitted."""
    rates = []

    def inputs_and_outputs(variables, x):
      seen = []
      def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and context.method_name == '__call__':
          rates.append(context.module.rate)
          seen.append((args[0], out))
        return out
      with nn.intercept_methods(record):
        DeepDigitsCNN().apply(variables, x, train=train, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.PRNGKey(6)})
      return seen

    seen = jax.device_get(jax.jit(inputs_and_outputs)(variables, x))
    return [(rate, np.asarray(i), np.asarray(o)) for rate, (i, o) in zip(rates, seen)]

  for train in (True, False):
    seen = dropouts_seen(train)
    assert [(rate, inputs.shape[1:]) for rate, inputs, _ in seen] == [
        (0.25, (12, 12, 64)), (0.25, (4, 4, 256)), (0.5, (512,)), (0.5, (256,))]
    for rate, inputs, outputs in seen:
      live = inputs != 0
      dropped = live & (outputs == 0)
      if not train:
        np.testing.assert_array_equal(outputs, inputs)
        continue
      fraction = dropped.sum() / live.sum()
      # At least 16,384 live activations a layer: 4 standard deviations is under 0.015.
      assert live.sum() >= 16_384 and abs(fraction - rate) < 0.015, (rate, fraction)
      kept = live & ~dropped
      np.testing.assert_allclose(outputs[kept], inputs[kept] / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize('keep_prob', [0.75, 0.5])
def test_dropout_masks_take_one_byte_an_element_where_exact(keep_prob):
  shape = (64, 12, 12, 64)
  key = jax.random.PRNGKey(7)
  mask = np.asarray(keep_mask(key, keep_prob, shape))
  # Byte j of each random word decides the j-th quarter of the last dimension.
  words = np.asarray(jax.random.bits(key, shape[:-1] + (16,), jnp.uint32))
  for j in range(4):
    np.testing.assert_array_equal(mask[..., 16 * j:16 * (j + 1)],
                                  (words >> (8 * j)) % 256 < 256 * keep_prob)
  # Each quarter keeps its share (4 standard deviations of 147,456 draws: under 0.006),
  # and the quarters are not copies of each other.
  for quarter in np.split(mask, 4, axis=-1):
    assert abs(quarter.mean() - keep_prob) < 0.006, quarter.mean()
  assert abs((mask[..., :16] == mask[..., 16:32]).mean()
             - (keep_prob ** 2 + (1 - keep_prob) ** 2)) < 0.006
  np.testing.assert_array_equal(keep_mask(key, keep_prob, shape), mask)
  assert (np.asarray(keep_mask(jax.random.PRNGKey(8), keep_prob, shape)) != mask).any()


def test_dropout_masks_that_bytes_cannot_give_exactly_are_bernoullis():
  key = jax.random.PRNGKey(7)
  for keep_prob, shape in ((0.9, (8, 64)), (0.75, (8, 6))):  # 230.4 of 256; 6 % 4
    np.testing.assert_array_equal(keep_mask(key, keep_prob, shape),
                                  jax.random.bernoulli(key, keep_prob, shape))


def test_kernels_start_glorot_uniform_and_biases_at_zero(variables):
  """Keras' defaults: kernels uniform on +-sqrt(6 / (fan_in + fan_out)), with the 3x3
  window counted in both fans of a convolution; biases 0; BatchNorm scale 1, bias 0."""
  params = variables['params']
  kernels = {name: p['kernel'] for name, p in params.items() if 'kernel' in p}
  assert sorted(kernels) == ['conv1', 'conv2', 'conv3', 'conv4', 'dense1', 'dense2', 'logits']
  for name, kernel in kernels.items():
    kernel = np.asarray(kernel, np.float64)
    window = np.prod(kernel.shape[:-2])
    bound = np.sqrt(6 / (window * kernel.shape[-2] + window * kernel.shape[-1]))
    assert np.abs(kernel).max() <= bound, name
    # Uniform: the extremes come within a few percent of the bound, the spread is
    # bound / sqrt(3) (conv1, the smallest, has 288 entries).
    assert np.abs(kernel).max() > 0.97 * bound, name
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.06, err_msg=name)
    np.testing.assert_array_equal(params[name]['bias'], 0)
  for i in range(1, 7):
    np.testing.assert_array_equal(params[f'bn{i}']['scale'], 1)
    np.testing.assert_array_equal(params[f'bn{i}']['bias'], 0)


@pytest.mark.parametrize('conv_impl', ['native', 'onednn'])
def test_a_bfloat16_train_step_keeps_weights_optimizer_state_and_statistics_float32(conv_impl):
  if conv_impl == 'onednn':
    require_onednn()
  config = tiny_config('', dtype='bfloat16', ema_decay=0.999)
  model = DeepDigitsCNN(dtype=jnp.bfloat16, conv_impl=conv_impl, pool_impl='strided_views')
  state = train_state.create_train_state(config, model, sharding.make_mesh())
  step = functools.partial(trainer.train_step, model, trainer.StepOptions.from_config(config))
  new_state, _ = jax.eval_shape(step, state, jnp.zeros((64, 28, 28, 1), jnp.uint8),
                                jnp.zeros(64, jnp.int32))
  for part in ('params', 'opt_state', 'batch_stats', 'ema'):
    floats = [x.dtype for x in jax.tree.leaves(getattr(new_state, part))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}, (part, set(floats))
