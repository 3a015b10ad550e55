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
convolutions are fast. It is read when a step is traced, so an A/B comparison runs two
processes. Grouped (depthwise), input-dilated and non-2D convolutions always use XLA's.
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

_NHWC = ("NHWC", "HWIO", "NHWC")


def weight_grad_implementation() -> str:
  """ "xla", "pointwise" or "all", from `WEIGHT_GRAD_ENV` and the default backend."""
  choice = os.environ.get(WEIGHT_GRAD_ENV, "auto").strip().lower() or "auto"
  if choice not in WEIGHT_GRAD_CHOICES:
    raise errors.ConfigError(
      f"environment variable {WEIGHT_GRAD_ENV}={choice!r}: expected one of {WEIGHT_GRAD_CHOICES} "
      "(unset it for the default, 'auto')."
    )
  if choice == "auto":
    return "pointwise" if jax.default_backend() == "cpu" else "xla"
  return choice


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
  implementation = weight_grad_implementation() if supported else "xla"
  if implementation == "pointwise" and tuple(rhs.shape[:2]) != (1, 1):
    implementation = "xla"
  if implementation == "xla":
    return native(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  dilation = (1, 1) if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  if isinstance(padding, str):
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_kernel, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
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
