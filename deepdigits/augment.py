"""Random shifts, rotations, zooms and elastic distortions of a batch, inside the
jitted train step.

Each image gets its own affine map, drawn from the step's key, applied by bilinear
resampling (dm-pix) with black (0) outside the image, as MNIST's background is black;
then, if enabled, its own elastic distortion (Simard et al. 2003: a random displacement
field smoothed by a Gaussian of `elastic_sigma` pixels and scaled by `elastic_alpha`).
With every range at 0 the images are returned untouched (a static choice: no work is
compiled in).
"""

import dm_pix
import jax
import jax.numpy as jnp

ELASTIC_STREAM = 1


def is_enabled(max_shift: float, max_rotation: float, max_zoom: float,
               elastic_alpha: float = 0.0) -> bool:
  return bool(max_shift or max_rotation or max_zoom or elastic_alpha)


def random_affine(rng: jax.Array, max_shift: float, max_rotation: float, max_zoom: float,
                  size: int) -> jax.Array:
  """A 'pull' matrix (output pixel -> input pixel, homogeneous, [4, 4] over (y, x, c))
  that rotates by up to `max_rotation` degrees and zooms by up to `max_zoom` (a fraction)
  about the image centre, then shifts by up to `max_shift` pixels on each axis."""
  angle_key, zoom_key, shift_key = jax.random.split(rng, 3)
  angle = jnp.deg2rad(jax.random.uniform(angle_key, (), minval=-max_rotation,
                                         maxval=max_rotation))
  zoom = jax.random.uniform(zoom_key, (), minval=1 - max_zoom, maxval=1 + max_zoom)
  shift = jax.random.uniform(shift_key, (2,), minval=-max_shift, maxval=max_shift)
  cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
  inverse = jnp.array([[cos, sin], [-sin, cos]])  # the pushed image's inverse map
  centre = jnp.full((2,), (size - 1) / 2)
  offset = centre - inverse @ (centre + shift)
  matrix = jnp.eye(4)
  matrix = matrix.at[:2, :2].set(inverse)
  return matrix.at[:2, 3].set(offset)


def augment_batch(rng: jax.Array, images: jax.Array, max_shift: float = 0.0,
                  max_rotation: float = 0.0, max_zoom: float = 0.0,
                  elastic_alpha: float = 0.0, elastic_sigma: float = 4.0) -> jax.Array:
  """Float images [B, H, W, C] moved by a random affine map each, then elastically
  distorted if `elastic_alpha` > 0 (pure)."""
  if not is_enabled(max_shift, max_rotation, max_zoom, elastic_alpha):
    return images
  moved = images
  if is_enabled(max_shift, max_rotation, max_zoom):
    keys = jax.random.split(rng, images.shape[0])
    matrices = jax.vmap(random_affine, in_axes=(0, None, None, None, None))(
        keys, max_shift, max_rotation, max_zoom, images.shape[1])
    transform = lambda image, matrix: dm_pix.affine_transform(
        image, matrix, order=1, mode='constant', cval=0.0)
    moved = jax.vmap(transform)(moved, matrices)
  if elastic_alpha:
    # Its own stream, so the affine maps stay those of runs made without it.
    keys = jax.random.split(jax.random.fold_in(rng, ELASTIC_STREAM), images.shape[0])
    distort = lambda key, image: dm_pix.elastic_deformation(
        key, image, elastic_alpha, elastic_sigma, order=1, mode='constant', cval=0.0)
    moved = jax.vmap(distort)(keys, moved)
  return moved.astype(images.dtype)
