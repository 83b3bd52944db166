"""3x3 VALID convolution by Winograd's minimal filtering F(2x2, 3x3) (`conv_impl=
'winograd'`): 16 multiplies for each 2x2 block of outputs and pair of channels where a
direct convolution does 36, 2.25x fewer, in plain JAX on XLA's own matmuls.

Each 2x2 block of outputs comes from a 4x4 tile of the input (tiles overlap by two). The
input tiles and the kernel are each mapped to 16 values (B^T d B and G g G^T), multiplied
position by position over channels (16 [tiles, in] x [in, out] matmuls), and the products
mapped back to 2x2 outputs (A^T m A). In exact arithmetic this is the convolution; in
float32 the results differ from a direct convolution's by rounding (up to about 1e-6 of
the largest value here, `tests/test_model.py`). The gradients run the same tiles
backwards: the output gradient is mapped to 16 values per tile (A g A^T), then the
kernel gradient is 16 [in, tiles] x [tiles, out] matmuls with the saved input tiles (4x
the input's size, kept for the backward pass) and the input gradient 16 [tiles, out] x
[out, in] matmuls with the saved kernel tiles, mapped back (B v B^T) and added where the
tiles overlap: the transpose of the forward map, with as many multiplies as it.

On CPU it is the fastest of the implementations for the layers with many input channels
(conv3 and conv4 of this network, `python -m deepdigits.tools.conv_benchmark`); with few
input channels its transforms cost as much as the multiplies it saves.
"""

import jax
import jax.numpy as jnp


# The transforms of F(2x2, 3x3), each applied along one axis of a tile:
def _input_1d(d0, d1, d2, d3):   # B^T: 4 input values -> 4
  return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _input_1d_t(v0, v1, v2, v3):   # B: 4 -> 4 input values (the input gradient)
  return [v0, v1 - v2 + v3, v1 + v2 - v0, -v3]


def _kernel_1d(g0, g1, g2):      # G: 3 kernel taps -> 4
  return [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]


def _kernel_1d_t(u0, u1, u2, u3):  # G^T: 4 -> 3 taps (the kernel gradient)
  return [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), u3 + 0.5 * (u1 + u2)]


def _output_1d(m0, m1, m2, m3):  # A^T: 4 products -> 2 outputs
  return [m0 + m1 + m2, m1 - m2 - m3]


def _output_1d_t(y0, y1):        # A: 2 output gradients -> 4
  return [y0, y0 + y1, y0 - y1, -y1]


def _both_axes(transform, grid):
  """`transform` along the columns, then the rows, of a grid of arrays ([row][column])."""
  columns = [transform(*[row[c] for row in grid]) for c in range(len(grid[0]))]
  return [transform(*[column[i] for column in columns]) for i in range(len(columns[0]))]


def _flat(grid):
  return [a for row in grid for a in row]


def _grid(flat: list) -> list:
  """The inverse of `_flat`: 16 arrays -> a 4x4 grid ([row][column])."""
  return [flat[4 * i:4 * i + 4] for i in range(4)]


def _input_tiles(x: jax.Array) -> list:
  """[N, H, W, C] with H - 2 and W - 2 even -> 16 arrays [N * tiles, C], B^T d B."""
  n, h, w, c = x.shape
  th, tw = (h - 2) // 2, (w - 2) // 2
  views = [[x[:, a:a + 2 * th:2, b:b + 2 * tw:2, :] for b in range(4)] for a in range(4)]
  return [v.reshape(n * th * tw, c) for v in _flat(_both_axes(_input_1d, views))]


def _kernel_tiles(kernel: jax.Array) -> list:
  """[3, 3, C, O] -> 16 arrays [C, O], G g G^T."""
  return _flat(_both_axes(_kernel_1d, [[kernel[i, j] for j in range(3)] for i in range(3)]))


