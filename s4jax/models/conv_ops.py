"""A convolution whose weight gradient is a matrix product on CPU.

On the 2-core machines here XLA:CPU computes the weight gradient of a convolution (its
"backward-filter" convolution, whose window is the whole output image) at 7-63 GFLOP/s:
2.5-4x the time of its forward pass or its input gradient (ResNet-50 + DeepLabV3+ layers;
benchmarks/conv_grad.py prints the three per layer shape). The same gradient is a
sum of matrix products,

    dW[i, j, c, o] = sum over (n, y, x) of  X_pad[n, s*y + d*i, s*x + d*j, c] * dY[n, y, x, o]

(s the stride, d the dilation). `weight_grad_by_matmul` computes it one kernel row at a
time: the k shifted views of row i, side by side, form an [N*H'*W', k*C] matrix whose
transpose times dY [N*H'*W', O] is dW[i]. For a 1x1 convolution that is one product of the
input and the cotangent as they are, 5-10x faster than XLA:CPU's backward-filter convolution;
for k x k convolutions 1.1-2.8x, but XLA then holds 1.8x the temporaries (ResNet-50 +
DeepLabV3+ at 321: 5.0 vs 2.6 GiB; the cause is not found: neither the padding copy nor
the row matrices, nor the order of the two gradients). The forward pass and the input
gradient stay XLA's; the result equals XLA's gradient up to float32 summation order.

`WEIGHT_GRAD_ENV` picks the convolutions that get it: "pointwise" (1x1 only; no memory
cost), "all" (every ungrouped 2-D convolution; fastest, more memory), "xla" (none), or
"auto" (the default): "pointwise" on CPU, "xla" on accelerators, whose backward-filter
convolutions are fast. It is read when a step is traced (an A/B comparison in one process:
`benchmarks/train_step.py --env_b=...`). Grouped (depthwise), input-dilated and non-2D
convolutions always use XLA's.

`DILATED_ENV` ("auto" | "taps" | "xla") handles a second CPU cost: a dilated stride-1
convolution on a small map mostly multiplies zero padding, which XLA computes. With "auto"
(the default) such a convolution, when at most `TAPS_MAX_REACHABLE_SHARE` of its dense
multiply-adds read pixels, becomes `conv_by_taps` on CPU: one product per kernel tap over the
outputs it reaches, forward and both gradients. "taps" forces it for every dilated
convolution, "xla" never.
"""

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from s4jax import errors

WEIGHT_GRAD_ENV = "S4JAX_CONV_WEIGHT_GRAD"
WEIGHT_GRAD_CHOICES = ("auto", "xla", "pointwise", "all")
DILATED_ENV = "S4JAX_DILATED_CONV"
DILATED_CHOICES = ("auto", "xla", "taps")
# "auto" computes a dilated convolution tap by tap on CPU when at most this share of its
# dense multiply-adds reads real pixels (the rest read zero padding). Measured with
# benchmarks/conv_grad.py (README.md, "Benchmarks").
TAPS_MAX_REACHABLE_SHARE = 0.75

_NHWC = ("NHWC", "HWIO", "NHWC")


def _env_choice(name: str, choices: tuple) -> str:
  """The lower-cased value of environment variable `name` ("auto" when unset or empty);
  ConfigError naming it for a value not in `choices`."""
  choice = os.environ.get(name, "auto").strip().lower() or "auto"
  if choice not in choices:
    raise errors.ConfigError(
      f"environment variable {name}={choice!r}: expected one of {choices} "
      "(unset it for the default, 'auto')."
    )
  return choice


def weight_grad_implementation() -> str:
  """ "xla", "pointwise" or "all", from `WEIGHT_GRAD_ENV` and the default backend."""
  choice = _env_choice(WEIGHT_GRAD_ENV, WEIGHT_GRAD_CHOICES)
  if choice == "auto":
    return "pointwise" if jax.default_backend() == "cpu" else "xla"
  return choice


