"""Dropout's keep masks from 8 random bits an element where that is exact.

`jax.random.bernoulli` draws a 32-bit word (a threefry hash) for every element; the
network's four masks take 1.8 million of them a batch of 128, a tenth of a bfloat16 train
step on CPU. A keep probability that is a whole number of 256ths (the network's 0.75 and
0.5) is met exactly by one byte of a word: the element is kept where its byte is below
256 * keep_prob, so each word serves four elements and the hashes drop to a quarter.
"""

import jax
import jax.numpy as jnp

BYTE_VALUES = 256


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """A boolean mask of `shape`, each element True with probability `keep_prob`,
  independently: from bytes of random words where keep_prob * 256 is whole and the last
  dimension divides by 4, else from `jax.random.bernoulli`."""
  threshold = keep_prob * BYTE_VALUES
  if threshold != int(threshold) or not shape or shape[-1] % 4:
    return jax.random.bernoulli(key, keep_prob, shape)
  words = jax.random.bits(key, shape[:-1] + (shape[-1] // 4,), jnp.uint32)
  # Byte j of each word decides the j-th quarter of the last dimension.
  return jnp.concatenate(
      [((words >> (8 * j)) & (BYTE_VALUES - 1)) < int(threshold) for j in range(4)], axis=-1)
