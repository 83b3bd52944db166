"""A short run for a CPU: one epoch at batch 128, then BatchNorm statistics re-estimated
on 50 training batches before scoring all 10,000 test images (>= 98%; see README)."""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 128
  config.num_epochs = 1
  config.bn_recalibration_batches = 50
  return config
