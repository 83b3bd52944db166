"""Errors that stop a run before any long work, each with a message that names the fix."""


class DeepDigitsError(Exception):
  """A problem with the user's input (data, config, checkpoint, workdir)."""


class DataError(DeepDigitsError):
  """The dataset is missing, unreadable or malformed."""


class ConfigError(DeepDigitsError):
  """A config value is out of range or inconsistent with the machine."""


class WorkdirBusy(ConfigError):
  """Another live run holds the workdir's lock."""


class CheckpointError(DeepDigitsError):
  """A checkpoint cannot be restored into this run."""


class NonFiniteError(DeepDigitsError):
  """The loss or its gradients became NaN or Inf."""


class KerasWeightsError(DeepDigitsError):
  """A Keras weights file is unreadable or not of the DeepDigits network."""


class ImageError(DeepDigitsError):
  """An image file to predict on is missing, unreadable or has no digit in it."""
