"""A `jax.profiler` trace of a few train steps: `--config.profile_steps=N` traces N steps
of a run, from its WARMUP_STEPS-th on (its first steps pay one-off costs), into
`workdir/profile/`: the XSpace files that TensorBoard's profile plugin (xprof) reads
(`tensorboard --logdir=WORKDIR/profile`) and a Perfetto trace (`*.trace.json.gz`, for
ui.perfetto.dev). Each step is annotated as a step of 'train', so the plugin's step view
splits the trace by step.
"""

import os
import shutil
import tempfile
from typing import Callable, Optional

import jax

from deepdigits import storage

PROFILE_DIR = 'profile'
WARMUP_STEPS = 2


class StepProfiler:
  """Starts the trace before the run's step first_step + WARMUP_STEPS and stops it after
  num_steps steps, or at the end of that epoch if it comes first (process 0 only)."""

  def __init__(self, workdir: str, num_steps: int, first_step: int,
               say: Callable[[str], None] = print):
    self.workdir, self.say = workdir, say
    enabled = num_steps > 0 and jax.process_index() == 0
    self.start = first_step + WARMUP_STEPS if enabled else None
    self.stop = None if self.start is None else self.start + num_steps
    self.tracing_since: Optional[int] = None
    self.last_step: Optional[int] = None
    self._local: Optional[str] = None

  def annotate(self, step: int):
    """The context a step is dispatched in: a 'train' step annotation while tracing."""
    if self.tracing_since is None:
      return _NoAnnotation()
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def before_step(self, step: int, steps: int = 1) -> None:
    """Before the dispatch of `steps` steps from `step`: starts the trace if it holds
    the first step to trace."""
    if self.start is not None and self.tracing_since is None and (
        step <= self.start < step + steps):
      folder = storage.join(self.workdir, PROFILE_DIR)
      if storage.is_remote(folder):  # written here, then copied up
        self._local = tempfile.mkdtemp(prefix='deepdigits-profile-')
        folder = self._local
      jax.profiler.start_trace(folder, create_perfetto_trace=True)
      self.tracing_since = step

  def after_step(self, step: int, state) -> None:
    """After the step that ends at `step`; the trace waits for the device to finish."""
    if self.tracing_since is not None:
      self.last_step = step
      if step >= self.stop:
        self.finish(state)

  def finish(self, state) -> None:
    """Stops a trace in progress (at the last traced step, or at the epoch's end)."""
    if self.tracing_since is None:
      return
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    steps = f'steps {self.tracing_since + 1}-{self.last_step}'
    self.tracing_since, self.start = None, None
    folder = storage.join(self.workdir, PROFILE_DIR)
    if self._local:
      for root, _, files in os.walk(self._local):
        for name in files:
          path = os.path.join(root, name)
          with open(path, 'rb') as f:
            storage.write_bytes(storage.join(folder, os.path.relpath(path, self._local)),
                                f.read())
      shutil.rmtree(self._local, ignore_errors=True)
      self._local = None
    self.say(f'profile of train {steps} written to {folder} (tensorboard --logdir={folder})')


class _NoAnnotation:

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False
