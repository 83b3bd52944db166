"""Times the trainer's own train and eval steps:
`python -m deepdigits.tools.benchmark --config=...`.

The train step is the one `train_and_evaluate` compiles, fed by the same feed
(`input_pipeline`, `--config.feed=device|host`) in the same loop; the eval
figure is `Evaluator` over whole batches. Each figure is the median of several timed
windows after a warm-up window.
With `--config.data_dir` the real MNIST training images are used, else random bytes
(the speed does not depend on the pixel values).
"""

import functools
import resource
import statistics
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from deepdigits import config_checks, input_pipeline, model_factory, sharding, train, train_state
from deepdigits.cli import loaded_config, run_command
from deepdigits.data import IMAGE_SHAPE, Split, read_idx_split
from deepdigits.evaluate import Evaluator
from deepdigits.model import conv_impl_name, layer_conv_impls
from deepdigits.ops import onednn_conv
from deepdigits.tools.conv_benchmark import conv_layers

FLAGS = flags.FLAGS


def timed_windows(run_window, windows: int, warm_up: bool = True) -> list[float]:
  """Seconds of each of `windows` calls of run_window, after one warm-up call."""
  if warm_up:
    run_window()
  seconds = []
  for _ in range(windows):
    start = time.perf_counter()
    run_window()
    seconds.append(time.perf_counter() - start)
  return seconds


