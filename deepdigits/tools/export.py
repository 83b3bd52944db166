"""A trained run as a file that tools knowing nothing of deepdigits run:

    python -m deepdigits.tools.export --workdir=DIR --format=stablehlo --out=model.jax
    python -m deepdigits.tools.export --workdir=DIR --format=keras --out=model.keras
    python -m deepdigits.tools.export --workdir=DIR --format=onnx --out=model.onnx

It exports the weights the run is evaluated with (`inference.load_trained`): the
moving averages if the run kept them, and re-estimated BatchNorm statistics if it
recalibrates; `--checkpoint=best` the best checkpoint instead of the latest.

- stablehlo: `jax.export`, serialized, with a symbolic batch dimension: uint8 images
  [N, 28, 28, 1] in (scaled to [0, 1] inside), logits [N, 10] out. It reloads with jax
  alone: `jax.export.deserialize(data).call(images)`.
- keras: the original Keras Sequential (Keras 3, `.keras`), with the original softmax
  output, on images scaled to [0, 1]: the reverse of `keras_weights`, which reads it back.
- onnx: an ONNX model (opset 23) converted from the same jitted function as stablehlo by
  jax2onnx, which translates jaxprs, so it needs no TensorFlow and keeps Flax's own
  layers: uint8 images [N, 28, 28, 1] in, N free, logits [N, 10] out.
Usage from outside for each: docs/export.md.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from deepdigits import inference, storage
from deepdigits.cli import run_command
from deepdigits.data import IMAGE_SHAPE
from deepdigits.errors import ConfigError
from deepdigits.tools.keras_weights import FLAX_LAYERS

FORMATS = ('stablehlo', 'keras', 'onnx')
ONNX_OPSET = 23


def exportable(trained: inference.Trained) -> inference.Trained:
  """The run's evaluation model with lax's own convolution and pooling (the kernels
  that every backend and exporter knows), weights on the host."""
  if trained.config.get('width_normalization', 0):
    raise ConfigError(
        f'the run was trained on digits rescaled to {trained.config.width_normalization} '
        'pixels wide (width_normalization), a step an exported model would not do; '
        'predict with `python -m deepdigits.tools.predict` instead.')
  model = trained.model.clone(conv_impl='native', pool_impl='native', dtype=jnp.float32)
  host = jax.device_get((trained.params, trained.batch_stats))
  return inference.Trained(trained.config, model, trained.mesh, *host, trained.step)


def logits_function(trained: inference.Trained):
  """uint8 images [N, 28, 28, 1] -> logits [N, 10], the weights closed over (pure)."""
  trained = exportable(trained)
  variables = trained.variables

  def logits(images):
    return trained.model.apply(variables, images.astype(jnp.float32) / 255.0, train=False)

  return logits


def stablehlo_export(trained: inference.Trained) -> jax.export.Exported:
  """uint8 [N, 28, 28, 1] -> logits [N, 10], N symbolic, the weights as constants."""
  (batch,) = jax.export.symbolic_shape('batch')
  return jax.export.export(jax.jit(logits_function(trained)))(
      jax.ShapeDtypeStruct((batch,) + IMAGE_SHAPE, jnp.uint8))


def onnx_export(trained: inference.Trained) -> bytes:
  """The ONNX model's bytes: input 'images' uint8 [N, 28, 28, 1], output 'logits'
  [N, 10], the weights as initializers in the one file."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("--format=onnx needs jax2onnx: pip install -e '.[export]'") from None
  # onnx_ir warns about the shapes of constants it does not need to store; not ours to fix.
  logging.getLogger('onnx_ir').setLevel(logging.ERROR)
  model = jax2onnx.to_onnx(
      logits_function(trained), [jax.ShapeDtypeStruct(('N',) + IMAGE_SHAPE, jnp.uint8)],
      model_name='deepdigits', opset=ONNX_OPSET, input_names=['images'],
      output_names=['logits'])
  onnx.checker.check_model(model)
  return model.SerializeToString()


