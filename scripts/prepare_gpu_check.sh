#!/usr/bin/env bash
# Lays out gpu_check/ for scripts/gpu_check.sh, on a machine with a network: the wheels
# that the accelerator machine lacks (it has jax with its CUDA plugin, flax, optax,
# orbax-checkpoint, chex and PyTorch, and no network), the four MNIST files, and the
# PyTorch peer trainer. gpu_check/ is git-ignored; send it with the tree.
#   scripts/prepare_gpu_check.sh MNIST_DIR TORCH_PEER_SCRIPT
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${1:?usage: scripts/prepare_gpu_check.sh MNIST_DIR TORCH_PEER_SCRIPT}
peer=${2:?usage: scripts/prepare_gpu_check.sh MNIST_DIR TORCH_PEER_SCRIPT}
rm -rf gpu_check
mkdir -p gpu_check/wheels gpu_check/mnist
# Pure-Python wheels for the machine's Python 3.12: what deepdigits imports beyond the
# machine's packages (ml-collections, dm-pix, tensorboardX, tqdm) and pytest with its own.
python -m pip download --quiet --only-binary=:all: --python-version 3.12 --no-deps \
  -d gpu_check/wheels ml-collections dm-pix tensorboardX tqdm pytest pluggy iniconfig \
  pygments
# Pillow (deepdigits.preprocess, which the data module imports) as the cp312 x86-64 wheel.
python -m pip download --quiet --only-binary=:all: --python-version 3.12 --no-deps \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 -d gpu_check/wheels pillow
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
            t10k-labels-idx1-ubyte; do
  cp "$mnist/$name.gz" gpu_check/mnist/
done
cp "$peer" gpu_check/torch_baseline.py
du -sh gpu_check