def benchmark_images(config, num_images: int) -> Split:
  if config.data_dir:
    train_split = read_idx_split(config.data_dir, 'train')
    reps = -(-num_images // len(train_split))
    return Split(np.tile(train_split.images, (reps, 1, 1, 1))[:num_images],
                 np.tile(train_split.labels, reps)[:num_images])
  rng = np.random.default_rng(0)
  return Split(rng.integers(0, 256, (num_images,) + IMAGE_SHAPE, dtype=np.uint8),
               rng.integers(0, 10, num_images).astype(np.int32))


def trace_train_steps(folder: str, step_fn, state, feed, order, num_steps: int,
                      steps_per_dispatch: int, mesh):
  """A jax.profiler trace (XSpace and Perfetto) of num_steps train steps (whole
  dispatches: at least num_steps), each dispatch annotated as a 'train' step; returns
  the state after them."""
  first = int(state.step)
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    while int(state.step) < first + num_steps:
      for data_args, _ in train.epoch_dispatches(feed, order, 0, steps_per_dispatch, 0, mesh):
        with jax.profiler.StepTraceAnnotation('train', step_num=int(state.step)):
          state, _ = step_fn(state, *data_args)
        if int(state.step) >= first + num_steps:
          break
    jax.block_until_ready(state)
  print(f'profile of {int(state.step) - first} train steps written to {folder}')
  return state


def run_benchmark(config, steps: int, windows: int, eval_batches: int,
                  profile_dir: str = '') -> dict:
  """Measures and returns the figures (also printed). With `profile_dir`, then traces
  `config.profile_steps` train steps (one window's if 0) there, after the timing."""
  mesh = sharding.make_mesh()
  config_checks.validate(config, mesh)
  model = model_factory.make_model(config)
  state = train_state.create_train_state(config, model, mesh)
  images = benchmark_images(config, max(steps * config.batch_size,
                                        eval_batches * config.eval_batch_size))
  feed = input_pipeline.make_feed(config.feed, mesh,
                                  Split(images.images[:steps * config.batch_size],
                                        images.labels[:steps * config.batch_size]),
                                  config.batch_size)
  order = input_pipeline.run_epoch_order(config, 0, feed.num_examples)

  start = time.perf_counter()
  step_fn = train.compile_train_step(config, model, mesh, state, feed)
  compile_seconds = time.perf_counter() - start

  def train_window():  # the trainer's own loop body over one epoch of `steps` steps
    nonlocal state
    for data_args, _ in train.epoch_dispatches(feed, order, 0, config.steps_per_dispatch,
                                               0, mesh):
      state, metrics = step_fn(state, *data_args)
    jax.block_until_ready(metrics)

  if feed.kind == 'device':  # the per-step data work: the in-jit gather, alone
    gather = jax.jit(functools.partial(
        input_pipeline.batch_from_order, batch_size=config.batch_size,
        steps_per_epoch=steps, mesh=mesh))
    def input_window():
      for step in range(steps):
        jax.block_until_ready(gather(feed.images, feed.labels, order, step))
  else:
    def input_window():  # the host pipeline alone, as the trainer runs it
      for batch in feed.epoch(order, 0):
        jax.block_until_ready(batch)

  train_window()  # warm-up, in which the first steps map the step's memory in
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  train_seconds = timed_windows(train_window, windows, warm_up=False)
  page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  input_seconds = timed_windows(input_window, windows)

  eval_model = model_factory.make_model(config, differentiated=False)
  evaluator = Evaluator(eval_model, mesh, config.eval_batch_size)
  eval_split = Split(images.images[:eval_batches * config.eval_batch_size],
                     images.labels[:eval_batches * config.eval_batch_size])
  start = time.perf_counter()
  evaluator(state.params, state.batch_stats, Split(eval_split.images[:config.eval_batch_size],
                                                   eval_split.labels[:config.eval_batch_size]))
  eval_compile_seconds = time.perf_counter() - start
  scored = []  # what each eval window scored, to report that it scored every image
  eval_seconds = timed_windows(
      lambda: scored.append(evaluator(state.params, state.batch_stats, eval_split)), windows)

  train_rate = [steps * config.batch_size / s for s in train_seconds]
  eval_rate = [len(eval_split) / s for s in eval_seconds]
  result = {
      'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
      'dtype': config.dtype, 'conv_impl': conv_impl_name(model.conv_impl),
      'pool_impl': model.pool_impl, 'bn_impl': model.bn_impl,
      'eval_conv_impl': conv_impl_name(eval_model.conv_impl),
      'input_pipeline': feed.kind, 'batch_size': config.batch_size,
      'eval_batch_size': config.eval_batch_size,
      'train_compile_seconds': compile_seconds,
      'train_steps_run': int(state.step),  # the warm-up window's and the timed ones'
      'eval_examples_per_window': scored[-1]['examples'],
      'train_images_per_second': statistics.median(train_rate),
      'train_ms_per_step': 1000 * statistics.median(train_seconds) / steps,
      'input_ms_per_step': 1000 * statistics.median(input_seconds) / steps,
      # Pages the OS had to map in per train step: near 0 when freed memory is kept
      # (host_memory.keep_freed_memory), tens of thousands when it is not.
      'host_page_faults_per_step': page_faults / (windows * steps),
      'eval_compile_seconds': eval_compile_seconds,
      'eval_images_per_second': statistics.median(eval_rate),
      'peak_host_memory_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }
  impls = layer_conv_impls(model.conv_impl)
  if 'onednn' in impls.values():  # which of oneDNN's kernels (and instructions) ran
    result['onednn_kernels'] = {
        layer.name: onednn_conv.implementations(*layer.input_shape, layer.features,
                                                dtype=config.dtype)
        for layer in conv_layers(config) if impls[layer.name] == 'onednn'}
  if model.dense_impl == 'onednn':  # dense1's matmul: batch x 4096 @ 4096 x 512
    result.setdefault('onednn_kernels', {})['dense1'] = onednn_conv.matmul_implementation(
        config.batch_size // jax.device_count(), 4096, 512)
  r = result
  print(f"deepdigits benchmark: {r['devices']} x {r['device_kind']}, dtype {r['dtype']}, "
        f"conv {r['conv_impl']}, pool {r['pool_impl']}, ReLU-BatchNorm {r['bn_impl']} "
        f"(eval conv {r['eval_conv_impl']}), "
        f"train batch {r['batch_size']}, "
        f"eval batch {r['eval_batch_size']}")
  for name, kernels in r.get('onednn_kernels', {}).items():
    print(f'oneDNN kernels of {name}: {kernels}')
  print(f"train step: {r['train_images_per_second']:.0f} img/s (median of {windows} windows "
        f"of {steps} steps; min {min(train_rate):.0f}, max {max(train_rate):.0f}), "
        f"{r['train_ms_per_step']:.1f} ms/step, compile {compile_seconds:.1f} s")
  print(f"input pipeline ({r['input_pipeline']} feed) alone: "
        f"{r['input_ms_per_step']:.2f} ms/step "
        f"({100 * r['input_ms_per_step'] / r['train_ms_per_step']:.1f}% of the step)")
  print(f"eval step: {r['eval_images_per_second']:.0f} img/s (median of {windows} windows "
        f"of {eval_batches} batches; min {min(eval_rate):.0f}, max {max(eval_rate):.0f}), "
        f"{r['eval_images_per_second'] / r['train_images_per_second']:.1f}x the train step, "
        f"compile {eval_compile_seconds:.1f} s")
  print(f"peak host memory: {r['peak_host_memory_gib']:.2f} GiB; "
        f"{r['host_page_faults_per_step']:.0f} page faults per train step")
  if profile_dir:  # after the timing: tracing slows the steps it traces
    trace_train_steps(profile_dir, step_fn, state, feed, order, config.profile_steps or steps,
                      config.steps_per_dispatch, mesh)
  print(f"RESULT framework=deepdigits-jax batch={r['batch_size']} dtype={r['dtype']} "
        f"imgs_per_s={r['train_images_per_second']:.1f} "
        f"eval_imgs_per_s={r['eval_images_per_second']:.1f}")
  return result


def main():
  run_benchmark(loaded_config(), FLAGS.steps, FLAGS.windows, FLAGS.eval_batches,
                FLAGS.profile_dir or '')


def define_flags():
  """The command's flags; defined only when run as a command, so that importing this
  module next to other commands (tests do) defines no flag twice."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Train steps per timed window.')
  flags.DEFINE_integer('windows', 5, 'Timed windows (after one warm-up window).')
  flags.DEFINE_integer('eval_batches', 10, 'Eval batches per timed window.')
  flags.DEFINE_string('profile_dir', None, 'After the timing, a jax.profiler trace of '
                      '--config.profile_steps train steps (one window if 0) in this folder.')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  define_flags()
  run_command(main)