def dilated_implementation() -> str:
  """ "xla" or "taps" (or "auto": "taps" on CPU where it saves work), from `DILATED_ENV`."""
  choice = _env_choice(DILATED_ENV, DILATED_CHOICES)
  if choice == "auto" and jax.default_backend() != "cpu":
    return "xla"
  return choice


def _tap_ranges(size: int, out_size: int, kernel: int, dilation: int, pad_lo: int):
  """Per kernel tap t along one axis: (input offset, first output, end output) of the outputs
  whose input pixel `out + offset` lies inside the image (stride 1)."""
  ranges = []
  for t in range(kernel):
    offset = t * dilation - pad_lo
    ranges.append((offset, max(0, -offset), min(out_size, size - offset)))
  return ranges


def reachable_share(in_hw, kernel_hw, pads, dilation) -> float:
  """The share of a stride-1 convolution's dense multiply-adds that read image pixels, not
  padding (1.0 for an unpadded one)."""
  axes = []
  for size, k, (lo, hi), d in zip(in_hw, kernel_hw, pads, dilation):
    out_size = size + lo + hi - (k - 1) * d
    axes.append((out_size, [max(0, b - a) for _, a, b in _tap_ranges(size, out_size, k, d, lo)]))
  (ho, rows), (wo, cols) = axes
  total = ho * wo * len(rows) * len(cols)
  reached = sum(r * c for r in rows for c in cols)
  return reached / total if total else 1.0


def conv_by_taps(lhs, rhs, pads, dilation, precision=None):
  """A stride-1 NHWC/HWIO convolution as one matrix product per kernel tap, over only the
  outputs whose input pixel for that tap is inside the image.

  A dilated convolution on a small feature map mostly multiplies padding: DeepLabV3+'s ASPP
  at rate 18 on ResNet-50's 21 x 21 map (crop 321, output stride 16) reads zeros in 82 % of
  its dense multiply-adds, and XLA:CPU's convolution computes them all. Here tap (i, j) adds
  X[rows+oy, cols+ox] @ W[i, j] into the output rows/cols it reaches; a tap that reaches none
  is skipped. Autodiff of the slices, products and pads gives the input and weight gradients
  as products over the same regions, so all three passes skip the padding. Accumulates in
  float32 (as XLA's convolution does) and returns the inputs' promoted dtype."""
  n, h, w, _ = lhs.shape
  kh, kw, _, o = rhs.shape
  (dy, dx) = dilation
  ho = h + pads[0][0] + pads[0][1] - (kh - 1) * dy
  wo = w + pads[1][0] + pads[1][1] - (kw - 1) * dx
  out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  out = None
  for i, (oy, y0, y1) in enumerate(_tap_ranges(h, ho, kh, dy, pads[0][0])):
    if y0 >= y1:
      continue
    for j, (ox, x0, x1) in enumerate(_tap_ranges(w, wo, kw, dx, pads[1][0])):
      if x0 >= x1:
        continue
      patch = lhs[:, y0 + oy : y1 + oy, x0 + ox : x1 + ox, :]
      product = lax.dot_general(
        patch,
        rhs[i, j],
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
      )
      if (y0, y1, x0, x1) != (0, ho, 0, wo):
        product = jnp.pad(product, ((0, 0), (y0, ho - y1), (x0, wo - x1), (0, 0)))
      out = product if out is None else out + product
  if out is None:  # every tap reads padding only
    return jnp.zeros((n, max(ho, 0), max(wo, 0), o), out_dtype)
  return out.astype(out_dtype)


