"""A trained model from a workdir, and its predictions: what evaluation, prediction on
real images, plots and ensembles start from.

The run's own config.json rebuilds the model; the latest checkpoint gives the weights.
If the run re-estimated BatchNorm statistics for evaluation
(`bn_recalibration_batches` > 0), they are re-estimated here the same way, on the
training batches of the checkpoint's epoch, so predictions match the run's reported
'_recalibrated' numbers.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from deepdigits import (
  checkpointing,
  input_pipeline,
  model_factory,
  rundir,
  sharding,
  storage,
  train_state,
)
from deepdigits.data import Split, load_datasets, scale_images
from deepdigits.errors import CheckpointError
from deepdigits.evaluate import BatchNormRecalibrator, Evaluator, evaluate_splits, pad_to_batches
from deepdigits.metrics_log import MetricsLog


@dataclasses.dataclass
class Trained:
  """What a prediction needs: the evaluation model and its variables."""
  config: ml_collections.ConfigDict
  model: nn.Module  # the forward-only (evaluation) form of the network
  mesh: Mesh
  params: Any
  batch_stats: Any  # recalibrated if the run recalibrated, else the running statistics
  step: int

  @property
  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}

  @functools.cached_property
  def logits_fn(self):
    """jitted (variables, uint8 images) -> logits, gathered on every device."""
    return jax.jit(functools.partial(_logits, self.model),
                   out_shardings=sharding.replicated(self.mesh))


def load_trained(workdir: str, config: Optional[ml_collections.ConfigDict] = None,
                 recalibrate: bool = True, checkpoint: str = 'latest') -> Trained:
  """The 'latest' checkpoint of workdir, or the 'best' (highest validation accuracy,
  kept when the run holds out a validation slice), ready to predict; a clear error if
  there is none.

  `config` defaults to the workdir's config.json; `recalibrate=False` keeps the running
  BatchNorm statistics even if the run recalibrated.
  """
  kinds = {'latest': checkpointing.LATEST, 'best': checkpointing.BEST}
  if checkpoint not in kinds:
    raise ValueError(f'checkpoint={checkpoint!r}: use one of {sorted(kinds)}')
  config = config if config is not None else rundir.read_config(workdir)
  directory = storage.join(workdir, kinds[checkpoint])
  if not storage.is_dir(directory):
    hint = (' (a best checkpoint is kept only with --config.validation_size > 0)'
            if checkpoint == 'best' else '')
    raise CheckpointError(f'no {directory}{hint}; train there first.')
  mesh = sharding.make_mesh()
  template = train_state.abstract_train_state(config, model_factory.make_model(config), mesh)
  manager = checkpointing.make_manager(workdir, config.max_to_keep, kinds[checkpoint])
  state = checkpointing.restore_latest(manager, template, set_aside=False)  # only reads
  manager.close()
  if state is None:
    raise CheckpointError(f'no readable checkpoint in {directory}; train there first.')
  model = model_factory.make_model(config, differentiated=False)
  params, batch_stats = train_state.evaluation_variables(state)  # the moving averages if kept
  trained = Trained(config, model, mesh, params, batch_stats, int(state.step))
  if recalibrate and config.bn_recalibration_batches:
    trained = recalibrated(trained, load_datasets(config)['train'])
  return trained


def recalibrated(trained: Trained, train_split: Split) -> Trained:
  """`trained` with BatchNorm statistics re-estimated as its run did for evaluation: on
  the first `bn_recalibration_batches` batches of the training order of the epoch that
  ended at its step."""
  config = trained.config
  steps_per_epoch = len(train_split) // config.batch_size
  epoch = max(0, -(-trained.step // steps_per_epoch) - 1)
  index_batches = input_pipeline.epoch_index_batches(
      input_pipeline.run_epoch_order(config, epoch, len(train_split)), config.batch_size)
  batch_stats = BatchNormRecalibrator(trained.model, trained.mesh)(
      trained.params, trained.batch_stats, train_split,
      index_batches[:config.bn_recalibration_batches])
  return dataclasses.replace(trained, batch_stats=batch_stats)


def _logits(model: nn.Module, variables, images):
  return model.apply(variables, scale_images(images), train=False)


def predict_logits(trained: Trained, images: np.ndarray,
                   batch_size: Optional[int] = None) -> np.ndarray:
  """Logits [N, 10] of uint8 images [N, 28, 28, 1], in batches sharded over the mesh."""
  batch_size = batch_size or trained.config.eval_batch_size
  batch_size = -(-batch_size // trained.mesh.size) * trained.mesh.size
  labels = np.zeros(len(images), np.int32)
  padded_images, _, _ = pad_to_batches(Split(images, labels), batch_size)
  index_batches = np.arange(len(padded_images)).reshape(-1, batch_size)
  out = []
  for (batch,) in sharding.sharded_batches(trained.mesh, (padded_images,), index_batches):
    out.append(np.asarray(jax.device_get(trained.logits_fn(trained.variables, batch))))
  return np.concatenate(out)[:len(images)]


def evaluate_workdir(workdir: str, checkpoint: str = 'latest',
                     config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """Scores a trained run's 'latest' or 'best' checkpoint on every test image (and on
  its validation slice, if it held one out), as the run's own evaluation does: keys
  named as in metrics.jsonl plus '<split>_errors', with '_recalibrated' ones when the
  run re-estimates BatchNorm statistics. `config` defaults to workdir's config.json."""
  config = config if config is not None else rundir.read_config(workdir)
  trained = load_trained(workdir, config, recalibrate=False, checkpoint=checkpoint)
  datasets = load_datasets(config)
  variants = {'': trained.batch_stats}
  if config.bn_recalibration_batches:
    variants['_recalibrated'] = recalibrated(trained, datasets['train']).batch_stats
  result = {'workdir': workdir, 'checkpoint': checkpoint, 'step': trained.step}
  epochs = [r['epoch'] for r in MetricsLog(workdir).records() if r['step'] == trained.step]
  if epochs:
    result['epoch'] = epochs[-1]
  evaluator = Evaluator(trained.model, trained.mesh, config.eval_batch_size)
  result.update(evaluate_splits(evaluator, trained.params, variants, datasets,
                                with_errors=True))
  return result
