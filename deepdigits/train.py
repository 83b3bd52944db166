"""The trainer: the jitted train step and `train_and_evaluate`, one main loop that
reads top to bottom in sections (checks, mesh, data, model and state, restore, compile,
loop), as big_vision's does.
"""

import collections
import functools
import time
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from deepdigits import (
  augment,
  checkpointing,
  config_checks,
  host_memory,
  input_pipeline,
  model_factory,
  profiling,
  rundir,
  sharding,
)
from deepdigits.data import load_datasets, scale_images
from deepdigits.errors import ConfigError
from deepdigits.evaluate import BatchNormRecalibrator, Evaluator, evaluate_splits
from deepdigits.metrics_log import EpochProgress, MetricsLog
from deepdigits.model import conv_impl_name, l2_penalty
from deepdigits.preemption import PreemptionGuard
from deepdigits.train_state import (
  TrainState,
  abstract_train_state,
  create_train_state,
  evaluation_variables,
  learning_rate_schedule,
  make_optimizer,
  zero_epoch_sums,
)

AUGMENT_STREAM = 1 << 30  # folded into the base key for augmentation's own stream


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
  elastic_probability: float = 1.0
  clean_from_step: int = -1  # the first step that trains on unaugmented images, or -1

  @classmethod
  def from_config(cls, config, steps_per_epoch: int = 0) -> 'StepOptions':
    """The config's options; `steps_per_epoch` places config.augment_clean_epochs."""
    clean_from_step = -1
    if config.augment_clean_epochs:
      if not steps_per_epoch:
        raise ValueError('augment_clean_epochs needs steps_per_epoch')
      clean_from_step = (config.num_epochs - config.augment_clean_epochs) * steps_per_epoch
    return cls(l2_weight=config.l2_weight, label_smoothing=config.label_smoothing,
               max_shift=config.augment_max_shift,
               max_rotation=config.augment_max_rotation,
               max_zoom=config.augment_max_zoom, ema_decay=config.ema_decay,
               elastic_alpha=config.augment_elastic_alpha,
               elastic_sigma=config.augment_elastic_sigma,
               elastic_probability=config.augment_elastic_probability,
               clean_from_step=clean_from_step)


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


def augmented_inputs(options: StepOptions, rng: jax.Array, images, step) -> jax.Array:
  """The step's [0, 1] images augmented as `options` say, or as they are from
  `options.clean_from_step` on (pure)."""
  augment_fn = functools.partial(
      augment.augment_batch, max_shift=options.max_shift,
      max_rotation=options.max_rotation, max_zoom=options.max_zoom,
      elastic_alpha=options.elastic_alpha, elastic_sigma=options.elastic_sigma,
      elastic_probability=options.elastic_probability)
  if options.clean_from_step < 0:
    return augment_fn(rng, images)
  return jax.lax.cond(step < options.clean_from_step, augment_fn,
                      lambda _, unchanged: unchanged, rng, images)


