"""The benchmark times the trainer's steps and prints every figure it promises."""

from conftest import tiny_config
from deepdigits import benchmark


def test_benchmark_runs_on_a_tiny_config_and_prints_its_fields(capsys, tiny_mnist_dir):
  config = tiny_config(tiny_mnist_dir, batch_size=16, eval_batch_size=16)
  result = benchmark.run_benchmark(config, steps=2, windows=3, eval_batches=2)
  out = capsys.readouterr().out
  assert result['devices'] == 8 and result['batch_size'] == 16
  for key in ('train_images_per_second', 'eval_images_per_second', 'train_ms_per_step',
              'input_ms_per_step', 'train_compile_seconds', 'peak_host_memory_gib'):
    assert result[key] > 0, key
  # ms per step and images/s are medians of the same (odd number of) windows.
  images_per_step = result['train_ms_per_step'] * result['train_images_per_second'] / 1000
  assert abs(images_per_step - 16) < 1e-6
  assert result['host_page_faults_per_step'] >= 0
  for line in ('train step:', 'page faults per train step', 'input pipeline (device feed) alone:', 'eval step:', 'peak host memory:',
               'dtype float32', '8 x cpu', 'RESULT framework=deepdigits-jax batch=16'):
    assert line in out, line
