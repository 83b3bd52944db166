"""SIGTERM and SIGINT become a request that the training loop honours between steps:
save a checkpoint at the current step, wait for it, and exit with a message."""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepdigits.errors import DeepDigitsError

# In multi-host runs the hosts agree on the stop step with an all-gather this often.
SYNC_EVERY_STEPS = 10


class Preempted(DeepDigitsError):
  """The run stopped on a signal after saving its checkpoint."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


class PreemptionGuard:
  """Catches SIGTERM/SIGINT for the duration of a `with` block.

  A first signal is recorded; a second one of the same kind gets the default action
  (an impatient Ctrl-C twice still stops at once).
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def should_stop(self, step: int, steps: int = 1) -> bool:
    """True when the run must stop after `step`, reached by a dispatch of `steps` steps;
    every host answers the same (they agree at each dispatch that crosses a multiple of
    SYNC_EVERY_STEPS)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if step // SYNC_EVERY_STEPS == (step - steps) // SYNC_EVERY_STEPS:
      return False
    flags = multihost_utils.process_allgather(np.array(self.signum or 0, np.int32))
    if self.signum is None and np.any(flags):
      self.signum = int(np.max(flags))
    return bool(np.any(flags))

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ''