def train_step(model: nn.Module, options: StepOptions, state: TrainState, images, labels):
  """One Adam step on a global batch of uint8 images; returns the new state and the
  batch's sums of loss and correct predictions (pure).

  Dropout's and augmentation's keys are the base key folded with the step, so a resumed
  run draws the same masks and moves. If the loss, a gradient or anything the update
  produces (parameters, optimizer state, BatchNorm statistics, averages) is not finite,
  the state stays as it was, from then on, and records the step: a poisoned state is
  never produced (so never saved), and the loop stops at its next check.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng = jax.random.fold_in(jax.random.fold_in(state.rng, AUGMENT_STREAM), state.step)
  inputs = augmented_inputs(options, augment_rng, scale_images(images), state.step)
  grad_fn = jax.grad(functools.partial(loss_fn, model, options.l2_weight,
                                       options.label_smoothing), has_aux=True)
  grads, (cross_entropy, l2, logits, batch_stats) = grad_fn(
      state.params, state.batch_stats, dropout_rng, inputs, labels)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if options.ema_decay:
    updated = updated.replace(ema=ema_update(
        state.ema, {'params': updated.params, 'batch_stats': updated.batch_stats},
        options.ema_decay, state.step))
  finite = jnp.isfinite(cross_entropy + l2) & all_finite(
      (grads, updated.params, updated.opt_state, updated.batch_stats, updated.ema))
  healthy = state.nonfinite_step < 0
  batch_size = labels.shape[0]
  metrics = {'loss_sum': cross_entropy * batch_size,
             'l2_sum': l2 * batch_size,
             'correct': jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
             'count': jnp.asarray(batch_size, jnp.float32)}
  updated = updated.replace(epoch_sums=jax.tree.map(jnp.add, state.epoch_sums, metrics))
  state = jax.tree.map(lambda new, old: jnp.where(finite & healthy, new, old), updated, state)
  state = state.replace(nonfinite_step=jnp.where(healthy & ~finite, state.step,
                                                 state.nonfinite_step))
  return state, metrics


def all_finite(tree) -> jax.Array:
  """Whether every float in `tree` is finite (a scalar bool, on the device).

  On CPU the flag comes out of a conditional, which XLA computes once: as the `and` of
  one flag per leaf, XLA's CPU compiler copied those ~100 ands into each of the ~100
  fusions that select the train step's new state, a third of the step's compile time
  (docs/speed.md). Elsewhere a conditional would cost a wait on the device.

  The leaves of one shape (a parameter, its gradient, Adam's two moments of it) are
  reduced together, one pass over them all: a third fewer fusions to compile than one
  reduction per leaf, and a third of the time a step spends checking."""
  by_shape = {}
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      by_shape.setdefault(x.shape, []).append(jnp.isfinite(x))
  ok = jnp.all(jnp.array([jnp.all(functools.reduce(jnp.logical_and, flags))
                          for flags in by_shape.values()]))
  return jax.lax.platform_dependent(
      ok, cpu=lambda ok: jax.lax.cond(ok, lambda: True, lambda: False),
      default=lambda ok: ok)


def train_step_from_order(model: nn.Module, options: StepOptions, batch_size: int,
                          steps_per_epoch: int, mesh, state: TrainState, images, labels,
                          order):
  """`train_step` on the batch it slices, by its own step count, out of the epoch
  `order` of the device-resident split (pure)."""
  batch = input_pipeline.batch_from_order(images, labels, order, state.step, batch_size,
                                          steps_per_epoch, mesh)
  return train_step(model, options, state, *batch)


def train_steps_from_order(model: nn.Module, options: StepOptions, batch_size: int,
                           steps_per_epoch: int, mesh, state: TrainState, images, labels,
                           order, num_steps):
  """`num_steps` (a traced count) `train_step_from_order` steps in one call, a loop on
  the device; returns the state and the sums of the steps' metrics (pure)."""

  def step(_, carry):
    state, sums = carry
    state, metrics = train_step_from_order(model, options, batch_size, steps_per_epoch,
                                           mesh, state, images, labels, order)
    return state, jax.tree.map(jnp.add, sums, metrics)

  zeros = {'loss_sum': jnp.float32(0), 'l2_sum': jnp.float32(0), 'correct': jnp.int32(0),
           'count': jnp.float32(0)}
  return jax.lax.fori_loop(0, num_steps, step, (state, zeros))


def compile_train_step(config, model, mesh, state: TrainState, feed):
  """The train step for `feed` (an input_pipeline feed), compiled ahead of time, with
  the state's buffers donated; called as step_fn(state, *data_args) with the args of
  `epoch_dispatches`. With config.steps_per_dispatch > 1 (the device feed), one call
  runs the number of steps its last argument says."""
  options = StepOptions.from_config(config, feed.steps_per_epoch)
  specs = feed.arg_specs()
  if feed.kind == 'device' and config.steps_per_dispatch > 1:
    fn = functools.partial(train_steps_from_order, model, options, config.batch_size,
                           feed.steps_per_epoch, mesh)
    specs += (jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),)
  elif feed.kind == 'device':
    fn = functools.partial(train_step_from_order, model, options, config.batch_size,
                           feed.steps_per_epoch, mesh)
  else:
    fn = functools.partial(train_step, model, options)

  def train_step_with_learning_rate(learning_rate, state, *data_args):
    # The peak learning rate is an input of the program, not a constant in it: runs
    # and tests that differ only in learning rate share one compiled program (through
    # the persistent compilation cache). The values equal a constant's bit for bit.
    tx = make_optimizer(config, learning_rate_schedule(config, feed.steps_per_epoch,
                                                       peak=learning_rate))
    new_state, metrics = fn(state.replace(tx=tx), *data_args)
    return new_state.replace(tx=state.tx), metrics

  replicated = sharding.replicated(mesh)
  step = jax.jit(train_step_with_learning_rate, donate_argnums=1,
                 out_shardings=(replicated, replicated))
  compiled = step.lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
                        state, *specs).compile()
  return functools.partial(compiled, jax.device_put(jnp.float32(config.learning_rate),
                                                    replicated))


