"""Evaluation over a whole split, and BatchNorm re-estimation before it.

Every example is scored exactly once on any device count: the split is padded up to
whole batches and the padding is masked out of every sum.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepdigits import sharding
from deepdigits.data import Split, scale_images


def eval_sums(model: nn.Module, params, batch_stats, images, labels, mask):
  """Masked sums of loss and correct predictions for one batch (pure)."""
  logits = model.apply({'params': params, 'batch_stats': batch_stats},
                       scale_images(images), train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  return {'loss_sum': jnp.sum(losses * mask),
          'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def pad_to_batches(split: Split, batch_size: int):
  """(images, labels, mask) padded up to whole batches; mask is 0 on the padding."""
  num_padded = -(-len(split) // batch_size) * batch_size
  padding = num_padded - len(split)
  mask = np.concatenate([np.ones(len(split), np.float32), np.zeros(padding, np.float32)])
  images = np.concatenate([split.images, np.zeros((padding,) + split.images.shape[1:],
                                                  split.images.dtype)])
  labels = np.concatenate([split.labels, np.zeros(padding, split.labels.dtype)])
  return images, labels, mask


class Evaluator:
  """Scores a split with a jitted, batch-sharded eval step (compiled once per shape)."""

  def __init__(self, model: nn.Module, mesh, batch_size: int):
    sharding.check_divisible(batch_size, mesh, 'eval_batch_size')
    self.mesh, self.batch_size = mesh, batch_size
    self._step = jax.jit(functools.partial(eval_sums, model),
                         out_shardings=sharding.replicated(mesh))

  def __call__(self, params, batch_stats, split: Split) -> dict[str, float]:
    """{'loss', 'accuracy', 'examples', 'errors'} over every example of split."""
    if not len(split):
      raise ValueError('cannot evaluate an empty split')
    padded = pad_to_batches(split, self.batch_size)
    index_batches = np.arange(len(padded[0])).reshape(-1, self.batch_size)
    totals = jax.device_get(sharding.sum_over_batches(
        self.mesh, functools.partial(self._step, params, batch_stats), padded,
        index_batches))
    count = int(totals['count'])
    return {'loss': float(totals['loss_sum']) / count,
            'accuracy': float(totals['correct']) / count,
            'examples': count,
            'errors': count - int(totals['correct'])}


def batch_moments(model: nn.Module, params, batch_stats, images):
  """Every BatchNorm layer's mean and variance on one batch, with dropout off (pure).

  A clone with momentum 0 makes BatchNorm's running-average update return exactly the
  batch's statistics, over the whole batch even when training uses per-group statistics.
  """
  probe = model.clone(bn_momentum=0.0, use_dropout=False, bn_group_size=0)
  _, updates = probe.apply({'params': params, 'batch_stats': batch_stats},
                           scale_images(images), train=True, mutable=['batch_stats'])
  return updates['batch_stats']


class BatchNormRecalibrator:
  """Re-estimates BatchNorm statistics as exact averages over training batches.

  With momentum 0.99 and dropout before BatchNorm, the running averages lag and see
  another variance than evaluation does; the exact averages with dropout off match what
  evaluation sees (the 'precise BN' of Wu & Johnson, 2021). No weight changes.
  """

  def __init__(self, model: nn.Module, mesh):
    self.mesh = mesh
    self._moments = jax.jit(functools.partial(batch_moments, model),
                            out_shardings=sharding.replicated(mesh))

  def __call__(self, params, batch_stats, split: Split, index_batches: np.ndarray):
    """Batch statistics averaged over the global batches `index_batches` of split."""
    total = sharding.sum_over_batches(
        self.mesh, functools.partial(self._moments, params, batch_stats),
        (split.images,), index_batches)
    return jax.tree.map(lambda t: t / len(index_batches), total)


def evaluate_splits(evaluator: Evaluator, params, variants: dict[str, object],
                    datasets: dict[str, Split], with_errors: bool = False) -> dict:
  """Validation and test metrics for each BatchNorm-statistics variant (its suffix,
  '' or '_recalibrated', to its statistics), keyed as in metrics.jsonl:
  '<split>_loss<suffix>', '<split>_accuracy<suffix>', '<split>_examples' and, with
  `with_errors`, '<split>_errors<suffix>'."""
  keys = ('loss', 'accuracy', 'errors') if with_errors else ('loss', 'accuracy')
  record = {}
  for suffix, batch_stats in variants.items():
    for name in ('validation', 'test'):
      if name in datasets:
        scores = evaluator(params, batch_stats, datasets[name])
        record[f'{name}_examples'] = scores['examples']
        for key in keys:
          record[f'{name}_{key}{suffix}'] = scores[key]
  return record
