"""Weights of the original Keras model in DeepDigitsCNN: `load_keras_weights(path)`, and
`python -m deepdigits.tools.keras_weights --keras_weights=FILE --config=... --workdir=DIR`,
which writes them as a checkpoint that `inference.load_trained(DIR)` reads.

Reads the HDF5 with h5py, so Keras is not needed. Three files are understood:
- Keras 3 `model.save_weights('x.weights.h5')`: `layers/<name>/vars/<i>`;
- Keras 3 `model.save('x.keras')`: a zip of config.json (the layer order) and that same
  `model.weights.h5`;
- legacy Keras 2 / tf.keras `.h5` (`save_weights` or whole-model `save`): the layer
  order in the `layer_names` attribute, the arrays named in `weight_names`.
A Keras 3 `.weights.h5` holds no layer order; the layers are then taken in the order of
their names' numbers (`conv2d`, `conv2d_1`, ..., Keras' automatic names), which is the
order they were created in. Layers named by hand need the `.keras` file.

Both frameworks are channels-last, so the arrays map one to one: convolution kernels
are HWIO, dense kernels [in, out], and Flatten orders a 4x4x256 map the same way.
"""

import io
import json
import os
import zipfile
from typing import Optional

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from deepdigits import (
  checkpointing,
  config_checks,
  model_factory,
  rundir,
  sharding,
  storage,
  train_state,
)
from deepdigits.cli import loaded_config, run_command
from deepdigits.data import IMAGE_SHAPE
from deepdigits.errors import CheckpointError, KerasWeightsError
from deepdigits.model import DeepDigitsCNN

# The Flax layers of each kind, in the order of the Keras Sequential.
FLAX_LAYERS = {
    'Conv2D': ('conv1', 'conv2', 'conv3', 'conv4'),
    'BatchNormalization': ('bn1', 'bn2', 'bn3', 'bn4', 'bn5', 'bn6'),
    'Dense': ('dense1', 'dense2', 'logits'),
}

Layers = list[tuple[str, list[np.ndarray]]]  # (Keras layer name, its arrays) in order


def _decoded(names) -> list[str]:
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _keras3_layers(h5: h5py.File, order: Optional[list[str]]) -> Layers:
  """The layers of a Keras 3 weights file; `order` from the model's config, if known.

  Keras 3 names a `.keras` file's weight groups by class and position (`conv2d`,
  `conv2d_1`, ...), not by the layers' names, which differ once a process has built
  more than one model (`conv2d_4`, ...): the config's order serves only when it names
  the groups, else the groups' own order does."""
  group = h5['layers']
  if not order or not set(group) <= set(order):
    order = sorted(group, key=storage.natural_key)
  names = [n for n in order if n in group]
  layers = []
  for name in names:
    variables = group[name].get('vars', {})
    layers.append((name, [np.asarray(variables[str(i)]) for i in range(len(variables))]))
  return layers


def _legacy_layers(h5: h5py.File) -> Layers:
  root = h5['model_weights'] if 'model_weights' in h5 else h5
  layers = []
  for name in _decoded(root.attrs['layer_names']):
    group = root[name]
    layers.append((name, [np.asarray(group[w])
                          for w in _decoded(group.attrs.get('weight_names', []))]))
  return layers


def _layers_of_h5(h5: h5py.File, path: str, order: Optional[list[str]] = None) -> Layers:
  if 'layers' in h5:
    return _keras3_layers(h5, order)
  if 'layer_names' in h5.attrs or ('model_weights' in h5 and
                                   'layer_names' in h5['model_weights'].attrs):
    return _legacy_layers(h5)
  raise KerasWeightsError(f'{path} is an HDF5 file but not one Keras wrote (no "layers" '
                          'group, no "layer_names" attribute).')


def _keras_file_layers(path: str) -> Layers:
  """The layers of a `.keras` zip, in the order its config.json gives."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    if 'model.weights.h5' not in names:
      raise KerasWeightsError(f'{path} is a zip without model.weights.h5, not a .keras '
                              'model file.')
    order = None
    if 'config.json' in names:
      config = json.loads(archive.read('config.json'))
      order = [layer.get('config', {}).get('name', layer.get('name'))
               for layer in config.get('config', {}).get('layers', [])] or None
    weights = io.BytesIO(archive.read('model.weights.h5'))
  with h5py.File(weights, 'r') as h5:
    return _layers_of_h5(h5, f'{path}:model.weights.h5', order)


def read_keras_layers(path: str) -> Layers:
  """Every Keras layer of the file that holds arrays (or none), in model order."""
  if not os.path.isfile(path):
    raise KerasWeightsError(f'{path}: no such file.')
  if zipfile.is_zipfile(path):
    return _keras_file_layers(path)
  try:
    h5 = h5py.File(path, 'r')
  except OSError:
    raise KerasWeightsError(f'{path} is neither an HDF5 file (.weights.h5, .h5) nor a '
                            '.keras zip.') from None
  with h5:
    return _layers_of_h5(h5, path)


def layer_kind(name: str, arrays: list[np.ndarray]) -> Optional[str]:
  """'Conv2D', 'Dense' or 'BatchNormalization' from the arrays' shapes; None for
  layers without weights (pooling, dropout, flatten)."""
  ndims = [a.ndim for a in arrays]
  if not arrays:
    return None
  if ndims == [4, 1]:
    return 'Conv2D'
  if ndims == [2, 1]:
    return 'Dense'
  if ndims == [1] * 4 and len({a.shape for a in arrays}) == 1:
    return 'BatchNormalization'
  shapes = ', '.join(str(a.shape) for a in arrays)
  raise KerasWeightsError(f'Keras layer {name!r} holds arrays of shapes {shapes}: not a '
                          'Conv2D or Dense with bias, nor a BatchNormalization with '
                          'scale and center, so not a layer of DeepDigits.')


def expected_shapes() -> dict:
  """The shapes of DeepDigitsCNN's variables, without computing them."""
  variables = jax.eval_shape(lambda: DeepDigitsCNN().init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE), train=False))
  return jax.tree.map(lambda x: x.shape, variables)


