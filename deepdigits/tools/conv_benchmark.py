"""Times each convolution of the network alone, forward and backward, in every
`conv_impl`: `python -m deepdigits.tools.conv_benchmark --config=configs/mnist_tpu.py`.

Where the train step's time goes, layer by layer, and which implementation is fastest
for each on this machine: the evidence behind `conv_impl='auto'`. Each layer is the
model's own `Conv3x3` at the shape it has in the network (found by tracing the model),
differentiated as the train step does: kernel and bias always, the input too except for
the first layer (the images need no gradient).
"""

import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from deepdigits import config_checks, model_factory
from deepdigits.cli import loaded_config, run_command
from deepdigits.data import IMAGE_SHAPE
from deepdigits.model import Conv3x3

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class ConvLayer:
  """One convolution of the network as the train step sees it."""
  name: str
  input_shape: tuple  # NHWC
  features: int
  input_gradient: bool  # False for the first layer: nothing upstream to train

  @property
  def flops(self) -> int:
    """Multiply-adds x 2 of the forward pass, the kernel gradient and, if taken, the
    input gradient (each is the same GEMM-sized product)."""
    n, h, w, c = self.input_shape
    forward = 2 * n * (h - 2) * (w - 2) * 9 * c * self.features
    return forward * (3 if self.input_gradient else 2)


def conv_layers(config) -> list[ConvLayer]:
  """The network's convolutions at `config.batch_size`, in order, found by tracing the
  train-step model (shapes only, no arithmetic)."""
  model = model_factory.make_model(config)
  found = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Conv3x3) and context.method_name == '__call__':
      found.append((context.module.name, tuple(args[0].shape), context.module.features))
    return next_fun(*args, **kwargs)

  def init(images):
    key = jax.random.key(0)
    return model.init({'params': key, 'dropout': key}, images, train=True)

  with nn.intercept_methods(record):
    jax.eval_shape(init, jax.ShapeDtypeStruct((config.batch_size,) + IMAGE_SHAPE,
                                              jnp.float32))
  return [ConvLayer(name, shape, features, input_gradient=i > 0)
          for i, (name, shape, features) in enumerate(found)]


def layer_gradient_fn(layer: ConvLayer, impl: str, dtype):
  """jitted (params, x, output cotangent) -> (a sum of the output, the gradients the train
  step takes). The sum keeps the forward pass in the timing: a convolution is linear, so
  its gradients alone do not need its output, and XLA would drop the forward."""
  module = Conv3x3(layer.features, impl=impl, dtype=dtype)

  def pullback(params, x, cotangent):
    return jnp.sum(module.apply({'params': params}, x).astype(jnp.float32) * cotangent)

  return jax.jit(jax.value_and_grad(pullback, argnums=(0, 1) if layer.input_gradient else 0))


def time_layer(layer: ConvLayer, impls, dtype, calls: int, windows: int) -> dict:
  """{impl: median seconds of one forward+backward} for one layer; every impl is timed in
  each round, so a change in the machine's load falls on all of them alike."""
  rng = np.random.default_rng(0)
  n, h, w, c = layer.input_shape
  x = jnp.asarray(rng.random(layer.input_shape, np.float32), dtype)
  cotangent = jnp.asarray(rng.standard_normal((n, h - 2, w - 2, layer.features),
                                              np.float32))
  params = Conv3x3(layer.features).init(jax.random.key(0), x[:1])['params']
  fns = {impl: layer_gradient_fn(layer, impl, dtype) for impl in impls}
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn(params, x, cotangent))
  seconds = {impl: [] for impl in impls}
  for _ in range(windows):
    for impl, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn(params, x, cotangent)
      jax.block_until_ready(out)
      seconds[impl].append((time.perf_counter() - start) / calls)
  return {impl: statistics.median(s) for impl, s in seconds.items()}


def run_conv_benchmark(config, calls: int = 3, windows: int = 5, impls=None) -> dict:
  """Per-layer seconds and GFLOP/s for each impl (by default every one this
  installation has; also printed as a table)."""
  impls = impls or model_factory.available_conv_impls()
  config_checks.check_values(config)
  dtype = model_factory.DTYPES[config.dtype]
  layers = conv_layers(config)
  rows = []
  for layer in layers:
    seconds = time_layer(layer, impls, dtype, calls, windows)
    rows.append({'layer': layer.name, 'input_shape': layer.input_shape,
                 'features': layer.features, 'flops': layer.flops,
                 'seconds': seconds, 'fastest': min(seconds, key=seconds.get)})
  totals = {impl: sum(r['seconds'][impl] for r in rows) for impl in impls}
  best_total = sum(min(r['seconds'].values()) for r in rows)

  print(f'deepdigits conv benchmark: {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'dtype {config.dtype}, batch {config.batch_size}; forward + backward, ms '
        f'(GFLOP/s), median of {windows} windows of {calls} calls')
  cell = lambda seconds, flops: f'{1e3 * seconds:.1f} ({flops / seconds / 1e9:.0f})'.rjust(20)
  print(f'{"layer":<7}{"input > features":>20}' + ''.join(f'{impl:>20}' for impl in impls)
        + '  fastest')
  for r in rows:
    shape = 'x'.join(map(str, r['input_shape'])) + f' > {r["features"]}'
    print(f'{r["layer"]:<7}{shape:>20}' + ''.join(cell(r['seconds'][impl], r['flops'])
                                                   for impl in impls) + f'  {r["fastest"]}')
  print(f'{"all":<27}' + ''.join(f'{1e3 * totals[impl]:.1f}'.rjust(20) for impl in impls)
        + f'  per-layer best {1e3 * best_total:.1f}')
  return {'layers': rows, 'total_seconds': totals, 'best_total_seconds': best_total}


def main():
  run_conv_benchmark(loaded_config(), FLAGS.calls, FLAGS.windows)


def define_flags():
  """The command's flags; defined only when run as a command, so that importing this
  module next to other commands (tests do) defines no flag twice."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_integer('calls', 3, 'Forward+backward calls per timed window.')
  flags.DEFINE_integer('windows', 5, 'Timed windows (after a warm-up call).')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  define_flags()
  run_command(main)