def _outputs(products: list, n: int, th: int, tw: int) -> jax.Array:
  """16 arrays [N * tiles, O] -> [N, 2 th, 2 tw, O], A^T m A."""
  grid = _grid([p.reshape(n, th, tw, -1) for p in products])
  y = _both_axes(_output_1d, grid)  # y[p][q]: output row p, column q of every 2x2 block
  return jnp.stack([jnp.stack(row, 3) for row in y], 2).reshape(n, 2 * th, 2 * tw, -1)


def _input_gradient(tile_grads: list, n: int, th: int, tw: int) -> jax.Array:
  """The transpose of `_input_tiles`: 16 arrays [N * tiles, C] -> [N, 2 th + 2, 2 tw + 2,
  C], B v B^T of each tile added into the input where the tiles overlap."""
  grid = _both_axes(_input_1d_t, _grid([t.reshape(n, th, tw, -1) for t in tile_grads]))
  # Tile (i, j)'s value (a, b) lands on input row 2 i + a, column 2 j + b. With a = 2 p
  # + q and b = 2 r + s, that is row pair i + p, row q within it (and so for columns):
  # each (p, r) is a [N, th, 2, tw, 2, C] block shifted by one pair or none.
  total = 0
  for p in range(2):
    for r in range(2):
      block = jnp.stack([jnp.stack([grid[2 * p + q][2 * r + s] for s in range(2)], 3)
                         for q in range(2)], 2)
      total = total + jnp.pad(block, ((0, 0), (p, 1 - p), (0, 0), (r, 1 - r), (0, 0),
                                      (0, 0)))
  return total.reshape(n, 2 * th + 2, 2 * tw + 2, -1)


def _output_gradient_tiles(g: jax.Array) -> list:
  """The transpose of `_outputs`: [N, 2 th, 2 tw, O] -> 16 arrays [N * tiles, O]."""
  n, h, w, o = g.shape
  blocks = g.reshape(n, h // 2, 2, w // 2, 2, o)
  grid = [[blocks[:, :, p, :, q, :] for q in range(2)] for p in range(2)]
  return [t.reshape(-1, o) for t in _flat(_both_axes(_output_1d_t, grid))]


def _conv(x: jax.Array, kernel: jax.Array):
  """(the convolution, the input tiles and kernel tiles it multiplied)."""
  n, h, w, _ = x.shape
  tiles, kernel_tiles = _input_tiles(x), _kernel_tiles(kernel)
  products = [t @ k for t, k in zip(tiles, kernel_tiles)]
  return _outputs(products, n, (h - 2) // 2, (w - 2) // 2), tiles, kernel_tiles


@jax.custom_vjp
def _conv_even(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _conv(x, kernel)[0]


def _conv_even_fwd(x, kernel):
  y, tiles, kernel_tiles = _conv(x, kernel)
  return y, (tiles, kernel_tiles)


def _conv_even_bwd(residuals, g):
  tiles, kernel_tiles = residuals
  n, h, w, _ = g.shape
  g_tiles = _output_gradient_tiles(g)
  products = [t.T @ d for t, d in zip(tiles, g_tiles)]
  kernel_grad = _both_axes(_kernel_1d_t, _grid(products))
  x_grad = _input_gradient([d @ k.T for d, k in zip(g_tiles, kernel_tiles)], n, h // 2,
                           w // 2)
  return x_grad, jnp.stack([jnp.stack(row) for row in kernel_grad])


_conv_even.defvjp(_conv_even_fwd, _conv_even_bwd)


def conv3x3_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same function as `lax.conv_general_dilated` (3x3 VALID, stride 1, NHWC, HWIO),
  computed as F(2x2, 3x3) Winograd tiles in the dtype of its inputs. An odd output height
  or width is computed one larger, on a zero row or column, and cut back."""
  odd_h, odd_w = (x.shape[1] - 2) % 2, (x.shape[2] - 2) % 2
  if odd_h or odd_w:
    y = _conv_even(jnp.pad(x, ((0, 0), (0, odd_h), (0, odd_w), (0, 0))), kernel)
    return y[:, :y.shape[1] - odd_h, :y.shape[2] - odd_w]
  return _conv_even(x, kernel)
