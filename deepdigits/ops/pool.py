"""2x2 max pooling from four strided views (`pool_impl='strided_views'`): the same
values and gradients as `nn.max_pool`, with an elementwise gradient on CPU."""

import jax
import jax.numpy as jnp


def _pool_views(x: jax.Array):
  """The four positions of every 2x2 window, in row-major order."""
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def max_pool_2x2_strided(x: jax.Array) -> jax.Array:
  """2x2, stride-2 max pooling (even height and width) from four strided views.

  The same values and gradients as `nn.max_pool` (on ties the first maximum in the
  window takes the gradient, as XLA's select-and-scatter does); on CPU XLA lowers the
  gradient of `reduce_window` to a slow variadic reduction, and this is elementwise.
  """
  a, b, c, d = _pool_views(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x):
  y = max_pool_2x2_strided(x)
  return y, (x, y)


def _max_pool_bwd(residuals, g):
  x, y = residuals
  a, b, c, _ = _pool_views(x)
  first_a = a == y
  first_b = (b == y) & ~first_a
  first_c = (c == y) & ~(first_a | first_b)
  first_d = ~(first_a | first_b | first_c)
  ga, gb, gc, gd = (jnp.where(t, g, jnp.zeros_like(g))
                    for t in (first_a, first_b, first_c, first_d))
  n, h, w, ch = g.shape
  top = jnp.stack([ga, gb], 3).reshape(n, h, 2 * w, ch)
  bottom = jnp.stack([gc, gd], 3).reshape(n, h, 2 * w, ch)
  return (jnp.stack([top, bottom], 2).reshape(n, 2 * h, 2 * w, ch),)


max_pool_2x2_strided.defvjp(_max_pool_fwd, _max_pool_bwd)
