"""One check of a config before any work, shared by the trainer and every command that
trains or benchmarks (sweep and seeds check each point with it)."""

import math
from typing import Optional

import ml_collections
from jax.sharding import Mesh

from deepdigits import input_pipeline, model_factory, sharding
from deepdigits.data import DATA_SOURCES, IMAGE_SHAPE, check_data_dir
from deepdigits.errors import ConfigError
from deepdigits.model import POOL_IMPLS
from deepdigits.train_state import LR_SCHEDULES


def validate(config: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> None:
  """Raises ConfigError naming the field and the fix for a value that cannot train, and,
  given the mesh, for batch sizes that do not split over its devices; DataError for a
  data_dir that is not a folder."""
  check_values(config)
  if config.data_source == 'idx' and config.data_dir:
    check_data_dir(config.data_dir)
  if mesh is not None:
    sharding.check_divisible(config.batch_size, mesh)
    sharding.check_divisible(config.eval_batch_size, mesh, 'eval_batch_size')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Rejects values that would fail later or train nonsense (no devices needed)."""
  for name, value in config.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'--config.{name}={value} is not a finite number.')
  positive = ('batch_size', 'eval_batch_size', 'learning_rate', 'checkpoint_every_epochs',
              'max_to_keep', 'num_epochs', 'adam_eps', 'steps_per_dispatch')
  non_negative = ('validation_size', 'train_subset',
                  'bn_recalibration_batches', 'l2_weight', 'checkpoint_every_steps',
                  'warmup_epochs', 'augment_max_shift', 'augment_max_rotation',
                  'augment_elastic_alpha', 'bn_group_size', 'profile_steps',
                  'augment_clean_epochs')
  for name in positive:
    if not config[name] > 0:
      raise ConfigError(f'--config.{name}={config[name]} must be > 0.')
  for name in non_negative:
    if config[name] < 0:
      raise ConfigError(f'--config.{name}={config[name]} must be >= 0.')
  for name in ('label_smoothing', 'ema_decay', 'augment_max_zoom', 'adam_b1', 'adam_b2'):
    if not 0 <= config[name] < 1:
      raise ConfigError(f'--config.{name}={config[name]} must be in [0, 1).')
  if not 0 <= config.seed < 2**32:
    raise ConfigError(f'--config.seed={config.seed} must be in [0, 2**32): JAX keys take '
                      'an unsigned 32-bit seed.')
  if config.augment_elastic_alpha and not config.augment_elastic_sigma > 0:
    raise ConfigError(f'--config.augment_elastic_sigma={config.augment_elastic_sigma} '
                      'must be > 0 when augment_elastic_alpha is set.')
  if not 0 < config.augment_elastic_probability <= 1:
    raise ConfigError(f'--config.augment_elastic_probability='
                      f'{config.augment_elastic_probability} must be in (0, 1].')
  if config.augment_clean_epochs >= config.num_epochs:
    raise ConfigError(f'--config.augment_clean_epochs={config.augment_clean_epochs} leaves '
                      f'no augmented epoch of num_epochs={config.num_epochs}: use fewer, or '
                      'turn the augmentation off.')
  if not 0 <= config.width_normalization <= IMAGE_SHAPE[1]:
    raise ConfigError(f'--config.width_normalization={config.width_normalization} must '
                      f'be 0 (off) or a width in pixels, 1..{IMAGE_SHAPE[1]}.')
  if config.bn_group_size and config.batch_size % config.bn_group_size:
    raise ConfigError(f'--config.bn_group_size={config.bn_group_size} does not divide '
                      f'batch_size={config.batch_size}: use a divisor, or 0 (whole batch).')
  if config.warmup_epochs > config.num_epochs:
    raise ConfigError(f'--config.warmup_epochs={config.warmup_epochs} is more than '
                      f'num_epochs={config.num_epochs}.')
  if config.dtype not in model_factory.DTYPES:
    raise ConfigError(f'--config.dtype={config.dtype!r}: use one of '
                      f'{sorted(model_factory.DTYPES)}.')
  for name, choices in (('data_source', DATA_SOURCES),
                        ('pool_impl', POOL_IMPLS + ('auto',)),
                        ('feed', input_pipeline.FEEDS),
                        ('lr_schedule', LR_SCHEDULES)):
    if config[name] not in choices:
      raise ConfigError(f'--config.{name}={config[name]!r}: use one of {choices}.')
  if config.steps_per_dispatch > 1 and config.feed != 'device':
    raise ConfigError(f'--config.steps_per_dispatch={config.steps_per_dispatch} needs '
                      "--config.feed='device' (the loop slices its batches on the device).")
  if problem := model_factory.conv_impl_problem(config.conv_impl):
    raise ConfigError(f'--config.conv_impl={config.conv_impl!r} {problem}.')
  if ('onednn' in model_factory.config_conv_impls(config.conv_impl)
      and (problem := model_factory.onednn_problem(config.dtype))):
    raise ConfigError(f'--config.conv_impl={config.conv_impl!r} {problem}.')