def epoch_dispatches(feed, order, step: int, steps_per_dispatch: int,
                     checkpoint_every_steps: int, mesh):
  """(data args, steps) of each call of the compiled step over the rest of the epoch
  from global step `step`: one step a call, or with steps_per_dispatch > 1 up to that
  many, a dispatch never crossing the epoch's end or a `checkpoint_every_steps`
  boundary (so saves fall where they would with one step a call)."""
  position = step % feed.steps_per_epoch
  if steps_per_dispatch == 1:
    for data_args in feed.epoch(order, position):
      yield data_args, 1
    return
  counts = {}  # each count once on the devices, as the compiled step takes it
  while position < feed.steps_per_epoch:
    n = min(steps_per_dispatch, feed.steps_per_epoch - position)
    if checkpoint_every_steps:
      n = min(n, checkpoint_every_steps - step % checkpoint_every_steps)
    if n not in counts:
      counts[n] = jax.device_put(jnp.int32(n), sharding.replicated(mesh))
    yield (feed.images, feed.labels, order, counts[n]), n
    position, step = position + n, step + n


# ---------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_epoch: Optional[Callable[[dict], bool]] = None) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and evaluates every epoch;
  returns the last epoch's metrics record.

  `on_epoch(record)`, if given, sees each epoch's record once it is logged; a true
  answer ends training there, with a checkpoint of that epoch (a pruner's stop: the
  same command, without it, goes on from there).

  Every check that can fail (config, devices, workdir, data, checkpoint) does so before
  compilation and training.
  """
  # Checks and mesh.
  mesh = sharding.make_mesh()
  config_checks.validate(config, mesh)
  rundir.prepare(workdir)
  with rundir.locked(workdir):
    rundir.check_resume(workdir, config)
    rundir.write_config(workdir, config)
    return _train_and_evaluate(config, workdir, mesh, on_epoch)


def _train_and_evaluate(config, workdir: str, mesh, on_epoch) -> dict:
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)

  # Data.
  datasets = load_datasets(config)
  train_split = datasets['train']
  steps_per_epoch = len(train_split) // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'batch_size={config.batch_size} is larger than the '
                      f'{len(train_split)} training images.')

  # Model and state.
  model = model_factory.make_model(config)
  eval_model = model_factory.make_model(config, differentiated=False)
  learning_rate = learning_rate_schedule(config, steps_per_epoch)

  # Restore, or start afresh: a resumed run never computes the initial weights.
  log = MetricsLog(workdir, tensorboard=config.tensorboard)
  checkpoints = checkpointing.RunCheckpoints(
      workdir, config.max_to_keep, keep_best='validation' in datasets,
      previous_records=log.records())
  state = checkpoints.restore(
      template=lambda: abstract_train_state(config, model, mesh, schedule=learning_rate),
      fresh=lambda: create_train_state(config, model, mesh, schedule=learning_rate))
  step = int(state.step)
  log.keep_until(step)
  if config.model_summary:
    say(model_factory.model_summary(eval_model))
  say(describe_run(config, model, eval_model, mesh, state, datasets, steps_per_epoch, step))

  # Compile, unless the run is already complete.
  feed = input_pipeline.make_feed(config.feed, mesh, train_split,
                                  config.batch_size)
  step_fn = None
  if step < config.num_epochs * steps_per_epoch:
    start = time.perf_counter()
    step_fn = compile_train_step(config, model, mesh, state, feed)
    say(f'train step compiled in {time.perf_counter() - start:.1f} s')
  else:
    say(f'training is complete (step {step}); nothing to do')
  evaluator = Evaluator(eval_model, mesh, config.eval_batch_size)
  recalibrate = BatchNormRecalibrator(eval_model, mesh)
  profiler = profiling.StepProfiler(workdir, config.profile_steps, step, say)

  # Loop.
  previous = log.records()
  record = previous[-1] if previous else {}  # returned as is if training is complete
  with log:  # closed however the run ends, its local TensorBoard folder removed
    with PreemptionGuard() as preemption:
      for epoch in range(step // steps_per_epoch, config.num_epochs):
        order = input_pipeline.run_epoch_order(config, epoch, len(train_split))
        epoch_start = time.perf_counter()
        first = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        if first == 0:  # else the checkpoint holds the sums of the epoch's earlier steps
          state = state.replace(epoch_sums=jax.device_put(
              zero_epoch_sums(), sharding.replicated(mesh)))
        progress = EpochProgress(config.progress, epoch + 1, config.num_epochs,
                                 steps_per_epoch, first, config.batch_size)
        dispatches = epoch_dispatches(feed, order, step, config.steps_per_dispatch,
                                      config.checkpoint_every_steps, mesh)
        state, step = run_epoch_steps(step_fn, state, step, dispatches, progress,
                                      preemption, checkpoints,
                                      config.checkpoint_every_steps, profiler)
        sums = jax.device_get(state.epoch_sums)
        checkpoints.check_finite(state)
        train_seconds = time.perf_counter() - epoch_start
        record = {'epoch': epoch + 1, 'step': step, **train_metrics(sums)}
        record.update(evaluate_epoch(config, evaluator, recalibrate, state, datasets, order))
        record.update(epoch_seconds=time.perf_counter() - epoch_start,
                      train_seconds=train_seconds,
                      train_images_per_second=float(sums['count']) / train_seconds,
                      learning_rate=float(learning_rate(step - 1)))  # the epoch's last step
        host_memory.release_free_host_memory()
        record['host_memory_mib'] = host_memory.host_memory_mib()
        checkpoints.keep_if_best(state, record)
        log.write(record)
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
          checkpoints.save(state, step)
        if on_epoch is not None and on_epoch(record):
          checkpoints.save(state, step)
          break
    checkpoints.close()
  return record


def run_epoch_steps(step_fn, state: TrainState, step: int, dispatches, progress,
                    preemption, checkpoints, checkpoint_every_steps: int,
                    profiler: profiling.StepProfiler):
  """The epoch's train steps from `step` on, one call of `step_fn` per item of
  `dispatches` ((data args, steps), from `epoch_dispatches`); returns the state (its
  `epoch_sums` those of the whole epoch) and the step reached. A preemption saves and
  stops at a dispatch boundary; `checkpoint_every_steps` saves within the epoch; the
  profiler traces the steps it was asked for (stopping at the epoch's end at the
  latest)."""
  in_flight = collections.deque()
  for data_args, steps in dispatches:
    profiler.before_step(step, steps)
    with profiler.annotate(step):
      state, metrics = step_fn(state, *data_args)
    step += steps
    profiler.after_step(step, state)
    # The in-flight cap: wait for the dispatch before last, so that no more than
    # MAX_STEPS_IN_FLIGHT are queued (see sharding); its metrics feed the bar.
    in_flight.append((metrics, steps))
    if len(in_flight) > sharding.MAX_STEPS_IN_FLIGHT:
      finished, finished_steps = in_flight.popleft()
      progress.update(jax.block_until_ready(finished), finished_steps)
    if preemption.should_stop(step, steps):
      progress.close()
      checkpoints.save_and_stop(state, step, preemption)
    if checkpoint_every_steps and step % checkpoint_every_steps == 0:
      checkpoints.save(state, step)
  progress.close()
  profiler.finish(state)
  return state, step


def train_metrics(sums: dict) -> dict:
  """The epoch's mean training loss, L2 term and accuracy from its sums."""
  return {'train_loss': float(sums['loss_sum'] / sums['count']),
          'train_l2_penalty': float(sums['l2_sum'] / sums['count']),
          'train_accuracy': float(sums['correct'] / sums['count'])}


