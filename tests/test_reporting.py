"""What a run reports besides metrics.jsonl: TensorBoard scalars, the progress bar, the
model summary."""

import io
import struct
import time

import pytest
from tensorboardX.proto import event_pb2

from conftest import tiny_config
from deepdigits import metrics_log, model_factory


def read_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the TensorBoard event files of workdir (TFRecord framing: length,
  its CRC, the Event proto, its CRC)."""
  scalars = {}
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_scalars_match_the_metrics_records(tiny_validated_workdir):
  records = metrics_log.MetricsLog(str(tiny_validated_workdir)).records()
  scalars = read_scalars(tiny_validated_workdir)
  for tag, key in (('train/loss', 'train_loss'), ('train/accuracy', 'train_accuracy'),
                   ('test/loss', 'test_loss'), ('test/accuracy', 'test_accuracy'),
                   ('test/accuracy_recalibrated', 'test_accuracy_recalibrated'),
                   ('validation/accuracy', 'validation_accuracy'),
                   ('run/learning_rate', 'learning_rate'),
                   ('train/images_per_second', 'train_images_per_second')):
    assert [step for step, _ in scalars[tag]] == [r['step'] for r in records], tag
    assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in records],
                                                         rel=1e-6), tag
  assert scalars['run/learning_rate'][0][1] == pytest.approx(1e-3)


def test_tensorboard_tags():
  tags = metrics_log.tensorboard_scalars(
      {'epoch': 1, 'step': 5, 'train_loss': 0.5, 'validation_accuracy_recalibrated': 0.9,
       'test_examples': 10, 'learning_rate': 1e-3, 'best_checkpoint': True})
  assert tags == {'train/loss': 0.5, 'validation/accuracy_recalibrated': 0.9,
                  'run/learning_rate': 1e-3}


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_shows_on_a_terminal_only(monkeypatch):
  metrics = {'loss_sum': 2.0, 'count': 4.0}
  terminal = FakeTerminal()
  monkeypatch.setattr('sys.stdout', terminal)
  progress = metrics_log.EpochProgress(True, 1, 3, total_steps=10, first_step=0,
                                       batch_size=4)
  for _ in range(3):
    time.sleep(0.11)  # tqdm redraws at most every 0.1 s
    progress.update(metrics)
  progress.close()
  shown = terminal.getvalue()
  assert 'epoch 1/3' in shown and '3/10' in shown and 'loss 0.5000' in shown

  for enabled, stream in ((False, FakeTerminal()), (True, io.StringIO())):
    monkeypatch.setattr('sys.stdout', stream)
    progress = metrics_log.EpochProgress(enabled, 1, 3, 10, 0, 4)
    progress.update(metrics)
    progress.close()
    assert stream.getvalue() == ''


def test_model_summary_lists_the_layers_and_the_total():
  model = model_factory.make_model(tiny_config(''), differentiated=False)
  summary = model_factory.model_summary(model)
  assert 'Total Parameters: 2,624,394' in summary
  for layer in ('conv1', 'conv4', 'bn6', 'dense1', 'logits'):
    assert layer in summary
  assert '\x1b[' not in summary  # plain text in logs
