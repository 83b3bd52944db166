"""The original DeepDigits recipe: Adam 1e-3, batch 512, 80 epochs, reshuffled each
epoch, with the inputs scaled to [0, 1] (the original forgot) and all 10,000 test
images scored."""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 512
  config.learning_rate = 1e-3
  config.num_epochs = 80
  config.shuffle = True
  return config