def keras_arrays(trained: inference.Trained) -> list[np.ndarray]:
  """The weights in the order `keras.Sequential.set_weights` takes them: each layer's
  kernel and bias, and each BatchNorm's gamma, beta, moving mean and moving variance."""
  trained = exportable(trained)
  params, stats = trained.params, trained.batch_stats
  order = ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'conv4', 'bn4', 'dense1', 'bn5',
           'dense2', 'bn6', 'logits')
  arrays = []
  for name in order:
    if name in FLAX_LAYERS['BatchNormalization']:
      arrays += [params[name]['scale'], params[name]['bias'], stats[name]['mean'],
                 stats[name]['var']]
    else:
      arrays += [params[name]['kernel'], params[name]['bias']]
  return [np.asarray(a, np.float32) for a in arrays]


def keras_sequential():
  """The original network as Keras 3 builds it (its Sequential, docs/network.md)."""
  os.environ.setdefault('KERAS_BACKEND', 'jax')  # no TensorFlow needed
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("--format=keras needs Keras 3: pip install -e '.[export]'") from None
  layers, l2 = keras.layers, keras.regularizers.l2
  return keras.Sequential([
      keras.Input(IMAGE_SHAPE),
      layers.Conv2D(32, 3, activation='relu'), layers.BatchNormalization(),
      layers.Conv2D(64, 3, activation='relu'), layers.BatchNormalization(),
      layers.MaxPooling2D(2), layers.Dropout(0.25),
      layers.Conv2D(128, 3, activation='relu'), layers.BatchNormalization(),
      layers.Conv2D(256, 3, activation='relu', kernel_regularizer=l2(0.001)),
      layers.BatchNormalization(),
      layers.MaxPooling2D(2), layers.Dropout(0.25),
      layers.Flatten(),
      layers.Dense(512, activation='relu', kernel_regularizer=l2(0.001)),
      layers.BatchNormalization(), layers.Dropout(0.5),
      layers.Dense(256, activation='relu', kernel_regularizer=l2(0.001)),
      layers.BatchNormalization(), layers.Dropout(0.5),
      layers.Dense(10, activation='softmax'),
  ], name='deepdigits')


def export_workdir(workdir: str, fmt: str, out: str, checkpoint: str = 'latest') -> str:
  """Writes workdir's evaluation model to `out` in format `fmt`; returns a line saying so."""
  if fmt not in FORMATS:
    raise ConfigError(f'--format={fmt}: use one of {", ".join(FORMATS)}.')
  if fmt == 'keras' and not out.endswith('.keras'):
    raise ConfigError(f'--out={out}: a Keras model file must end in .keras.')
  if fmt == 'keras' and storage.is_remote(out):
    raise ConfigError(f'--out={out}: Keras writes local files; write it here, then copy it.')
  folder = os.path.dirname(os.path.abspath(out))
  if not storage.is_remote(out) and not os.path.isdir(folder):
    raise ConfigError(f'--out={out}: the folder {folder} does not exist; create it first.')
  trained = inference.load_trained(workdir, checkpoint=checkpoint)
  if fmt == 'stablehlo':
    try:
      data = stablehlo_export(trained).serialize()
    except ImportError:  # jax serializes with flatbuffers, an optional dependency of jax
      raise ConfigError("--format=stablehlo needs flatbuffers: pip install -e '.[export]'"
                        ) from None
    storage.write_bytes(out, bytes(data))
  elif fmt == 'onnx':
    storage.write_bytes(out, onnx_export(trained))
  else:
    model = keras_sequential()
    model.set_weights(keras_arrays(trained))
    model.save(out)
  return (f'wrote the {checkpoint} checkpoint of {workdir} (step {trained.step}) as '
          f'{fmt} to {out}')


# ---------------------------------------------------------------- command


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags, defined only when run as a command."""
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_enum('format', None, list(FORMATS), 'What to write.')
  flags.DEFINE_string('out', None, 'The file to write.')
  flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                    'The latest checkpoint, or the best (a run with a validation slice).')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])


def main():
  print(export_workdir(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.checkpoint))


if __name__ == '__main__':
  define_flags()
  run_command(main)
