"""deepdigits: the DeepDigits convolutional network on MNIST, in JAX/Flax."""
