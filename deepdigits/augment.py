"""Random shifts, rotations, zooms and elastic distortions of a batch, inside the
jitted train step.

Each image gets its own affine map, drawn from the step's key, and, if enabled, its own
elastic distortion (Simard et al. 2003: a random displacement field smoothed by a
Gaussian of `elastic_sigma` pixels and scaled by `elastic_alpha`), on all images or on
each with `elastic_probability`. Both are one pull map from output to input pixels, so
each image is resampled once, bilinearly (dm-pix), with black (0) outside the image, as
MNIST's background is black: resampling twice would blur every digit twice. With every
range at 0 the images are returned untouched (a static choice: no work is compiled in).
"""

import dm_pix
import jax
import jax.numpy as jnp

ELASTIC_STREAM = 1
ELASTIC_CHOICE_STREAM = 2


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


def displacement_field(rng: jax.Array, shape: tuple[int, int], alpha: float,
                       sigma: float) -> jax.Array:
  """dm-pix's elastic displacement field of an [H, W] image, [2, H, W, 1] over (y, x):
  uniform noise in [-1, 1] per axis, smoothed by a Gaussian of `sigma` pixels (dm-pix's
  kernel size), times `alpha`. The same key gives the field dm_pix.elastic_deformation
  draws; here it is composed with the affine map rather than resampled on its own."""
  kernel_size = ((sigma - 0.8) / 0.3 + 1) / 0.5 + 1
  noise = lambda key: jax.random.uniform(key, shape + (1,)) * 2 - 1
  return jnp.stack([dm_pix.gaussian_blur(noise(key), sigma, kernel_size) * alpha
                    for key in jax.random.split(rng)])


def pull_coordinates(matrix: jax.Array, displacement: jax.Array,
                     shape: tuple[int, ...]) -> jax.Array:
  """Input coordinates [3, H, W, C] of each output pixel of an [H, W, C] image: the pixel
  moved by `displacement` ([2, H, W, 1]), then pulled through the affine `matrix`."""
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape],
                                indexing='ij'))
  grid = grid.at[:2].add(displacement)
  return jnp.einsum('ij,j...->i...', matrix[:3, :3], grid) + matrix[:3, 3, None, None, None]


def augment_batch(rng: jax.Array, images: jax.Array, max_shift: float = 0.0,
                  max_rotation: float = 0.0, max_zoom: float = 0.0,
                  elastic_alpha: float = 0.0, elastic_sigma: float = 4.0,
                  elastic_probability: float = 1.0) -> jax.Array:
  """Float images [B, H, W, C] moved by a random affine map each and, if `elastic_alpha`
  > 0, elastically distorted (each with `elastic_probability`), in one resampling
  (pure)."""
  if not is_enabled(max_shift, max_rotation, max_zoom, elastic_alpha):
    return images
  batch, size = images.shape[0], images.shape[1]
  if is_enabled(max_shift, max_rotation, max_zoom):
    keys = jax.random.split(rng, batch)
    matrices = jax.vmap(random_affine, in_axes=(0, None, None, None, None))(
        keys, max_shift, max_rotation, max_zoom, size)
  else:
    matrices = jnp.broadcast_to(jnp.eye(4), (batch, 4, 4))
  if not elastic_alpha:
    transform = lambda image, matrix: dm_pix.affine_transform(
        image, matrix, order=1, mode='constant', cval=0.0)
    return jax.vmap(transform)(images, matrices).astype(images.dtype)
  # Their own streams, so the affine maps stay those of runs made without them.
  elastic_rng = jax.random.fold_in(rng, ELASTIC_STREAM)
  fields = jax.vmap(displacement_field, in_axes=(0, None, None, None))(
      jax.random.split(elastic_rng, batch), images.shape[1:3], elastic_alpha, elastic_sigma)
  if elastic_probability < 1:
    chosen = jax.random.bernoulli(jax.random.fold_in(rng, ELASTIC_CHOICE_STREAM),
                                  elastic_probability, (batch,))
    fields = jnp.where(chosen[:, None, None, None, None], fields, 0.0)
  resample = lambda image, matrix, field: dm_pix.flat_nd_linear_interpolate_constant(
      image, pull_coordinates(matrix, field, image.shape), cval=0.0)
  return jax.vmap(resample)(images, matrices, fields).astype(images.dtype)