def evaluate_epoch(config, evaluator: Evaluator, recalibrate: BatchNormRecalibrator,
                   state: TrainState, datasets: dict, order) -> dict:
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
  return evaluate_splits(evaluator, params, variants, datasets)


def describe_run(config, model, eval_model, mesh, state, datasets, steps_per_epoch,
                 start_step) -> str:
  """The few lines printed before training starts."""
  params = sum(x.size for x in jax.tree.leaves(state.params))
  stats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
  sizes = ', '.join(f'{name} {len(split):,}' for name, split in datasets.items())
  lines = [
      f'DeepDigitsCNN: {params + stats:,} numbers ({params:,} trained parameters + '
      f'{stats:,} BatchNorm running statistics), dtype {config.dtype}, '
      f'conv {conv_impl_name(model.conv_impl)}, pool {model.pool_impl}, '
      f'ReLU-BatchNorm {model.bn_impl} (evaluation: conv '
      f'{conv_impl_name(eval_model.conv_impl)}, pool {eval_model.pool_impl})',
      f'mesh: {mesh.size} x {jax.devices()[0].device_kind} over {jax.process_count()} '
      f'process(es); data: {sizes}',
      f'{config.num_epochs} epochs x {steps_per_epoch} steps of {config.batch_size} images',
  ]
  if start_step:
    lines.append(f'resuming from the checkpoint at step {start_step}')
  return '\n'.join(lines)
