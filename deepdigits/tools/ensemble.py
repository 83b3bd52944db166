"""Ensembles of trained runs:
`python -m deepdigits.tools.ensemble [--checkpoint=best] DIR1 DIR2 ...`
(or the folder of `deepdigits.tools.seeds`, which stands for its seeds' workdirs).

Each member predicts every test image with its own config (`inference.load_trained`:
recalibrated BatchNorm statistics if its run recalibrated), seen as its run saw them
(`width_normalization`); the ensemble's prediction is the mean of the members' softmax
probabilities. Members must be scored on the same test set, checked image by image as
stored. The members' and the ensemble's accuracy, errors and loss
(the negative log-likelihood of the averaged probabilities) are printed and written to
`ensemble.json` beside the first member (or `--out`); so are their scores on the
validation slice when every member held out the same one.
"""

import json
import sys
from typing import Callable, Sequence

import numpy as np
from absl import flags

from deepdigits import inference, rundir, storage
from deepdigits.cli import run_command
from deepdigits.data import as_network_input, load_datasets
from deepdigits.errors import ConfigError

ENSEMBLE_JSON = 'ensemble.json'


# ---------------------------------------------------------------- the combination (pure)


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """Log-probabilities [N, C] of logits [N, C], in float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def scores(log_probs: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy, errors, examples and mean negative log-likelihood of the labels."""
  correct = int(np.sum(log_probs.argmax(-1) == labels))
  return {'accuracy': correct / len(labels),
          'errors': len(labels) - correct,
          'examples': len(labels),
          'loss': float(-np.mean(log_probs[np.arange(len(labels)), labels]))}


def combine(member_logits: Sequence[np.ndarray], labels: np.ndarray) -> dict:
  """{'members': [scores], 'ensemble': scores} of the mean of the members' softmax
  probabilities; the log of the mean is taken stably (log-sum-exp)."""
  if not member_logits:
    raise ValueError('an ensemble needs at least one member')
  log_probs = np.stack([log_softmax(logits) for logits in member_logits])
  mean_log_probs = np.logaddexp.reduce(log_probs, axis=0) - np.log(len(log_probs))
  return {'members': [scores(lp, labels) for lp in log_probs],
          'ensemble': scores(mean_log_probs, labels)}


# ---------------------------------------------------------------- members


def expand_workdirs(paths: Sequence[str]) -> list[str]:
  """Each path as itself if it is a training workdir (it has config.json), else as the
  workdirs in its subfolders (a seeds or sweep folder); a ConfigError otherwise."""
  workdirs = []
  for path in paths:
    if storage.is_file(storage.join(path, rundir.CONFIG_NAME)):
      workdirs.append(path)
      continue
    found = [storage.join(path, name)
             for name in sorted(storage.list_names(path), key=storage.natural_key)
             if storage.is_file(storage.join(path, name, rundir.CONFIG_NAME))]
    if not found:
      raise ConfigError(f'{path!r} is neither a training workdir (no config.json) nor a '
                        'folder of them (a seeds or sweep folder).')
    workdirs.extend(found)
  if not workdirs:
    raise ConfigError('give the workdirs of the members, e.g. runs/a runs/b, or a seeds '
                      'folder.')
  normalized = [storage.resolved(w) for w in workdirs]
  repeated = sorted({w for w in normalized if normalized.count(w) > 1})
  if repeated:
    raise ConfigError(f'{repeated[0]} is given twice.')
  return workdirs


def default_output(workdirs: Sequence[str]) -> str:
  """ensemble.json in the folder that holds the first member."""
  return storage.join(storage.path(storage.absolute(workdirs[0])).parent, ENSEMBLE_JSON)


def _same_split(a, b) -> bool:
  return np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)


