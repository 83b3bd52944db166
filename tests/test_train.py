"""The train step, data parallelism, evaluation and BatchNorm recalibration."""

import functools
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import REPO, require_onednn, tiny_config
from deepdigits import config_checks, input_pipeline, model_factory, sharding, train, train_state
from deepdigits.data import Split, scale_images
from deepdigits.errors import ConfigError
from deepdigits.evaluate import BatchNormRecalibrator, Evaluator
from deepdigits.model import ReluBatchNorm, l2_penalty


def mesh_of(num_devices: int) -> Mesh:
  return jax.make_mesh((num_devices,), (sharding.DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])


@pytest.fixture(scope='module')
def batch(mnist):
  return mnist['train'].images[:64], mnist['train'].labels[:64]


@pytest.fixture(scope='module')
def model_and_state():
  config = tiny_config('')
  model = model_factory.make_model(config)
  return model, train_state.create_train_state(config, model, mesh_of(1))


def _bn1_input(params, images) -> np.ndarray:
  """relu(conv1(images)), what bn1 normalises, computed apart from the model (float64,
  one row per pixel and image)."""
  x = np.asarray(scale_images(images), np.float64)
  kernel = np.asarray(params['conv1']['kernel'], np.float64)
  out = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return np.maximum(np.asarray(out) + np.asarray(params['conv1']['bias']), 0).reshape(-1, 32)


@pytest.mark.devices(8)
def test_eight_fake_devices_are_present():
  assert jax.device_count() == 8


@pytest.mark.devices(8)
@pytest.mark.parametrize('bn_group_size', [0, 8])
def test_one_and_eight_devices_give_the_same_loss_gradients_and_batch_stats(
    model_and_state, batch, bn_group_size):
  model, state = model_and_state
  # Per-group statistics (groups of 8: one per device on 8) are the same on any mesh.
  # They are computed with XLA's own convolutions, which compile in about half the time
  # of the CPU's training choice on several devices (Winograd's tiles, tested here
  # without groups).
  model = model.clone(bn_group_size=bn_group_size,
                      **({'conv_impl': 'native'} if bn_group_size else {}))
  results = {}
  for n in (1, 8):
    mesh = mesh_of(n)
    params, batch_stats = jax.device_put((state.params, state.batch_stats),
                                         sharding.replicated(mesh))
    images, labels = sharding.global_batch(mesh, *batch)
    assert len(images.sharding.device_set) == n
    grad_fn = jax.jit(jax.grad(functools.partial(train.loss_fn, model, 1e-3, 0.0), has_aux=True))
    grads, (loss, _, _, new_stats) = grad_fn(params, batch_stats, jax.random.PRNGKey(3),
                                             scale_images(images), labels)
    results[n] = jax.device_get((loss, grads, new_stats))
  (loss1, grads1, stats1), (loss8, grads8, stats8) = results[1], results[8]
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    if bn_group_size:
      # Statistics of 8 images amplify the rounding of another summation order (up to
      # 7e-4 of a leaf's norm here); groups of 16 instead of 8 are off by 44% or more.
      assert np.linalg.norm(a - b) <= 3e-3 * np.linalg.norm(a)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The statistics are those of the global batch, averaged in with Keras' momentum of
  # 0.99: bn1's running mean (initially 0) and variance (1) moved 1% of the way to the
  # 64-image batch's moments, not an 8-image shard's.
  act = _bn1_input(state.params, batch[0])
  np.testing.assert_allclose(stats1['bn1']['mean'], 0.01 * act.mean(0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats1['bn1']['var'], 0.99 + 0.01 * act.var(0), rtol=1e-5)


def test_train_steps_on_a_fixed_batch_drive_the_loss_down(batch):
  config = tiny_config('')
  mesh = sharding.make_mesh()
  model = model_factory.make_model(config)
  state = train_state.create_train_state(config, model, mesh)
  feed = input_pipeline.HostFeed(mesh, Split(*batch), config.batch_size)
  step = train.compile_train_step(config, model, mesh, state, feed)
  images, labels = sharding.global_batch(mesh, *batch)
  l2_before = float(l2_penalty(jax.device_get(state.params), config.l2_weight))
  losses = []
  for i in range(15):
    state, metrics = step(state, images, labels)
    losses.append(float(metrics['loss_sum'] / metrics['count']))
    if i == 0:  # the batch's sums, of the weights the step started from
      assert float(metrics['count']) == 64 and 0 <= int(metrics['correct']) <= 64
      np.testing.assert_allclose(metrics['l2_sum'] / 64, l2_before, rtol=1e-5)
  assert int(state.step) == 15
  assert losses[0] > 1.5 and losses[-1] < 0.3 * losses[0], losses
  assert int(metrics['correct']) >= 40  # most of the batch it has been fitting
  # The epoch's sums in the state: the 15 steps' metrics added up.
  assert float(state.epoch_sums['count']) == 15 * 64


def test_an_epochs_metrics_are_its_means():
  assert train.train_metrics({'loss_sum': 6.0, 'l2_sum': 3.0, 'correct': 3, 'count': 4.0}) == {
      'train_loss': 1.5, 'train_l2_penalty': 0.75, 'train_accuracy': 0.75}


@pytest.mark.devices(8)
def test_evaluation_counts_every_example_once_on_any_device_count(model_and_state, mnist):
  state = model_and_state[1]
  model = model_factory.make_model(tiny_config(''), differentiated=False)  # as a run's
  split = Split(mnist['test'].images[:300], mnist['test'].labels[:300])
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       scale_images(split.images), train=False)
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  expected_loss = -log_probs[np.arange(300), split.labels].mean()
  expected_correct = int((logits.argmax(1) == split.labels).sum())
  for devices, batch_size in ((8, 64), (8, 296), (1, 7), (8, 512)):
    mesh = mesh_of(devices)
    params, batch_stats = jax.device_put((state.params, state.batch_stats),
                                         sharding.replicated(mesh))
    result = Evaluator(model, mesh, batch_size)(params, batch_stats, split)
    assert result['examples'] == 300
    assert result['errors'] == 300 - expected_correct
    np.testing.assert_allclose(result['accuracy'], expected_correct / 300)
    np.testing.assert_allclose(result['loss'], expected_loss, rtol=1e-5)