def to_flax_variables(layers: Layers, source: str = 'the Keras file') -> dict:
  """{'params', 'batch_stats'} of DeepDigitsCNN from the Keras layers, every shape
  checked; a KerasWeightsError names the first layer that does not fit."""
  by_kind = {kind: [] for kind in FLAX_LAYERS}
  for name, arrays in layers:
    kind = layer_kind(name, arrays)
    if kind is not None:
      by_kind[kind].append((name, arrays))
  for kind, flax_names in FLAX_LAYERS.items():
    if len(by_kind[kind]) != len(flax_names):
      found = ', '.join(name for name, _ in by_kind[kind]) or 'none'
      raise KerasWeightsError(f'{source} has {len(by_kind[kind])} {kind} layers '
                              f'({found}); DeepDigits has {len(flax_names)}.')
  params, batch_stats = {}, {}
  for kind, flax_names in FLAX_LAYERS.items():
    for flax_name, (_, arrays) in zip(flax_names, by_kind[kind]):
      arrays = [np.asarray(a, np.float32) for a in arrays]
      if kind == 'BatchNormalization':
        gamma, beta, moving_mean, moving_variance = arrays
        params[flax_name] = {'scale': gamma, 'bias': beta}
        batch_stats[flax_name] = {'mean': moving_mean, 'var': moving_variance}
      else:
        params[flax_name] = {'kernel': arrays[0], 'bias': arrays[1]}
  variables = {'params': params, 'batch_stats': batch_stats}
  keras_names = {flax_name: keras_name for kind, flax_names in FLAX_LAYERS.items()
                 for flax_name, (keras_name, _) in zip(flax_names, by_kind[kind])}
  wanted = expected_shapes()
  for collection, layer_arrays in variables.items():
    for flax_name, named in layer_arrays.items():
      for array_name, array in named.items():
        need = wanted[collection][flax_name][array_name]
        if array.shape != need:
          raise KerasWeightsError(
              f'{source}: Keras layer {keras_names[flax_name]!r} ({flax_name} here) has '
              f'a {array_name} of shape {array.shape}; DeepDigits needs {need}.')
  return variables


def load_keras_weights(path: str) -> dict:
  """The weights of a Keras DeepDigits model file as DeepDigitsCNN variables:
  `{'params': ..., 'batch_stats': ...}`, ready for
  `DeepDigitsCNN().apply(variables, images, train=False)` on images scaled to [0, 1]."""
  return to_flax_variables(read_keras_layers(path), source=path)


def write_workdir(variables: dict, config: ml_collections.ConfigDict,
                  workdir: str) -> str:
  """Writes the variables as a step-0 checkpoint of a fresh train state, with the
  config, so that workdir reads like a trained run's; returns the checkpoint path."""
  config_checks.check_values(config)
  mesh = sharding.make_mesh()
  rundir.prepare(workdir)
  with rundir.locked(workdir):
    checkpoints = storage.join(workdir, checkpointing.LATEST)
    if storage.list_names(checkpoints):
      raise CheckpointError(f'{checkpoints} already holds checkpoints; pick a new '
                            '--workdir.')
    state = train_state.create_train_state(config, model_factory.make_model(config), mesh)
    replicated = sharding.replicated(mesh)
    state = state.replace(params=jax.device_put(variables['params'], replicated),
                          batch_stats=jax.device_put(variables['batch_stats'], replicated))
    rundir.write_config(workdir, config)
    manager = checkpointing.make_manager(workdir, config.max_to_keep)
    checkpointing.save(manager, state)
    manager.wait_until_finished()
    manager.close()
  return storage.join(checkpoints, '0')


# ---------------------------------------------------------------- command


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command, so that this module can be
  imported beside the other commands (absl flags are global)."""
  flags.DEFINE_string('keras_weights', None, 'A Keras DeepDigits model: .weights.h5, '
                      '.keras, or a legacy .h5.')
  flags.DEFINE_string('workdir', None, 'New directory for the checkpoint and config.json.')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file (the '
                                  'model and evaluation settings recorded with the '
                                  'weights).', lock_config=True)
  flags.mark_flags_as_required(['keras_weights', 'workdir', 'config'])


def main():
  config = loaded_config()
  path = write_workdir(load_keras_weights(FLAGS.keras_weights), config, FLAGS.workdir)
  print(f'wrote the weights of {FLAGS.keras_weights} to {path}; '
        f'deepdigits.inference.load_trained({FLAGS.workdir!r}) reads them.')
  if config.bn_recalibration_batches:
    print('note: this config re-estimates BatchNorm statistics '
          f'(bn_recalibration_batches={config.bn_recalibration_batches}), so '
          "load_trained replaces Keras' moving statistics unless given recalibrate=False.")


if __name__ == '__main__':
  define_flags()
  run_command(main)