def _is_nhwc(dimension_numbers: Any) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    # flax passes ConvDimensionNumbers for NHWC/HWIO: lhs (0, 3, 1, 2), rhs (3, 2, 0, 1).
    return (
      tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
      and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
      and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
    )
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """`lax.conv_general_dilated`'s signature (flax's ``nn.Conv(conv_general_dilated=...)``);
  2-D NHWC/HWIO ungrouped convolutions get the matrix-product weight gradient."""
  native = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  supported = (
    lhs.ndim == 4
    and _is_nhwc(dimension_numbers)
    and feature_group_count == 1
    and batch_group_count == 1
    and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
    and preferred_element_type is None
  )
  if not supported:
    return native(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  dilation = (1, 1) if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  if isinstance(padding, str):
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_kernel, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if strides == (1, 1) and dilation != (1, 1) and all(lo >= 0 and hi >= 0 for lo, hi in pads):
    taps = dilated_implementation()
    if taps == "auto":
      share = reachable_share(lhs.shape[1:3], rhs.shape[:2], pads, dilation)
      taps = "taps" if share <= TAPS_MAX_REACHABLE_SHARE else "xla"
    if taps == "taps":
      return conv_by_taps(lhs, rhs, pads, dilation, precision)
  implementation = weight_grad_implementation()
  if implementation == "pointwise" and tuple(rhs.shape[:2]) != (1, 1):
    implementation = "xla"
  if implementation == "xla":
    return native(lhs, rhs)
  return _conv(lhs, rhs, strides, pads, dilation, precision)


def _native(lhs, rhs, strides, pads, dilation, precision):
  return lax.conv_general_dilated(
    lhs,
    rhs,
    strides,
    pads,
    rhs_dilation=dilation,
    dimension_numbers=_NHWC,
    precision=precision,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(lhs, rhs, strides, pads, dilation, precision):
  return _native(lhs, rhs, strides, pads, dilation, precision)


def _conv_fwd(lhs, rhs, strides, pads, dilation, precision):
  return _native(lhs, rhs, strides, pads, dilation, precision), (lhs, rhs)


def _conv_bwd(strides, pads, dilation, precision, residuals, g):
  lhs, rhs = residuals
  # Input gradient: XLA's transposed convolution (as fast as the forward here).
  # (linear_transpose, not vjp: no primal convolution to compute and discard.)
  transpose = jax.linear_transpose(
    lambda x: _native(x, rhs, strides, pads, dilation, precision), lhs
  )
  (d_lhs,) = transpose(g)
  # The scope names the products in the compiled program (benchmarks/op_profile.py).
  with jax.named_scope("conv_weight_grad_by_matmul"):
    d_rhs = weight_grad_by_matmul(lhs, g, rhs.shape, strides, pads, dilation, precision)
  return d_lhs, d_rhs.astype(rhs.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_grad_by_matmul(
  lhs: jax.Array,
  g: jax.Array,
  kernel_shape: Sequence[int],
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  dilation: Sequence[int],
  precision: Any = None,
) -> jax.Array:
  """dW [kh, kw, C, O] of an NHWC/HWIO convolution from its input ``lhs`` [N, H, W, C] and
  output cotangent ``g`` [N, H', W', O], one kernel row per matrix product (module doc);
  float32."""
  kh, kw, c, o = kernel_shape
  n, ho, wo, _ = g.shape
  (sy, sx), (dy, dx) = strides, dilation
  x = lhs
  if any(p != 0 for pair in pads for p in pair):
    x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  g_matrix = g.reshape(n * ho * wo, o)
  rows = []
  for i in range(kh):
    views = [
      lax.slice(
        x,
        (0, i * dy, j * dx, 0),
        (n, i * dy + sy * (ho - 1) + 1, j * dx + sx * (wo - 1) + 1, c),
        (1, sy, sx, 1),
      )
      for j in range(kw)
    ]
    row = views[0] if kw == 1 else jnp.concatenate(views, axis=-1)
    product = lax.dot_general(
      row.reshape(n * ho * wo, kw * c),
      g_matrix,
      (((0,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
    )
    rows.append(product.reshape(kw, c, o))
  return jnp.stack(rows)
