"""The same network trained for accuracy: on-device shifts, rotations and zooms, a
cosine learning-rate schedule with warm-up, label smoothing, weights averaged for
evaluation, 12 epochs, and 5,000 training images held out for model selection. Each
ingredient is one field; set it to 0 / 'constant' to see what it buys."""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 128
  config.num_epochs = 12  # 99.67% +- 0.03% recal. over 6 seeds; 20 epochs did no better
  config.validation_size = 5000
  config.augment_max_shift = 2.0
  config.augment_max_rotation = 10.0
  config.augment_max_zoom = 0.1
  config.label_smoothing = 0.1
  config.lr_schedule = 'cosine'
  config.learning_rate = 2e-3
  config.warmup_epochs = 1.0
  config.ema_decay = 0.999
  config.bn_recalibration_batches = 50
  return config
