"""The train state (parameters, BatchNorm statistics, optimizer, keys, moving averages)
and the optimizer and schedule it carries: what training updates, checkpoints hold and
evaluation reads."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from deepdigits import sharding
from deepdigits.data import IMAGE_SHAPE

LR_SCHEDULES = ('constant', 'cosine')


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics, the base random key, the moving
  average of the weights, and the current epoch's metric sums."""
  batch_stats: Any
  rng: jax.Array  # raw uint32 key; dropout uses fold_in(rng, step)
  nonfinite_step: jax.Array  # first step whose update was not finite, or -1
  ema: Any  # {'params', 'batch_stats'} averaged over steps if config.ema_decay, else {}
  # The sums of the train step's metrics over the epoch's steps so far: in the
  # checkpoint, so that a run resumed mid-epoch reports the whole epoch.
  epoch_sums: Any


def zero_epoch_sums() -> dict:
  """The train step's metric sums before an epoch's first step."""
  return {'loss_sum': jnp.zeros((), jnp.float32), 'l2_sum': jnp.zeros((), jnp.float32),
          'correct': jnp.zeros((), jnp.int32), 'count': jnp.zeros((), jnp.float32)}


def learning_rate_schedule(config, steps_per_epoch: int,
                           peak: Optional[jax.typing.ArrayLike] = None) -> optax.Schedule:
  """'constant' (the original), or 'cosine': a linear warm-up over warmup_epochs, then
  a cosine decay to 0 at the last step; both peak at `peak`, by default
  config.learning_rate. The peak may be a traced value: the compiled train step takes
  it as an input, so that runs differing only in learning rate share one program."""
  if peak is None:
    peak = config.learning_rate
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(peak)
  total = max(1, config.num_epochs * steps_per_epoch)
  warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
  # optax.warmup_cosine_decay_schedule(0, peak, warmup, total, end_value=0) spelled out:
  # it tests `peak == 0`, which a traced peak cannot answer.
  return optax.join_schedules(
      [optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup),
       optax.cosine_decay_schedule(init_value=peak, decay_steps=total - warmup, alpha=0.0)],
      [warmup])


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam with the config's moments and epsilon (Keras' defaults) on `schedule`."""
  return optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)


def create_train_state(config, model: nn.Module, mesh, steps_per_epoch: int = 1,
                       schedule: Optional[optax.Schedule] = None) -> TrainState:
  """A fresh state from config.seed, replicated over the mesh. The learning-rate
  `schedule` (by default the config's over `steps_per_epoch`) does not change the
  state's structure, so any serves as a template for restoring a checkpoint."""
  return jax.jit(_init_fn(config, model, steps_per_epoch, schedule),
                 out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))


def abstract_train_state(config, model: nn.Module, mesh, steps_per_epoch: int = 1,
                         schedule: Optional[optax.Schedule] = None) -> TrainState:
  """The shapes, dtypes and shardings of `create_train_state`'s state (its optimizer
  too), with nothing computed or compiled: the template a checkpoint is restored into
  (the weights' random initialisation alone compiles for 3-5 s of CPU)."""
  shapes = jax.eval_shape(_init_fn(config, model, steps_per_epoch, schedule),
                          jax.random.PRNGKey(config.seed))
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def _init_fn(config, model: nn.Module, steps_per_epoch: int = 1,
             schedule: Optional[optax.Schedule] = None):
  """The function of a PRNG key that makes a fresh state (pure)."""
  if schedule is None:
    schedule = learning_rate_schedule(config, steps_per_epoch)
  def init(rng):
    init_rng, dropout_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1,) + IMAGE_SHAPE), train=False)
    ema = ({'params': variables['params'], 'batch_stats': variables['batch_stats']}
           if config.ema_decay else {})
    state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                              batch_stats=variables['batch_stats'],
                              tx=make_optimizer(config, schedule), rng=dropout_rng,
                              nonfinite_step=jnp.array(-1, jnp.int32), ema=ema,
                              epoch_sums=zero_epoch_sums())
    # A strong int32 step, as a restored checkpoint's: Flax's is a weakly typed 0, and
    # the train step would then compile once for a fresh run and again for a resumed one.
    return state.replace(step=jnp.zeros((), jnp.int32))
  return init


def evaluation_variables(state: TrainState) -> tuple[Any, Any]:
  """The weights and BatchNorm statistics a run is evaluated with: their moving
  averages if the run keeps them (config.ema_decay > 0), else the trained ones."""
  if state.ema:
    return state.ema['params'], state.ema['batch_stats']
  return state.params, state.batch_stats
