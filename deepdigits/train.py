"""The training loop: train state, the jitted train step, and `train_and_evaluate`.

Sections as in big_vision: config checks, mesh, data, model and state, checkpoint
restore, compile, then the epoch loop (train, evaluate, log, checkpoint).
"""

import collections
import functools
import time
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from deepdigits import (augment, checkpointing, host_memory, input_pipeline, onednn_conv,
                        rundir, sharding)
from deepdigits.data import IMAGE_SHAPE, Split, load_datasets, scale_images
from deepdigits.errors import ConfigError, NonFiniteError
from deepdigits.evaluate import BatchNormRecalibrator, Evaluator
from deepdigits.metrics_log import EpochProgress, MetricsLog
from deepdigits.model import CONV_IMPLS, POOL_IMPLS, DeepDigitsCNN, l2_penalty
from deepdigits.preemption import Preempted, PreemptionGuard

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
LR_SCHEDULES = ('constant', 'cosine')
AUGMENT_STREAM = 1 << 30  # folded into the base key for augmentation's own stream


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics, the base random key, and the moving
  average of the weights."""
  batch_stats: Any
  rng: jax.Array  # raw uint32 key; dropout uses fold_in(rng, step)
  nonfinite_step: jax.Array  # first step whose loss or gradients were not finite, or -1
  ema: Any  # {'params', 'batch_stats'} averaged over steps if config.ema_decay, else {}


class StepOptions(NamedTuple):
  """The config values the train step's math depends on (static in the jitted step)."""
  l2_weight: float
  label_smoothing: float = 0.0
  max_shift: float = 0.0
  max_rotation: float = 0.0
  max_zoom: float = 0.0
  ema_decay: float = 0.0
  elastic_alpha: float = 0.0
  elastic_sigma: float = 4.0

  @classmethod
  def from_config(cls, config) -> 'StepOptions':
    return cls(config.l2_weight, config.label_smoothing, config.augment_max_shift,
               config.augment_max_rotation, config.augment_max_zoom, config.ema_decay,
               config.augment_elastic_alpha, config.augment_elastic_sigma)


# ---------------------------------------------------------------- config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects values that would fail later or train nonsense, before any work."""
  positive = ('batch_size', 'eval_batch_size', 'learning_rate', 'checkpoint_every_epochs',
              'max_to_keep')
  non_negative = ('num_epochs', 'validation_size', 'train_subset',
                  'bn_recalibration_batches', 'l2_weight', 'checkpoint_every_steps',
                  'warmup_epochs', 'augment_max_shift', 'augment_max_rotation',
                  'augment_elastic_alpha', 'bn_group_size')
  for name in positive:
    if not config[name] > 0:
      raise ConfigError(f'--config.{name}={config[name]} must be > 0.')
  for name in non_negative:
    if config[name] < 0:
      raise ConfigError(f'--config.{name}={config[name]} must be >= 0.')
  for name in ('label_smoothing', 'ema_decay', 'augment_max_zoom'):
    if not 0 <= config[name] < 1:
      raise ConfigError(f'--config.{name}={config[name]} must be in [0, 1).')
  if config.augment_elastic_alpha and not config.augment_elastic_sigma > 0:
    raise ConfigError(f'--config.augment_elastic_sigma={config.augment_elastic_sigma} '
                      'must be > 0 when augment_elastic_alpha is set.')
  if not 0 <= config.width_normalization <= IMAGE_SHAPE[1]:
    raise ConfigError(f'--config.width_normalization={config.width_normalization} must '
                      f'be 0 (off) or a width in pixels, 1..{IMAGE_SHAPE[1]}.')
  if config.bn_group_size and config.batch_size % config.bn_group_size:
    raise ConfigError(f'--config.bn_group_size={config.bn_group_size} does not divide '
                      f'batch_size={config.batch_size}: use a divisor, or 0 (whole batch).')
  if config.warmup_epochs > config.num_epochs:
    raise ConfigError(f'--config.warmup_epochs={config.warmup_epochs} is more than '
                      f'num_epochs={config.num_epochs}.')
  if config.dtype not in DTYPES:
    raise ConfigError(f'--config.dtype={config.dtype!r}: use one of {sorted(DTYPES)}.')
  for name, choices in (('conv_impl', CONV_IMPLS + ('auto',)),
                        ('pool_impl', POOL_IMPLS + ('auto',)),
                        ('input_pipeline', input_pipeline.FEEDS),
                        ('lr_schedule', LR_SCHEDULES)):
    if config[name] not in choices:
      raise ConfigError(f'--config.{name}={config[name]!r}: use one of {choices}.')
  if config.conv_impl == 'onednn' and (problem := onednn_problem(config.dtype)):
    raise ConfigError(f"--config.conv_impl='onednn' {problem}.")