def evaluate_ensemble(workdirs: Sequence[str], checkpoint: str = 'latest',
                      say: Callable[[str], None] = print) -> dict:
  """Every member's and the ensemble's scores on the members' (common) test set, and on
  their common validation slice if every member held out the same one: the figure to
  choose members or recipes by, leaving the test set for the report."""
  test = validation = None
  test_logits, validation_logits, members = [], [], []
  for workdir in workdirs:
    trained = inference.load_trained(workdir, checkpoint=checkpoint)
    datasets = load_datasets(trained.config, as_input=False)  # compared as stored
    if test is None:
      test, validation, first = datasets['test'], datasets.get('validation'), workdir
    elif not _same_split(datasets['test'], test):
      raise ConfigError(f'{workdir} is scored on another test set than {first} '
                        f'({len(datasets["test"]):,} and {len(test):,} images, not the '
                        'same); an ensemble needs one.')
    if validation is not None and not (
        'validation' in datasets and _same_split(datasets['validation'], validation)):
      say(f'ensemble: {workdir} did not hold out the same validation slice as the '
          'members before it: no validation scores.')
      validation = None
    say(f'ensemble: {workdir}: step {trained.step}, {len(test):,} test images')
    # Each member sees the images as its own run did (e.g. its width normalisation).
    member_logits = lambda split, trained=trained: inference.predict_logits(
        trained, as_network_input(split.images, trained.config))
    test_logits.append(member_logits(test))
    if validation is not None:
      validation_logits.append(member_logits(validation))
    members.append({'workdir': workdir, 'step': trained.step})
    del trained, member_logits
  result = combine(test_logits, test.labels)
  for member, member_scores in zip(members, result['members']):
    member.update(member_scores)
  summary = {'checkpoint': checkpoint, 'members': members, 'ensemble': result['ensemble'],
             'validation': None}
  if validation is not None:
    validation_result = combine(validation_logits, validation.labels)
    for member, member_scores in zip(members, validation_result['members']):
      member['validation'] = member_scores
    summary['validation'] = validation_result['ensemble']
  return summary


def format_result(result: dict) -> str:
  """The printed table: a line per member, then the ensemble's (test, then validation
  when the members share a validation slice)."""
  width = max(len(m['workdir']) for m in result['members'] + [{'workdir': 'ensemble'}])
  with_validation = result.get('validation') is not None
  scored = lambda s: f'{s["accuracy"]:.4f}  {s["errors"]:>6,}  {s["loss"]:.4f}'
  def line(name, step, test_scores, validation_scores):
    text = f'{name:<{width}}  {step:>7}  {scored(test_scores)}'
    return text + (f'  {scored(validation_scores)}' if with_validation else '')
  header = f'{"member":<{width}}  {"step":>7}  accuracy  errors  loss'
  if with_validation:
    header += '    val. acc  errors  loss'
  lines = [header]
  lines += [line(m['workdir'], m['step'], m, m.get('validation')) for m in result['members']]
  ensemble = result['ensemble']
  lines.append(line('ensemble', '', ensemble, result.get('validation')))
  lines.append(f'ensemble of {len(result["members"])} ({result["checkpoint"]} '
               f'checkpoints, mean of softmax probabilities): accuracy '
               f'{ensemble["accuracy"]:.4f}, {ensemble["errors"]:,} errors of '
               f'{ensemble["examples"]:,}, loss {ensemble["loss"]:.4f}')
  if with_validation:
    validation = result['validation']
    lines.append(f'on the validation slice: accuracy {validation["accuracy"]:.4f}, '
                 f'{validation["errors"]:,} errors of {validation["examples"]:,}, loss '
                 f'{validation["loss"]:.4f}')
  return '\n'.join(lines)


# ---------------------------------------------------------------- command


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when run as a command (absl flags are global)."""
  flags.DEFINE_list('workdirs', [], 'Members (comma-separated), besides those given as '
                    'arguments; a seeds folder stands for its seeds.')
  flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'], "Each member's latest "
                    'checkpoint, or its best (highest validation accuracy).')
  flags.DEFINE_string('out', None, 'Where to write the JSON (default: ensemble.json in '
                      'the folder holding the first member).')


def main(paths):
  workdirs = expand_workdirs(list(paths) + FLAGS.workdirs)
  result = evaluate_ensemble(workdirs, FLAGS.checkpoint)
  print(format_result(result), flush=True)
  out = FLAGS.out or default_output(workdirs)
  try:
    storage.write_text(out, json.dumps(result, indent=2) + '\n')
  except OSError as e:
    sys.exit(f'deepdigits: error: cannot write {out}: {e.strerror}.')
  print(f'written to {out}')


if __name__ == '__main__':
  define_flags()
  run_command(main, takes_args=True)
