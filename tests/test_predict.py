"""Prediction on image files: MNIST digits pass through, real-looking digits are made
MNIST-like, and bad files are reported one line each while the others are predicted."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from deepdigits import inference, preprocess
from deepdigits.errors import ImageError
from deepdigits.tools import predict

NUM_DIGITS = 200


def correlation(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def best_shift_correlation(a: np.ndarray, b: np.ndarray) -> float:
  """The correlation of a and b with a moved by at most one pixel each way: centring by
  centre of mass is to whole pixels (as MNIST's was), so a digit whose centre of mass
  sits near a half pixel can land one pixel off after resampling."""
  return max(correlation(np.roll(a, (dy, dx), (0, 1)), b)
             for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def drawn_on_paper(digit: np.ndarray, top: int = 30, left: int = 250) -> np.ndarray:
  """An MNIST digit [28, 28] as a user's drawing: 3x larger, dark ink on a white
  400x300 canvas, far from the centre."""
  big = Image.fromarray(255 - digit).resize((84, 84), Image.Resampling.BICUBIC)
  canvas = Image.new('L', (400, 300), 255)
  canvas.paste(big, (left, top))
  return np.asarray(canvas)


LINE = re.compile(r'^(.+): (\d)  \((\d) p=(\S+), (\d) p=(\S+), (\d) p=(\S+)\)$')


def assert_lines_predict(lines, paths, logits):
  """Each printed line names its file, the most likely digit and the top three with
  their probabilities: those of the softmax of `logits`, computed here in float64."""
  probabilities = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float64)
  probabilities /= probabilities.sum(-1, keepdims=True)
  assert len(lines) == len(paths)
  for line, path, p in zip(lines, paths, probabilities):
    match = LINE.match(line)
    assert match, line
    name, digit, *ranked = match.groups()
    top = [int(d) for d in ranked[::2]]
    assert name == path and int(digit) == top[0] == int(np.argmax(p)), line
    assert top == list(np.argsort(-p, kind='stable')[:3]), line
    for d, printed in zip(top, ranked[1::2]):
      np.testing.assert_allclose(float(printed), p[d], rtol=1e-3, atol=5e-5, err_msg=line)


def test_a_prediction_line_shows_the_digit_and_the_top_three():
  probabilities = np.array([1e-6, 2e-6, 0.0012, 3.1e-5, 0, 0, 0, 0.9981, 4e-6, 3e-6])
  assert predict.format_prediction('digits/a.png', probabilities) == (
      'digits/a.png: 7  (7 p=0.9981, 2 p=0.0012, 3 p=3.1e-05)')
  assert predict.format_prediction('b.png', np.full(10, 0.1)) == (
      'b.png: 0  (0 p=0.1000, 1 p=0.1000, 2 p=0.1000)')  # a tie: the lower digits first


@pytest.fixture(scope='module')
def trained(tiny_trained_workdir):
  return inference.load_trained(tiny_trained_workdir)


def test_mnist_digits_saved_as_png_are_predicted_as_the_arrays(mnist, trained, tiny_trained_workdir,
                                                         tmp_path, capsys):
  test = mnist['test']
  paths = []
  for i in range(20):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(test.images[i, ..., 0]).save(paths[-1])
  read_back = np.stack([predict.load_image(p) for p in paths])
  np.testing.assert_array_equal(read_back, test.images[:20])  # 28x28: taken as given

  assert predict.predict_files(tiny_trained_workdir, paths) == 0
  logits = inference.predict_logits(trained, test.images[:20])
  assert_lines_predict(capsys.readouterr().out.splitlines(), paths, logits)


def test_a_large_inverted_off_centre_digit_is_made_mnist_like(mnist):
  originals = mnist['test'].images[:NUM_DIGITS, ..., 0]
  made = [preprocess.to_mnist(drawn_on_paper(d)) for d in originals]
  scores = np.array([best_shift_correlation(m, d) for m, d in zip(made, originals)])
  assert np.mean(scores > 0.9) >= 0.95, np.sort(scores)[:10]
  assert scores.min() > 0.8, np.sort(scores)[:10]  # the worst: thin 1s, resampled
  for m in made:  # centred like MNIST: centre of mass within half a pixel of (14, 14)
    np.testing.assert_allclose(preprocess.centre_of_mass(m.astype(np.float64)),
                               (14, 14), atol=0.5 + 1e-9)


def test_drawn_digits_are_predicted_as_their_originals(mnist, trained, tmp_path):
  # The tiny test run is a weak model (about 90% right), so digits near its decision
  # boundaries are left out: those it gets right on the original with p >= 0.9.
  # (The cpu_quick run, 98.7%, kept 99.5% of all 2,000 right ones; see README.)
  test = mnist['test']
  paths = []
  for i in range(NUM_DIGITS):  # JPEG, as a phone or a paint program would save it
    paths.append(str(tmp_path / f'{i}.jpg'))
    Image.fromarray(drawn_on_paper(test.images[i, ..., 0])).save(paths[-1], quality=90)
  made = np.stack([predict.load_image(p) for p in paths])
  on_originals = predict.softmax(
      inference.predict_logits(trained, test.images[:NUM_DIGITS]).astype(np.float64))
  on_made = inference.predict_logits(trained, made).argmax(-1)
  labels = test.labels[:NUM_DIGITS]
  sure = (on_originals.argmax(-1) == labels) & (on_originals.max(-1) >= 0.9)
  assert sure.sum() >= NUM_DIGITS // 2, sure.sum()  # enough digits to mean something
  assert np.mean(on_made[sure] == labels[sure]) >= 0.98, np.mean(on_made[sure] == labels[sure])


def test_grey_paper_and_faint_noise_do_not_count_as_ink(mnist):
  digit = mnist['test'].images[0, ..., 0]
  rng = np.random.default_rng(0)
  photo = 200 - 0.6 * (255 - drawn_on_paper(digit, top=150, left=20))  # ink 47, paper 200
  photo = photo + rng.normal(0, 6, photo.shape)  # noise of a camera sensor
  made = preprocess.to_mnist(np.clip(photo, 0, 255))
  assert best_shift_correlation(made, digit) > 0.9


def test_a_transparent_drawing_reads_as_ink_on_paper(mnist, tmp_path):
  digit = mnist['test'].images[1, ..., 0]
  rgba = np.zeros((28 * 3, 28 * 3, 4), np.uint8)  # black ink, alpha = the ink
  rgba[..., 3] = np.asarray(Image.fromarray(digit).resize((84, 84), Image.Resampling.BICUBIC))
  Image.fromarray(rgba).save(tmp_path / 'drawing.png')
  made = predict.load_image(str(tmp_path / 'drawing.png'))[..., 0]
  assert best_shift_correlation(made, digit) > 0.9


@pytest.mark.parametrize('gray', [np.full((60, 40), 255.0), np.full((28, 28), 0.0),
                                  np.random.default_rng(0).normal(128, 5, (50, 50))])
def test_a_blank_image_is_an_error(gray):
  with pytest.raises(ImageError, match='blank image'):
    predict.mnist_image(gray)


def test_28x28_images_are_taken_as_given_unless_asked(mnist):
  digit = mnist['test'].images[3, ..., 0].astype(np.float32)
  np.testing.assert_array_equal(predict.mnist_image(digit)[..., 0], digit)
  np.testing.assert_array_equal(predict.mnist_image(255 - digit)[..., 0], digit)  # inverted
  made = predict.mnist_image(digit, preprocess_28x28=True)[..., 0]
  assert best_shift_correlation(made, digit) > 0.9


def test_bad_files_are_reported_and_the_others_predicted(mnist, tiny_trained_workdir,
                                                         tmp_path):
  good = tmp_path / 'seven.png'
  Image.fromarray(mnist['test'].images[0, ..., 0]).save(good)
  (tmp_path / 'notes.txt').write_text('not a picture')
  Image.new('L', (64, 48), 255).save(tmp_path / 'blank.png')
  (tmp_path / 'cut.png').write_bytes(good.read_bytes()[:60])
  (tmp_path / 'folder.png').mkdir()
  bad = {'missing.png': 'no such file', 'notes.txt': 'not an image file',
         'blank.png': 'blank image', 'cut.png': 'unreadable image',
         'folder.png': 'is a directory'}
  paths = [str(tmp_path / name) for name in bad] + [str(good)]
  result = subprocess.run(
      [sys.executable, '-m', 'deepdigits.tools.predict', f'--workdir={tiny_trained_workdir}',
       *paths], cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('deepdigits:')]
  assert len(errors) == len(bad), result.stderr
  for line, (name, message) in zip(errors, bad.items()):
    assert line.startswith(f'deepdigits: error: {tmp_path / name}: {message}'), line
  (line,) = result.stdout.splitlines()
  assert line.startswith(f'{good}: ') and line.count(' p=') == 3, line


def test_a_run_with_normalised_widths_predicts_normalised_images(mnist, tiny_trained_workdir,
                                                                 tmp_path, capsys):
  # The tiny run's checkpoint, recorded as if it had trained on 14-pixel-wide digits.
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_trained_workdir, workdir)
  recorded = json.loads((workdir / 'config.json').read_text())
  recorded['width_normalization'] = 14
  (workdir / 'config.json').write_text(json.dumps(recorded))
  images = mnist['test'].images[:5]
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image[..., 0]).save(paths[-1])
  assert predict.predict_files(str(workdir), paths) == 0
  trained = inference.load_trained(str(workdir))
  expected = inference.predict_logits(trained, preprocess.normalize_width(images, 14))
  plain = inference.predict_logits(trained, images)
  assert not np.allclose(expected, plain)  # the normalisation matters to the network
  assert_lines_predict(capsys.readouterr().out.splitlines(), paths, expected)
