"""Every config field, documented once; other configs import this and change a few.

Override any field on the command line: `--config.learning_rate=3e-3`.
"""

import ml_collections

from deepdigits import mnist_download


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  # 'idx': the four original MNIST IDX files, from data_dir or the download cache.
  # 'tfds': tensorflow-datasets' prepared `mnist` (read with tfds.data_source).
  config.data_source = 'idx'
  # Folder with the four MNIST IDX files (raw or .gz). Empty: the download cache,
  # $XDG_CACHE_HOME/deepdigits/mnist (else ~/.cache/deepdigits/mnist).
  config.data_dir = ''
  # Download the IDX files missing from the cache (each checked by its SHA-256);
  # False never touches the network.
  config.download = True
  # Comma-separated base URLs to download from, tried in turn.
  config.data_mirrors = mnist_download.DEFAULT_MIRRORS
  # tensorflow-datasets data folder for data_source='tfds' ('' = TFDS's default).
  config.tfds_data_dir = ''
  # Images held out of the end of the training set for model selection (0 = none).
  config.validation_size = 0
  # Train on only the first N training images (0 = all); for quick runs and tests.
  config.train_subset = 0
  # Rescale every digit horizontally so that its ink is this many pixels wide, in all
  # splits and in predictions (0 = off; MNIST's own widths are 4-20, median 16).
  # Ciresan et al. 2012's committees: members at different widths err differently.
  config.width_normalization = 0

  # Model.
  # Activation and matmul dtype: 'float32' or 'bfloat16' (parameters, optimizer state
  # and BatchNorm statistics stay float32; bfloat16 matmuls accumulate in float32).
  config.dtype = 'float32'
  # Convolution algorithm: 'native' (lax.conv), 'shifted_matmul' (one GEMM over the
  # nine shifted views, faster on CPU), 'onednn' (oneDNN's convolutions through XLA FFI:
  # CPU, one device per process; bfloat16 only with AVX512-BF16 or AMX), 'winograd'
  # (F(2x2, 3x3) tiles on XLA's matmuls), or 'auto': in the train step on CPU, in
  # float32 onednn for conv1 and conv2 where it runs (else shifted_matmul, winograd) and
  # winograd for conv3 and conv4, in bfloat16 onednn where it runs, else shifted_matmul;
  # native for evaluation and on TPU/GPU. One name for all four convolutions, or four
  # separated by commas ('onednn,onednn,winograd,winograd').
  config.conv_impl = 'auto'
  # Max-pool algorithm: 'native' (nn.max_pool), 'strided_views' (elementwise over four
  # strided views, same gradients, faster on CPU), or 'auto' (strided_views on CPU).
  config.pool_impl = 'auto'
  # Keras' kernel_regularizer=l2(w) on conv4, dense1, dense2: adds w * sum(kernel**2).
  config.l2_weight = 1e-3
  # In training, BatchNorm's batch statistics over groups of this many consecutive
  # images of each global batch (0 = the whole batch). Keras' BatchNormalization under a
  # TPUStrategy uses each replica's own: 64 images on the original's 8-core TPU at batch
  # 512. Must divide batch_size; evaluation and recalibration are unaffected.
  config.bn_group_size = 0

  # Augmentation, on the device inside the train step, a random affine map per image
  # (0 = off for each): shift by up to N pixels on each axis, rotate by up to N degrees,
  # zoom by a factor in [1 - z, 1 + z].
  config.augment_max_shift = 0.0
  config.augment_max_rotation = 0.0
  config.augment_max_zoom = 0.0
  # Elastic distortion after the affine map (Simard et al. 2003), 0 = off: a uniform
  # random displacement field smoothed by a Gaussian of `sigma` pixels, times `alpha`.
  config.augment_elastic_alpha = 0.0
  config.augment_elastic_sigma = 4.0
  # The share of images distorted elastically (each drawn on its own); the rest get the
  # affine map alone.
  config.augment_elastic_probability = 1.0
  # The last N epochs train on the images as they are, every augmentation off (0 = none):
  # the weights and BatchNorm statistics end fitted to undistorted digits.
  config.augment_clean_epochs = 0
  # Cross-entropy against labels smoothed by this much (0 = one-hot, the original).
  config.label_smoothing = 0.0

  # Optimisation: Adam with Keras' defaults.
  config.learning_rate = 1e-3
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-7
  # 'constant' (the original) or 'cosine': linear warm-up over warmup_epochs from 0 to
  # learning_rate, then cosine decay to 0 at the end of num_epochs.
  config.lr_schedule = 'constant'
  config.warmup_epochs = 0.0
  # Keep an exponential moving average of the weights and BatchNorm statistics with this
  # decay (0 = off); when on, evaluation, checkpoint selection and the commands on a
  # workdir use the averages.
  config.ema_decay = 0.0
  # Global batch size, split over all devices (must divide by the device count).
  config.batch_size = 512
  config.num_epochs = 80
  # Reshuffle the training set every epoch (a full permutation from seed and epoch).
  config.shuffle = True
  # Where the train step's batches come from: 'device' (the whole uint8 split put on
  # every device once, each batch sliced by index inside the jitted step) or 'host'
  # (each process sends its rows of every batch; for data larger than device memory).
  config.feed = 'device'
  # Train steps per jitted call (a loop on the device over the device feed's batches):
  # on an accelerator one Python dispatch per step can cost more than the step. Saves
  # and preemption stops fall on dispatch boundaries; the numbers are those of 1.
  config.steps_per_dispatch = 1
  # Seed of the parameter initialisation, dropout and the data order.
  config.seed = 0

  # Evaluation.
  # Global batch size of evaluation; the last partial batch is padded and masked.
  config.eval_batch_size = 1000
  # Before each evaluation, re-estimate BatchNorm statistics as exact averages over
  # this many training batches (train-mode BatchNorm, dropout off); 0 = off. The
  # running statistics are still reported and kept in the checkpoint.
  config.bn_recalibration_batches = 0

  # Checkpoints in workdir/checkpoints (Orbax); a restarted run resumes from the latest.
  config.checkpoint_every_epochs = 1
  # Also save every N steps within epochs (0 = only at epoch ends); for long epochs.
  config.checkpoint_every_steps = 0
  config.max_to_keep = 3

  # Reporting (process 0 only).
  # A progress bar within each epoch (only when stdout is a terminal).
  config.progress = True
  # TensorBoard scalars in workdir (`tensorboard --logdir=WORKDIR`).
  config.tensorboard = True
  # Print the layer table (shapes and parameter counts) at start.
  config.model_summary = True
  # A jax.profiler trace of this many train steps (after the run's first 2) in
  # workdir/profile, for TensorBoard's profile plugin and Perfetto; 0 = none.
  config.profile_steps = 0

  return config
