"""Trains and evaluates DeepDigits: `python main.py --config=configs/mnist_tpu.py --workdir=DIR`.

Kept thin on purpose, as in flax's examples: flags and platform set-up here, the work in
`deepdigits.train`. Any config field can be overridden: `--config.learning_rate=3e-3`.
`--mode=evaluate` scores a trained workdir's checkpoint instead (its config.json is used;
`deepdigits.inference.evaluate_workdir`).
"""

import sys

from absl import flags
from ml_collections import config_flags

from deepdigits.cli import loaded_config, run_command

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file (evaluate '
                                "mode: optional, the workdir's config.json by default).",
                                lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'], 'train (and resume), or '
                  "evaluate the workdir's checkpoint on the test set.")
flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'], 'Evaluate mode: the latest '
                  'checkpoint, or the best (highest validation accuracy).')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host: one process per '
                  'host; auto-configured on Cloud TPU and SLURM, else give the three '
                  'flags below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (--distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (--distributed).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (--distributed).')
flags.mark_flags_as_required(['workdir'])


def main():
  if FLAGS.mode == 'train' and not FLAGS['config'].present:
    sys.exit('deepdigits: error: --config is required to train (or give --mode=evaluate '
             'to score a trained workdir).')
  if FLAGS.mode == 'train' and FLAGS['checkpoint'].present:
    sys.exit('deepdigits: error: --checkpoint is for --mode=evaluate.')
  # Imported here so that flag and config errors come before jax's start-up time.
  import jax  # pylint: disable=g-import-not-at-top

  from deepdigits.inference import evaluate_workdir  # pylint: disable=g-import-not-at-top
  from deepdigits.metrics_log import format_evaluation  # pylint: disable=g-import-not-at-top
  from deepdigits.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  if FLAGS.mode == 'evaluate':
    config = loaded_config() if FLAGS['config'].present else None
    print(format_evaluation(evaluate_workdir(FLAGS.workdir, FLAGS.checkpoint, config)))
  else:
    train_and_evaluate(loaded_config(), FLAGS.workdir)


if __name__ == '__main__':
  run_command(main)