@pytest.mark.devices(8)
def test_eval_batch_size_must_divide_by_devices(model_and_state):
  with pytest.raises(ConfigError, match='eval_batch_size=100 does not divide by the 8'):
    Evaluator(model_and_state[0], mesh_of(8), 100)


@pytest.mark.devices(8)
def test_bn_recalibration_is_the_exact_average_over_batches(model_and_state, mnist):
  model, state = model_and_state
  split = Split(mnist['train'].images[:256], mnist['train'].labels[:256])
  index_batches = np.arange(256).reshape(4, 64)[[2, 0]]  # two batches, any order
  mesh = mesh_of(8)
  params, batch_stats = jax.device_put((state.params, state.batch_stats),
                                       sharding.replicated(mesh))
  stats = BatchNormRecalibrator(model, mesh)(params, batch_stats, split, index_batches)
  # bn1 sees relu(conv1(x)) directly: compute its batch moments by hand.
  means, variances = [], []
  for rows in index_batches:
    act = _bn1_input(state.params, split.images[rows])
    means.append(act.mean(0))
    variances.append(act.var(0))
  np.testing.assert_allclose(stats['bn1']['mean'], np.mean(means, 0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['bn1']['var'], np.mean(variances, 0), rtol=1e-4, atol=1e-6)
  # Every layer's, the later ones with dropout off: what each BatchNorm layer of the
  # network without dropout sees in training mode, recorded as it runs.
  def inputs_of_batch_norms(variables, images):
    seen = {}
    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, ReluBatchNorm) and context.method_name == '__call__':
        seen[context.module.name] = nn.relu(args[0])  # what it normalises
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(record):
      model.clone(use_dropout=False).apply(variables, scale_images(images), train=True,
                                           mutable=['batch_stats'])
    return seen
  # The variables an argument, not 2.6 million constants compiled into the program.
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  seen = [jax.jit(inputs_of_batch_norms)(variables, split.images[rows])
          for rows in index_batches]
  assert set(stats) == set(seen[0]) == {f'bn{i}' for i in range(1, 7)}
  for name in stats:
    features = [np.asarray(s[name], np.float64).reshape(-1, s[name].shape[-1]) for s in seen]
    np.testing.assert_allclose(stats[name]['mean'], np.mean([f.mean(0) for f in features], 0),
                               rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(stats[name]['var'], np.mean([f.var(0) for f in features], 0),
                               rtol=1e-3, atol=1e-5, err_msg=name)
  # The running statistics are untouched.
  assert np.all(np.asarray(state.batch_stats['bn1']['var']) == 1)


def test_bad_config_values_fail_with_clear_errors():
  for field, value, message in (('num_epochs', -1, 'num_epochs=-1 must be > 0'),
                                ('num_epochs', 0, 'num_epochs=0 must be > 0'),
                                ('batch_size', 0, 'batch_size=0 must be > 0'),
                                ('adam_eps', 0.0, 'adam_eps=0.0 must be > 0'),
                                ('adam_eps', -1e-7, 'adam_eps=-1e-07 must be > 0'),
                                ('adam_b1', 1.0, r'adam_b1=1.0 must be in \[0, 1\)'),
                                ('adam_b2', -0.1, r'adam_b2=-0.1 must be in \[0, 1\)'),
                                ('warmup_epochs', float('nan'),
                                 'warmup_epochs=nan is not a finite number'),
                                ('learning_rate', float('inf'),
                                 'learning_rate=inf is not a finite number'),
                                ('seed', -1, r'seed=-1 must be in \[0, 2\*\*32\)'),
                                ('seed', 2**32, r'seed=4294967296 must be in \[0, 2\*\*32\)'),
                                ('dtype', 'float16', "dtype='float16': use one of"),
                                ('conv_impl', 'fft', "conv_impl='fft' names 'fft': use one of"),
                                ('conv_impl', 'onednn,winograd',
                                 "conv_impl='onednn,winograd' names 2 implementations: give "
                                 'one for every convolution, or one for each of the 4'),
                                ('conv_impl', 'native,native,fft,native',
                                 "names 'fft': use one of"),
                                ('width_normalization', 29,
                                 'width_normalization=29 must be 0 .off. or a width'),
                                ('bn_group_size', -8, 'bn_group_size=-8 must be >= 0'),
                                ('bn_group_size', 24,
                                 'bn_group_size=24 does not divide batch_size=64')):
    with pytest.raises(ConfigError, match=message):
      config_checks.check_values(tiny_config('', **{field: value}))


@pytest.mark.devices(8)
def test_onednn_convs_are_refused_where_they_cannot_run_and_auto_avoids_them():
  # The tests' 8 CPU devices in one process: oneDNN would deadlock there.
  with pytest.raises(ConfigError, match="conv_impl='onednn' needs one CPU device per "
                                        'process, not 8'):
    config_checks.check_values(tiny_config('', conv_impl='onednn'))
  with pytest.raises(ConfigError, match="conv_impl='onednn,onednn,winograd,winograd' needs "
                                        'one CPU device per process, not 8'):
    config_checks.check_values(tiny_config('', conv_impl='onednn,onednn,winograd,winograd'))
  assert model_factory.make_model(tiny_config('')).conv_impl == (
      'shifted_matmul', 'winograd', 'winograd', 'winograd')
  assert model_factory.make_model(tiny_config(''), differentiated=False).conv_impl == 'native'
  # Named per layer, as given.
  config_checks.check_values(tiny_config('', conv_impl='native, shifted_matmul,auto,winograd'))
  assert model_factory.make_model(tiny_config(
      '', conv_impl='native, shifted_matmul,auto,winograd')).conv_impl == (
          'native', 'shifted_matmul', 'winograd', 'winograd')


def test_without_the_built_onednn_convs_auto_falls_back_and_onednn_says_why(monkeypatch):
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  monkeypatch.setattr(model_factory.onednn_conv, 'is_available', lambda: False)
  monkeypatch.setattr(model_factory.onednn_conv, 'unavailable_reason',
                      lambda: 'deepdigits/ops/onednn_conv.cc was not built')
  assert model_factory.make_model(tiny_config('')).conv_impl == (
      'shifted_matmul', 'winograd', 'winograd', 'winograd')
  with pytest.raises(ConfigError, match="conv_impl='onednn' is not available: "
                                        'deepdigits/ops/onednn_conv.cc was not built'):
    config_checks.check_values(tiny_config('', conv_impl='onednn'))


def test_bf16_onednn_convs_are_refused_on_a_cpu_without_bf16_instructions(monkeypatch):
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  monkeypatch.setattr(model_factory.onednn_conv, 'is_available', lambda: True)
  monkeypatch.setattr(model_factory.onednn_conv, 'bf16_problem', lambda: (
      'this CPU has no AVX512-BF16 or AMX instructions (oneDNN: fwd brgconv:avx512_core)'))
  monkeypatch.setattr(model_factory.onednn_conv, 'has_avx512_kernels', lambda: True)
  with pytest.raises(ConfigError, match=re.escape(
      "--config.conv_impl='onednn' computes bfloat16 only where the CPU has bf16 "
      'instructions, and this CPU has no AVX512-BF16 or AMX instructions (oneDNN: fwd '
      "brgconv:avx512_core): use dtype='float32', or conv_impl='auto'.")):
    config_checks.check_values(tiny_config('', conv_impl='onednn', dtype='bfloat16'))
  config_checks.check_values(tiny_config('', conv_impl='onednn'))  # float32 runs
  # 'auto' trains bfloat16 on the shifted-view matmuls there, float32 on oneDNN (AVX-512
  # kernels) and Winograd's tiles.
  assert model_factory.make_model(tiny_config('', dtype='bfloat16')).conv_impl == (
      'shifted_matmul')
  assert model_factory.make_model(tiny_config('', dtype='bfloat16')).dense_impl == 'native'
  assert model_factory.make_model(tiny_config('')).conv_impl == (
      'onednn', 'onednn', 'onednn', 'winograd')


@pytest.mark.parametrize('avx512, float32_choice', [
    (False, ('onednn', 'onednn', 'winograd', 'winograd')),
    (True, ('onednn', 'onednn', 'onednn', 'winograd'))])
def test_auto_leaves_conv3_to_onednn_where_its_kernels_are_avx512(monkeypatch, avx512,
                                                                   float32_choice):
  """Measured per layer (docs/speed.md): on AVX2 Winograd's tiles beat oneDNN from 64
  input features (conv3) up, on AVX-512 only from 128 (conv4)."""
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  monkeypatch.setattr(model_factory.onednn_conv, 'is_available', lambda: True)
  monkeypatch.setattr(model_factory.onednn_conv, 'has_avx512_kernels', lambda: avx512)
  assert model_factory.make_model(tiny_config('')).conv_impl == float32_choice


def test_auto_picks_onednn_convs_on_one_cpu_device():
  """On the machine as it is (one CPU device), `auto` picks the built oneDNN kernels
  for the first two convolutions (three where they are AVX-512 kernels) and Winograd's
  tiles for the rest (test_main.py's end-to-end run trains with them to 95%), and
  oneDNN's for all four and the dense layers in bfloat16 where the CPU has bf16
  instructions."""
  require_onednn()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  script = ('import jax; from configs import default; from deepdigits import model_factory; '
            'from deepdigits.ops import onednn_conv; '
            'fp32 = default.get_config(); bf16 = default.get_config(); '
            "bf16.dtype = 'bfloat16'; "
            'from deepdigits.model import conv_impl_name as name; '
            'print(jax.local_device_count(), name(model_factory.make_model(fp32).conv_impl), '
            'name(model_factory.make_model(bf16).conv_impl), onednn_conv.bf16_problem() is None, '
            'onednn_conv.has_avx512_kernels(), model_factory.make_model(bf16).dense_impl, '
            'model_factory.make_model(bf16, differentiated=False).dense_impl)')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  count, fp32, bf16, bf16_runs, avx512, dense, eval_dense = result.stdout.split()
  conv3 = 'onednn' if avx512 == 'True' else 'winograd'
  assert (count, fp32) == ('1', f'onednn,onednn,{conv3},winograd')
  assert bf16 == ('onednn' if bf16_runs == 'True' else 'shifted_matmul'), result.stdout
  # The dense layers of a bfloat16 train step on oneDNN's bf16 matmuls there too.
  assert (dense, eval_dense) == ('onednn' if bf16_runs == 'True' else 'native', 'native')


@pytest.mark.devices(8)
def test_batch_size_must_divide_by_the_device_count(tiny_mnist_dir, tmp_path):
  with pytest.raises(ConfigError, match='batch_size=100 does not divide by the 8 devices'):
    train.train_and_evaluate(tiny_config(tiny_mnist_dir, batch_size=100), str(tmp_path))


@jax.custom_vjp
def _gradient_over_ink(x, ink):
  """x, with its gradient divided by the images' mean ink: infinite on black images."""
  return x


_gradient_over_ink.defvjp(lambda x, ink: (x, ink),
                          lambda ink, g: (g / ink, jnp.zeros_like(ink)))


class InkToy(nn.Module):
  """A small network with BatchNorm whose loss is finite on black images but whose
  gradients are not."""

  @nn.compact
  def __call__(self, images, *, train):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(
        images.reshape((images.shape[0], -1)))
    return _gradient_over_ink(nn.Dense(10)(x), images.mean())


def _toy_step_and_state(schedule):
  config = tiny_config('', ema_decay=0.9)
  model = InkToy()
  state = train_state.create_train_state(config, model, mesh_of(1), schedule=schedule)
  options = train.StepOptions(l2_weight=0.0, ema_decay=0.9)
  return jax.jit(functools.partial(train.train_step, model, options)), state


def _frozen_fields(state):
  return jax.device_get((state.step, state.params, state.opt_state, state.batch_stats,
                         state.ema, state.epoch_sums))


@pytest.mark.parametrize('poison', ['infinite learning rate', 'infinite gradient'])
def test_a_nonfinite_update_leaves_the_state_as_it_was_from_then_on(batch, poison,
                                                                    monkeypatch):
  """The freeze in train_step itself (no checkpointing involved): after a good step, an
  update that is not finite changes nothing, records its step, and every later call,
  even one whose update would be finite, changes nothing either."""
  images, labels = batch[0][:16], batch[1][:16]
  black = np.zeros_like(images)
  if poison == 'infinite learning rate':  # the update overflows; loss and gradients are finite
    schedule = lambda count: jnp.where(count >= 1, jnp.inf, 1e-3)
    poisoned, later = images, images
  else:  # the loss is finite, a gradient is not
    schedule = lambda count: 1e-3
    poisoned, later = black, images
  # The toy has none of the real network's L2-regularised kernels.
  monkeypatch.setattr(train, 'l2_penalty', lambda params, weight: jnp.zeros(()))
  step, state = _toy_step_and_state(schedule)
  state, _ = step(state, images, labels)
  assert int(state.step) == 1 and int(state.nonfinite_step) == -1
  before = _frozen_fields(state)

  state, metrics = step(state, poisoned, labels)
  assert np.isfinite(float(metrics['loss_sum']))  # the loss itself was finite
  assert int(state.nonfinite_step) == 1
  jax.tree.map(np.testing.assert_array_equal, _frozen_fields(state), before)  # bitwise

  state, _ = step(state, later, labels)
  assert int(state.nonfinite_step) == 1
  jax.tree.map(np.testing.assert_array_equal, _frozen_fields(state), before)


def test_all_finite_sees_a_nan_or_inf_in_any_float_leaf_and_ignores_integers():
  # Leaves of one shape are checked together: 'a' and both of 'e', of two dtypes.
  tree = {'a': jnp.ones((3, 4)), 'b': [jnp.zeros(5, jnp.bfloat16), jnp.ones(())],
          'c': jnp.arange(6, dtype=jnp.int32).reshape(2, 3), 'd': jnp.full((2, 2, 2), 7.0),
          'e': [jnp.full((3, 4), 2.0), jnp.ones((3, 4), jnp.bfloat16)]}
  check = jax.jit(train.all_finite)
  assert bool(check(tree))
  leaves, treedef = jax.tree.flatten(tree)
  for i, leaf in enumerate(leaves):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    for bad in (np.nan, np.inf, -np.inf):
      poisoned = list(leaves)
      poisoned[i] = leaf.ravel().at[-1].set(bad).reshape(leaf.shape)
      assert not bool(check(jax.tree.unflatten(treedef, poisoned))), (i, bad)


def test_the_finiteness_flag_is_computed_once_not_in_every_fusion_that_reads_it():
  """What keeps the train step's compile time down on CPU: a state of 40 arrays, each
  selected by the flag, compiles to about 2 ands an array; the `and` of per-array flags
  alone compiled to 1,609 (each select's fusion with its own copy of the 40-and chain)."""
  if jax.default_backend() != 'cpu':
    pytest.skip('the conditional is used on CPU only')
  tree = [jnp.ones((i + 2, 3)) for i in range(40)]
  step = jax.jit(lambda t: jax.tree.map(lambda x: jnp.where(train.all_finite(t), 2 * x, x), t))
  program = step.lower(tree).compile().as_text()
  assert len(re.findall(r' and\(', program)) < 4 * len(tree)


def program_without_debug_info(hlo: str) -> str:
  """An HLO module's text without its source locations (their tables and each
  instruction's metadata), which the compilation cache's key leaves out too."""
  lines = [line for line in hlo.splitlines()
           if not re.match(r'(FileNames|FunctionNames|FileLocations|StackFrames|\d)', line)]
  return re.sub(r',? metadata=\{[^{}]*\}', '', '\n'.join(lines))


@pytest.mark.parametrize('lr_schedule', ['constant', 'cosine'])
def test_the_compiled_step_takes_the_learning_rate_as_an_input_with_a_constants_values(
    batch, lr_schedule, monkeypatch):
  """compile_train_step's program has the peak learning rate as an input: two rates give
  the same program, and each gives bit for bit what the step with the rate compiled in
  as a constant gives (train_step on the state's own optimizer), over the cosine
  schedule's warm-up and decay too."""
  images, labels = batch[0][:16], batch[1][:16]
  monkeypatch.setattr(train, 'l2_penalty', lambda params, weight: jnp.zeros(()))
  model, mesh = InkToy(), mesh_of(1)
  feed = input_pipeline.HostFeed(mesh, Split(images, labels), 8)  # 2 steps an epoch
  programs, trained = [], []
  for learning_rate in (1e-3, 3e-3):
    config = tiny_config('', batch_size=8, learning_rate=learning_rate, num_epochs=3,
                         lr_schedule=lr_schedule, warmup_epochs=1.0)
    state = train_state.create_train_state(config, model, mesh, feed.steps_per_epoch)
    step_fn = train.compile_train_step(config, model, mesh, state, feed)
    constant_step = jax.jit(functools.partial(
        train.train_step, model, train.StepOptions.from_config(config, feed.steps_per_epoch)))
    reference = train_state.create_train_state(config, model, mesh, feed.steps_per_epoch)
    for data_args in list(feed.epoch(np.arange(16), 0)) * 3:  # warm-up, then decay
      state, metrics = step_fn(state, *data_args)
      reference, reference_metrics = constant_step(reference, *data_args)
    assert int(state.step) == 6
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get((state.params, state.opt_state, state.batch_stats, metrics)),
                 jax.device_get((reference.params, reference.opt_state,
                                 reference.batch_stats, reference_metrics)))
    programs.append(program_without_debug_info(step_fn.func.as_text()))
    trained.append(jax.device_get(state.params))
  assert programs[0] == programs[1]
  assert not np.array_equal(trained[0]['Dense_0']['kernel'], trained[1]['Dense_0']['kernel'])