def onednn_problem(dtype: str) -> Optional[str]:
  """Why oneDNN's convolutions cannot run in this process with this dtype, or None."""
  if dtype != 'float32':
    return f"computes in float32, not {dtype}: use conv_impl='auto' or 'shifted_matmul'"
  if jax.default_backend() != 'cpu':
    return f"runs on the CPU only, not {jax.default_backend()}: use conv_impl='auto' or 'native'"
  if jax.local_device_count() > 1:
    return (f'needs one CPU device per process, not {jax.local_device_count()} (oneDNN '
            "called from several XLA devices at once deadlocks): use conv_impl='auto' or "
            "'shifted_matmul'")
  if not onednn_conv.is_available():
    return f"is not available: {onednn_conv.unavailable_reason()}. Or use conv_impl='auto'"
  return None

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


# ---------------------------------------------------------------- model and state


def make_model(config, differentiated: bool = True) -> DeepDigitsCNN:
  """The network for the train step (differentiated) or for evaluation; both compute the
  same function with the same parameters."""
  return DeepDigitsCNN(
      dtype=DTYPES[config.dtype],
      conv_impl=resolve_impl(config.conv_impl, cpu_conv_choice(config.dtype), differentiated),
      pool_impl=resolve_impl(config.pool_impl, 'strided_views', differentiated),
      bn_group_size=config.bn_group_size)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """'constant' (the original), or 'cosine': a linear warm-up over warmup_epochs, then
  a cosine decay to 0 at the last step."""
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  total = max(1, config.num_epochs * steps_per_epoch)
  warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=total, end_value=0.0)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  return optax.adam(learning_rate_schedule(config, steps_per_epoch), b1=config.adam_b1,
                    b2=config.adam_b2, eps=config.adam_eps)


def create_train_state(config, model: nn.Module, mesh, steps_per_epoch: int = 1) -> TrainState:
  """A fresh state from config.seed, replicated over the mesh. `steps_per_epoch` sets
  the learning-rate schedule's length; it does not change the state's structure, so
  any value serves as a template for restoring a checkpoint."""
  def init(rng):
    init_rng, dropout_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1,) + IMAGE_SHAPE), train=False)
    ema = ({'params': variables['params'], 'batch_stats': variables['batch_stats']}
           if config.ema_decay else {})
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables['batch_stats'],
                             tx=make_optimizer(config, steps_per_epoch), rng=dropout_rng,
                             nonfinite_step=jnp.array(-1, jnp.int32), ema=ema)
  return jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.PRNGKey(config.seed))


# ---------------------------------------------------------------- the step


def loss_fn(model: nn.Module, l2_weight: float, label_smoothing: float, params,
            batch_stats, dropout_rng, inputs, labels):
  """Cross-entropy (against labels smoothed by `label_smoothing`) plus Keras' L2 terms
  on a batch of [0, 1] images (pure); the aux holds the cross-entropy, the L2 term, the
  logits and the new BatchNorm statistics."""
  logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, inputs,
      train=True, rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  cross_entropy = optax.softmax_cross_entropy(logits, targets).mean()
  l2 = l2_penalty(params, l2_weight)
  return cross_entropy + l2, (cross_entropy, l2, logits, updates['batch_stats'])


