"""What a run reports: one readable line per epoch on stdout, the same as a JSON line in
workdir/metrics.jsonl and as TensorBoard scalars in workdir/, and a progress bar within
each epoch. Only process 0 reports in a multi-host run. Also the lines that
`main.py --mode=evaluate` prints."""

import json
import os
import shutil
import sys
import tempfile
import time

import jax
import tqdm
from tensorboardX import SummaryWriter

from deepdigits import storage
from deepdigits.errors import DeepDigitsError

# Record keys that are not TensorBoard scalars.
NOT_SCALARS = ('epoch', 'step', 'best_checkpoint')
SPLITS = ('train', 'validation', 'test')


class MetricsLog:
  """Appends epoch records; only process 0 writes in a multi-host run."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.workdir = workdir
    self.path = storage.join(workdir, 'metrics.jsonl')
    self.enabled = jax.process_index() == 0
    self.tensorboard = tensorboard and self.enabled
    self._writer = None
    self._local_events = None  # the writer's local folder for a gs:// workdir
    self.cut_off = False  # set by records(): the file's last line was cut off

  def records(self) -> list[dict]:
    """The epoch records; a last line cut off by a kill mid-write is left out (and
    `cut_off` set), a damaged line before it is a DeepDigitsError naming it."""
    self.cut_off = False
    if not storage.exists(self.path):
      return []
    lines = [line for line in storage.read_text(self.path).splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if number < len(lines):
          raise DeepDigitsError(f'{self.path}: line {number} is not a JSON record; the '
                                'file is damaged (fix or remove that line).') from None
        self.cut_off = True
    return records

  def keep_until(self, step: int) -> None:
    """Drops records written after `step`, the step a resumed run restarts from, so the
    file holds each epoch once."""
    if not self.enabled:
      return
    records = self.records()
    kept = [r for r in records if r['step'] <= step]
    if self.cut_off:
      print(f'deepdigits: warning: the last line of {self.path} was cut off (a stop '
            'mid-write); removed, and the run goes on from its last checkpoint.',
            flush=True)
    if len(kept) != len(records) or self.cut_off:
      storage.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    storage.append_text(self.path, json.dumps(record) + '\n')
    print(format_record(record), flush=True)
    if self.tensorboard:
      if self._writer is None:
        self._writer = SummaryWriter(self._events_dir())
      for tag, value in tensorboard_scalars(record).items():
        self._writer.add_scalar(tag, value, record['step'])
      self._writer.flush()
      self._upload_events()

  def _events_dir(self) -> str:
    """Where tensorboardX writes: the workdir, or for an object store a local folder
    whose files are copied there after each epoch (through `storage`, as every other
    file of the run)."""
    if not storage.is_remote(self.workdir):
      return self.workdir
    self._local_events = tempfile.mkdtemp(prefix='deepdigits-events-')
    return self._local_events

  def _upload_events(self) -> None:
    if self._local_events:
      for name in os.listdir(self._local_events):
        with open(os.path.join(self._local_events, name), 'rb') as f:
          storage.write_bytes(storage.join(self.workdir, name), f.read())

  def __enter__(self) -> 'MetricsLog':
    return self

  def __exit__(self, error_type, error, traceback) -> None:
    self.close(upload=error_type is None)

  def close(self, upload: bool = True) -> None:
    """Closes the TensorBoard writer and removes its local folder. A run stopped by an
    error or a signal closes with upload=False: each record's events were copied when
    it was written, and a failing copy must not hide the error that stopped the run."""
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    try:
      if upload:
        self._upload_events()
    finally:
      if self._local_events:
        shutil.rmtree(self._local_events, ignore_errors=True)
        self._local_events = None


def tensorboard_scalars(record: dict) -> dict[str, float]:
  """A record's numbers as TensorBoard tags: 'test_accuracy' -> 'test/accuracy', so each
  split is a section; the rest (learning rate, speed, memory) under 'run/'."""
  scalars = {}
  for key, value in record.items():
    if key in NOT_SCALARS or key.endswith('_examples') or not isinstance(value, (int, float)):
      continue
    split, _, rest = key.partition('_')
    scalars[f'{split}/{rest}' if split in SPLITS else f'run/{key}'] = float(value)
  return scalars


class EpochProgress:
  """A progress bar over an epoch's steps with images/s and the running loss; only on
  process 0, only when stdout is a terminal, and not with --config.progress=False."""

  def __init__(self, enabled: bool, epoch: int, num_epochs: int, total_steps: int,
               first_step: int, batch_size: int):
    self.batch_size = batch_size
    self.enabled = enabled and jax.process_index() == 0 and sys.stdout.isatty()
    self.loss_sum = self.count = 0.0
    self._start, self._steps = time.perf_counter(), 0
    if self.enabled:
      self._bar = tqdm.tqdm(total=total_steps, initial=first_step, file=sys.stdout,
                            desc=f'epoch {epoch}/{num_epochs}', unit='step', leave=False,
                            dynamic_ncols=True)

  def update(self, finished_step_metrics, steps: int = 1) -> None:
    """Called with the (host) metrics of each dispatch of `steps` steps once it has
    finished (their sums)."""
    if not self.enabled:
      return
    self.loss_sum += float(finished_step_metrics['loss_sum'])
    self.count += float(finished_step_metrics['count'])
    self._steps += steps
    rate = self._steps * self.batch_size / (time.perf_counter() - self._start)
    self._bar.set_postfix_str(f'loss {self.loss_sum / self.count:.4f}  {rate:.0f} img/s',
                              refresh=False)
    self._bar.update(steps)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()


def format_record(r: dict) -> str:
  """The stdout line of one epoch."""
  line = (f"epoch {r['epoch']:3d}  step {r['step']:6d}  "
          f"train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}  ")
  if 'validation_accuracy' in r:
    line += f"val loss {r['validation_loss']:.4f} acc {r['validation_accuracy']:.4f}  "
  line += f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}"
  if 'test_accuracy_recalibrated' in r:
    line += f" (BN recalibrated {r['test_accuracy_recalibrated']:.4f})"
  line += (f"  {r['epoch_seconds']:.1f} s  "
           f"{r['train_images_per_second']:.0f} img/s")
  return line


def format_evaluation(result: dict) -> str:
  """The lines of `inference.evaluate_workdir`'s result: a line per split and BatchNorm
  statistics (running, and recalibrated if the run recalibrates)."""
  epoch = f' (epoch {result["epoch"]})' if 'epoch' in result else ''
  lines = [f'{result["workdir"]}: {result["checkpoint"]} checkpoint, step '
           f'{result["step"]}{epoch}']
  for name in ('test', 'validation'):
    for suffix, stats in (('', 'running'), ('_recalibrated', 'recalibrated')):
      if f'{name}_accuracy{suffix}' in result:
        lines.append(
            f'{name:<10}  loss {result[f"{name}_loss{suffix}"]:.4f}  accuracy '
            f'{result[f"{name}_accuracy{suffix}"]:.4f}  errors '
            f'{result[f"{name}_errors{suffix}"]:,} of {result[f"{name}_examples"]:,}  '
            f'({stats} BatchNorm statistics)')
  return '\n'.join(lines)
