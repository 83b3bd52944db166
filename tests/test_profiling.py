"""`--config.profile_steps`: a jax.profiler trace of the train steps asked for, in files
that TensorBoard's profile plugin and Perfetto read, naming the train step."""

import gzip
import json

import jax
import jax.numpy as jnp

from conftest import tiny_config
from deepdigits import profiling, train
from deepdigits.tools import benchmark


def perfetto_events(folder) -> list[dict]:
  (trace,) = folder.rglob('*.trace.json.gz')
  return json.loads(gzip.decompress(trace.read_bytes()))['traceEvents']


def step_numbers(events) -> list[int]:
  """The step numbers of the 'train' step annotations in the trace."""
  return sorted(int(e['args']['step_num']) for e in events
                if e.get('name') == 'train' and 'step_num' in e.get('args', {}))


def test_a_run_traces_the_steps_asked_for_after_its_first_ones(tiny_mnist_dir, tmp_path,
                                                                capsys):
  # The tiny runs' program (8 steps of 64 an epoch); steps 2, 3 and 4 traced.
  train.train_and_evaluate(tiny_config(tiny_mnist_dir, profile_steps=3), str(tmp_path))
  folder = tmp_path / profiling.PROFILE_DIR
  assert len(list(folder.rglob('*.xplane.pb'))) == 1  # what the profile plugin reads
  events = perfetto_events(folder)
  assert step_numbers(events) == [2, 3, 4]
  names = {e.get('name', '') for e in events}
  assert any('train_step' in name for name in names), sorted(names)[:50]
  assert (f'profile of train steps 3-5 written to {folder} (tensorboard '
          f'--logdir={folder})') in capsys.readouterr().out


def test_a_trace_stops_at_the_end_of_the_epoch(tmp_path):
  """The loop calls finish() at each epoch's end: a trace asked for 100 steps of an
  epoch of 6 (here a tiny jitted function's) holds steps 2-5."""
  profiler = profiling.StepProfiler(str(tmp_path), num_steps=100, first_step=0,
                                    say=lambda _: None)
  double = jax.jit(lambda x: 2 * x)
  x = jnp.ones(4)
  for step in range(6):
    profiler.before_step(step)
    with profiler.annotate(step):
      x = double(x)
    profiler.after_step(step + 1, x)
  profiler.finish(x)
  assert step_numbers(perfetto_events(tmp_path / profiling.PROFILE_DIR)) == [2, 3, 4, 5]


def test_the_benchmark_traces_after_its_timing(tiny_mnist_dir, tmp_path, capsys):
  config = tiny_config(tiny_mnist_dir, profile_steps=5)
  result = benchmark.run_benchmark(config, steps=8, windows=1, eval_batches=1,
                                   profile_dir=str(tmp_path))
  assert result['train_steps_run'] == 16  # the timing's steps: the trace came after
  assert step_numbers(perfetto_events(tmp_path)) == [16, 17, 18, 19, 20]
  assert f'profile of 5 train steps written to {tmp_path}' in capsys.readouterr().out