def ema_update(average, new, decay: float, step):
  """The moving average after `step` (0-based) updates: decay is warmed up as
  min(decay, (1 + step) / (10 + step)), so early averages are not dominated by the
  random initial weights (pure)."""
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda a, n: rate * a + (1 - rate) * n, average, new)


def train_step(model: nn.Module, options: StepOptions, state: TrainState, images, labels):
  """One Adam step on a global batch of uint8 images; returns the new state and the
  batch's sums of loss and correct predictions (pure).

  Dropout's and augmentation's keys are the base key folded with the step, so a resumed
  run draws the same masks and moves. If the loss or a gradient is not finite, the
  state stays as it was, from then on, and records the step: a poisoned state is never
  produced, and the loop stops at its next check.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng = jax.random.fold_in(jax.random.fold_in(state.rng, AUGMENT_STREAM), state.step)
  inputs = augment.augment_batch(augment_rng, scale_images(images), options.max_shift,
                                 options.max_rotation, options.max_zoom,
                                 options.elastic_alpha, options.elastic_sigma)
  grad_fn = jax.grad(functools.partial(loss_fn, model, options.l2_weight,
                                       options.label_smoothing), has_aux=True)
  grads, (cross_entropy, l2, logits, batch_stats) = grad_fn(
      state.params, state.batch_stats, dropout_rng, inputs, labels)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if options.ema_decay:
    updated = updated.replace(ema=ema_update(
        state.ema, {'params': updated.params, 'batch_stats': updated.batch_stats},
        options.ema_decay, state.step))
  finite = jnp.isfinite(cross_entropy + l2) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  healthy = state.nonfinite_step < 0
  state = jax.tree.map(lambda new, old: jnp.where(finite & healthy, new, old), updated, state)
  state = state.replace(nonfinite_step=jnp.where(healthy & ~finite, state.step,
                                                 state.nonfinite_step))
  batch_size = labels.shape[0]
  metrics = {'loss_sum': cross_entropy * batch_size,
             'l2_sum': l2 * batch_size,
             'correct': jnp.sum(jnp.argmax(logits, -1) == labels),
             'count': jnp.asarray(batch_size, jnp.float32)}
  return state, metrics


def train_step_from_order(model: nn.Module, options: StepOptions, batch_size: int,
                          steps_per_epoch: int, mesh, state: TrainState, images, labels,
                          order):
  """`train_step` on the batch it slices, by its own step count, out of the epoch
  `order` of the device-resident split (pure)."""
  batch = input_pipeline.batch_from_order(images, labels, order, state.step, batch_size,
                                          steps_per_epoch, mesh)
  return train_step(model, options, state, *batch)


def compile_train_step(config, model, mesh, state: TrainState, feed):
  """The train step for `feed` (an input_pipeline feed), compiled ahead of time, with
  the state's buffers donated; called as step_fn(state, *data_args)."""
  if feed.kind == 'device':
    fn = functools.partial(train_step_from_order, model, StepOptions.from_config(config),
                           config.batch_size, feed.steps_per_epoch, mesh)
  else:
    fn = functools.partial(train_step, model, StepOptions.from_config(config))
  step = jax.jit(fn, donate_argnums=0,
                 out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
  return step.lower(state, *feed.arg_specs()).compile()


def epoch_order(config, epoch: int, num_examples: int) -> jax.Array:
  """The run's training order in `epoch` (on the device)."""
  return input_pipeline.epoch_order(config.seed, epoch, num_examples, config.shuffle)


# ---------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and evaluates every epoch;
  returns the last epoch's metrics record.

  Every check that can fail (config, devices, workdir, data, checkpoint) does so before
  compilation and training.
  """
  check_config(config)
  mesh = sharding.make_mesh()
  sharding.check_divisible(config.batch_size, mesh)
  sharding.check_divisible(config.eval_batch_size, mesh, 'eval_batch_size')
  rundir.prepare(workdir)
  with rundir.locked(workdir):
    rundir.write_config(workdir, config)
    return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config, workdir: str, mesh) -> dict:
  # Data.
  datasets = load_datasets(config)
  train_split = datasets['train']
  steps_per_epoch = len(train_split) // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'batch_size={config.batch_size} is larger than the '
                      f'{len(train_split)} training images.')

  # Model, state, checkpoint.
  model = make_model(config)
  eval_model = make_model(config, differentiated=False)
  state = create_train_state(config, model, mesh, steps_per_epoch)
  manager = checkpointing.make_manager(workdir, config.max_to_keep)
  restored = checkpointing.restore_latest(manager, state)
  if restored is not None:
    state = restored
  step = int(state.step)
  log = MetricsLog(workdir, tensorboard=config.tensorboard)
  log.keep_until(step)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  if config.model_summary:
    say(model_summary(eval_model))
  say(describe_run(config, model, eval_model, mesh, state, datasets, steps_per_epoch, step))
  learning_rate = learning_rate_schedule(config, steps_per_epoch)

  # Compile.
  feed = input_pipeline.make_feed(config.input_pipeline, mesh, train_split,
                                  config.batch_size)
  start = time.perf_counter()
  step_fn = compile_train_step(config, model, mesh, state, feed)
  say(f'train step compiled in {time.perf_counter() - start:.1f} s')
  evaluator = Evaluator(eval_model, mesh, config.eval_batch_size)
  recalibrate = BatchNormRecalibrator(eval_model, mesh)

  def save_checkpoint(state, step):
    """Saves once per step, and never a state that went non-finite (the last good
    checkpoint stays)."""
    check_finite(state, manager)
    if manager.latest_step() != step:
      checkpointing.save(manager, state)

  previous = log.records()
  record = previous[-1] if previous else {}  # returned as is if training is complete
  best_manager = (checkpointing.make_manager(workdir, 1, checkpointing.BEST)
                  if 'validation' in datasets else None)
  best_so_far = max((selection_metric(r) for r in previous), default=-1.0)
  with PreemptionGuard() as preemption:
    for epoch in range(step // steps_per_epoch, config.num_epochs):
      order = epoch_order(config, epoch, len(train_split))
      skip = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
      epoch_start = time.perf_counter()
      sums, in_flight = None, collections.deque()
      progress = EpochProgress(config.progress, epoch + 1, config.num_epochs,
                               steps_per_epoch, skip, config.batch_size)
      for data_args in feed.epoch(order, skip):
        state, metrics = step_fn(state, *data_args)
        step += 1
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        in_flight.append(metrics)
        if len(in_flight) > sharding.MAX_STEPS_IN_FLIGHT:
          progress.update(jax.block_until_ready(in_flight.popleft()))
        if preemption.should_stop(step):
          progress.close()
          save_checkpoint(state, step)
          manager.wait_until_finished()
          raise Preempted(f'stopped by {preemption.signal_name} at step {step}; the '
                          f'checkpoint is saved in {manager.directory}/{step}. Run the '
                          'same command to resume.', preemption.signum)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save_checkpoint(state, step)
      sums = jax.device_get(sums)
      progress.close()
      check_finite(state, manager)
      train_seconds = time.perf_counter() - epoch_start

      record = {'epoch': epoch + 1, 'step': step,
                'train_loss': float(sums['loss_sum'] / sums['count']),
                'train_l2_penalty': float(sums['l2_sum'] / sums['count']),
                'train_accuracy': float(sums['correct'] / sums['count'])}
      record.update(evaluate_splits(config, evaluator, recalibrate, state, datasets,
                                    order))
      record['epoch_seconds'] = time.perf_counter() - epoch_start
      record['train_seconds'] = train_seconds
      record['train_images_per_second'] = float(sums['count']) / train_seconds
      record['learning_rate'] = float(learning_rate(step - 1))  # of the epoch's last step
      host_memory.release_free_host_memory()
      record['host_memory_mib'] = host_memory.host_memory_mib()
      if best_manager and selection_metric(record) > best_so_far:
        best_so_far = selection_metric(record)
        checkpointing.save(best_manager, state)  # replaces the previous best
        record['best_checkpoint'] = True
      log.write(record)

      if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
        save_checkpoint(state, step)
  for m in (manager, best_manager):
    if m:
      m.wait_until_finished()
      m.close()
  log.close()
  return record


def selection_metric(record: dict) -> float:
  """What model selection maximises: validation accuracy (with recalibrated BatchNorm
  statistics when the run re-estimates them); never test accuracy."""
  return record.get('validation_accuracy_recalibrated',
                    record.get('validation_accuracy', -1.0))


def check_finite(state: TrainState, manager) -> None:
  """Stops the run if a step saw a NaN or Inf; the train step froze the state there."""
  bad_step = int(state.nonfinite_step)
  if bad_step >= 0:
    manager.wait_until_finished()
    latest = manager.latest_step()
    kept = (f'the last good checkpoint, step {latest}, is kept' if latest is not None
            else 'no checkpoint was written')
    raise NonFiniteError(
        f'the loss or its gradients became NaN or Inf at step {bad_step + 1}; training '
        f'stopped and {kept}. Lower --config.learning_rate or check the data.')


def evaluation_variables(state: TrainState) -> tuple[Any, Any]:
  """The weights and BatchNorm statistics a run is evaluated with: their moving
  averages if the run keeps them (config.ema_decay > 0), else the trained ones."""
  if state.ema:
    return state.ema['params'], state.ema['batch_stats']
  return state.params, state.batch_stats


def evaluate_splits(config, evaluator: Evaluator, recalibrate: BatchNormRecalibrator,
                    state: TrainState, datasets: dict[str, Split], order) -> dict:
  """Validation and test metrics of the evaluation weights (`evaluation_variables`)
  with their BatchNorm statistics and, if config.bn_recalibration_batches > 0, with
  ones re-estimated on the first batches of the epoch's training `order`
  ('_recalibrated')."""
  params, batch_stats = evaluation_variables(state)
  variants = {'': batch_stats}
  if config.bn_recalibration_batches:
    index_batches = input_pipeline.epoch_index_batches(order, config.batch_size)
    variants['_recalibrated'] = recalibrate(
        params, batch_stats, datasets['train'],
        index_batches[:config.bn_recalibration_batches])
  record = {}
  for suffix, batch_stats in variants.items():
    for name in ('validation', 'test'):
      if name in datasets:
        result = evaluator(params, batch_stats, datasets[name])
        record[f'{name}_loss{suffix}'] = result['loss']
        record[f'{name}_accuracy{suffix}'] = result['accuracy']
        record[f'{name}_examples'] = result['examples']
  return record


def model_summary(model: nn.Module) -> str:
  """Flax's layer table: shapes and parameter counts per layer, 2,624,394 in all."""
  return nn.tabulate(model, jax.random.PRNGKey(0), depth=1,
                     console_kwargs={'width': 110, 'force_terminal': False})(
                         jnp.zeros((1,) + IMAGE_SHAPE), train=False)


def describe_run(config, model, eval_model, mesh, state, datasets, steps_per_epoch,
                 start_step) -> str:
  """The few lines printed before training starts."""
  params = sum(x.size for x in jax.tree.leaves(state.params))
  stats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
  sizes = ', '.join(f'{name} {len(split):,}' for name, split in datasets.items())
  lines = [
      f'DeepDigitsCNN: {params + stats:,} numbers ({params:,} trained parameters + '
      f'{stats:,} BatchNorm running statistics), dtype {config.dtype}, '
      f'conv {model.conv_impl}, pool {model.pool_impl} (evaluation: conv '
      f'{eval_model.conv_impl}, pool {eval_model.pool_impl})',
      f'mesh: {mesh.size} x {jax.devices()[0].device_kind} over {jax.process_count()} '
      f'process(es); data: {sizes}',
      f'{config.num_epochs} epochs x {steps_per_epoch} steps of {config.batch_size} images',
  ]
  if start_step:
    lines.append(f'resuming from the checkpoint at step {start_step}')
  return '\n'.join(lines)
