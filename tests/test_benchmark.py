"""The benchmarks time the trainer's steps and its convolutions, and print every figure
they promise."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import require_onednn, tiny_config
from deepdigits import model_factory
from deepdigits.model import CONV_IMPLS, Conv3x3
from deepdigits.tools import benchmark, conv_benchmark


def test_benchmark_runs_on_a_tiny_config_and_prints_its_fields(capsys, tiny_mnist_dir):
  # An epoch of 8 steps of 64: the tiny runs' program, compiled once for all.
  config = tiny_config(tiny_mnist_dir)
  result = benchmark.run_benchmark(config, steps=8, windows=2, eval_batches=2)
  out = capsys.readouterr().out
  assert result['devices'] == jax.device_count() and result['batch_size'] == 64
  for key in ('train_images_per_second', 'eval_images_per_second', 'train_ms_per_step',
              'input_ms_per_step', 'train_compile_seconds', 'peak_host_memory_gib'):
    assert result[key] > 0, key
  # The trainer's step really ran in each window (the warm-up one and 2 timed ones of
  # 8 steps), and each eval window scored its 2 batches of 64.
  assert result['train_steps_run'] == 8 * (1 + 2)
  assert result['eval_examples_per_window'] == 128
  assert result['host_page_faults_per_step'] >= 0
  for line in ('train step:', 'page faults per train step',
               'input pipeline (device feed) alone:', 'eval step:', 'peak host memory:',
               'dtype float32', f'{jax.device_count()} x cpu',
               'RESULT framework=deepdigits-jax batch=64'):
    assert line in out, line
  # The summary line the peers' figures are compared with carries the returned figures.
  (summary,) = [line for line in out.splitlines() if line.startswith('RESULT ')]
  fields = dict(item.split('=') for item in summary.split()[1:])
  assert float(fields['imgs_per_s']) == round(result['train_images_per_second'], 1)
  assert float(fields['eval_imgs_per_s']) == round(result['eval_images_per_second'], 1)


def test_conv_benchmark_times_each_convolution_of_the_network_in_each_impl(
    capsys, tiny_mnist_dir):
  config = tiny_config(tiny_mnist_dir, batch_size=8)
  result = conv_benchmark.run_conv_benchmark(config, calls=1, windows=1)
  layers = result['layers']
  assert [(r['layer'], r['input_shape'], r['features']) for r in layers] == [
      ('conv1', (8, 28, 28, 1), 32), ('conv2', (8, 26, 26, 32), 64),
      ('conv3', (8, 12, 12, 64), 128), ('conv4', (8, 10, 10, 128), 256)]
  # Forward, kernel gradient and (past the first layer) input gradient: one GEMM each.
  assert layers[0]['flops'] == 2 * (2 * 8 * 26 * 26 * 9 * 1 * 32)
  assert layers[1]['flops'] == 3 * (2 * 8 * 24 * 24 * 9 * 32 * 64)
  for r in layers:
    assert set(r['seconds']) == set(model_factory.available_conv_impls())
    assert min(r['seconds'].values()) > 0
    assert r['seconds'][r['fastest']] == min(r['seconds'].values())
  out = capsys.readouterr().out
  assert 'conv4' in out and 'per-layer best' in out and 'shifted_matmul' in out


def test_conv_benchmark_times_the_same_gradients_in_each_impl():
  require_onednn()
  rng = np.random.default_rng(0)
  for layer in (conv_benchmark.ConvLayer('first', (2, 8, 8, 1), 4, input_gradient=False),
                conv_benchmark.ConvLayer('later', (2, 8, 8, 3), 4, input_gradient=True)):
    x = jnp.asarray(rng.random(layer.input_shape, np.float32))
    cotangent = jnp.asarray(rng.standard_normal((2, 6, 6, 4), np.float32))
    params = Conv3x3(4).init(jax.random.key(1), x)['params']
    values_and_grads = [
        conv_benchmark.layer_gradient_fn(layer, impl, jnp.float32)(params, x, cotangent)
        for impl in CONV_IMPLS]
    values = [float(v) for v, _ in values_and_grads]
    np.testing.assert_allclose(values, values[0], rtol=1e-5)
    grads = [g for _, g in values_and_grads]
    # The forward pass is timed too, not dropped by XLA as the gradients do not need it.
    compiled = conv_benchmark.layer_gradient_fn(layer, 'onednn', jnp.float32).lower(
        params, x, cotangent).compile().as_text()
    assert 'deepdigits_conv_Forward' in compiled
    # The first layer's gradient is the parameters' alone; later ones add the input's.
    assert isinstance(grads[0], tuple) == layer.input_gradient
    for other in grads[1:]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                   grads[0], other)
