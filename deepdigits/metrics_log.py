"""Per-epoch metrics: one readable line on stdout, one JSON line in workdir/metrics.jsonl;
and the lines that `main.py --mode=evaluate` prints."""

import json
import os

import jax


class MetricsLog:
  """Appends epoch records; only process 0 writes in a multi-host run."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = jax.process_index() == 0

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def keep_until(self, step: int) -> None:
    """Drops records written after `step`, the step a resumed run restarts from, so the
    file holds each epoch once."""
    if not self.enabled:
      return
    records = self.records()
    kept = [r for r in records if r['step'] <= step]
    if len(kept) != len(records):
      with open(self.path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(format_record(record), flush=True)


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
