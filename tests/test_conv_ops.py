"""The matrix-product weight gradient (s4jax/models/conv_ops.py) against a NumPy reference
and against XLA's own convolution gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from s4jax import errors
from s4jax.models import conv_ops

# (H, W, C, k, O, stride, dilation, padding): 1x1, 3x3 SAME, strided, torch-style explicit,
# dilated beyond the input, the 7x7 stem, VALID, even kernel, asymmetric padding.
CASES = [
  (6, 7, 5, 1, 4, 1, 1, "SAME"),
  (8, 8, 6, 1, 5, 2, 1, "VALID"),
  (9, 11, 5, 3, 7, 1, 1, "SAME"),
  (9, 11, 5, 3, 7, 2, 1, ((1, 1), (1, 1))),
  (12, 12, 3, 3, 4, 1, 3, ((3, 3), (3, 3))),
  (4, 4, 2, 3, 2, 1, 6, ((6, 6), (6, 6))),
  (10, 10, 4, 7, 6, 2, 1, ((3, 3), (3, 3))),
  (7, 7, 3, 2, 4, 1, 1, "SAME"),
  (9, 8, 3, 3, 2, 2, 1, ((0, 1), (1, 0))),
]


def numpy_weight_grad(x, g, k, stride, dilation, pads):
  """dW[i, j, c, o] = sum_{n,y,x} Xpad[n, s*y + d*i, s*x + d*j, c] * G[n, y, x, o], by loops."""
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  _, ho, wo, _ = g.shape
  out = np.zeros((k, k, x.shape[-1], g.shape[-1]), np.float64)
  for i in range(k):
    for j in range(k):
      for y in range(ho):
        for x_ in range(wo):
          patch = xp[:, stride * y + dilation * i, stride * x_ + dilation * j, :]  # [N, C]
          out[i, j] += patch.T.astype(np.float64) @ g[:, y, x_, :].astype(np.float64)
  return out


def _explicit(padding, h, w, k, stride, dilation):
  if not isinstance(padding, str):
    return tuple(tuple(p) for p in padding)
  dilated = (k - 1) * dilation + 1
  return tuple(lax.padtype_to_pads((h, w), (dilated, dilated), (stride, stride), padding))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}x{c[3]}s{c[5]}d{c[6]}")
def test_weight_grad_by_matmul_equals_numpy_loops(case):
  h, w, c, k, o, stride, dilation, padding = case
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, h, w, c)).astype(np.float32)
  pads = _explicit(padding, h, w, k, stride, dilation)
  out_shape = jax.eval_shape(
    lambda x: lax.conv_general_dilated(
      x,
      jnp.zeros((k, k, c, o)),
      (stride, stride),
      pads,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ),
    x,
  ).shape
  g = rng.normal(size=out_shape).astype(np.float32)
  got = conv_ops.weight_grad_by_matmul(
    jnp.asarray(x), jnp.asarray(g), (k, k, c, o), (stride, stride), pads, (dilation, dilation)
  )
  want = numpy_weight_grad(x, g, k, stride, dilation, pads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("choice", ["pointwise", "all"])
def test_gradients_equal_xla_gradients(monkeypatch, choice):
  rng = np.random.default_rng(1)
  for h, w, c, k, o, stride, dilation, padding in CASES:
    x = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)

    def loss(conv):
      return lambda x, kernel: jnp.sum(
        jnp.sin(
          conv(
            x,
            kernel,
            (stride, stride),
            padding,
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
          )
        )
      )

    want = jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1))(x, kernel)
    # This test is of the weight gradient; dilated cases would otherwise go tap by tap
    # (tested below against XLA on its own).
    monkeypatch.setenv(conv_ops.DILATED_ENV, "xla")
    monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, choice)
    got = jax.value_and_grad(loss(conv_ops.conv_general_dilated), (0, 1))(x, kernel)
    monkeypatch.delenv(conv_ops.WEIGHT_GRAD_ENV)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_flax_conv_in_bfloat16_keeps_kernel_gradient_dtype_and_value(monkeypatch):
  monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, "all")
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 4)), jnp.float32)

  def grads(conv_fn):
    layer = nn.Conv(
      6,
      (3, 3),
      strides=(2, 2),
      padding="SAME",
      dtype=jnp.bfloat16,
      param_dtype=jnp.float32,
      conv_general_dilated=conv_fn,
    )
    params = layer.init(jax.random.key(0), x)
    return jax.grad(lambda p: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2))(params)

  got = grads(conv_ops.conv_general_dilated)["params"]["kernel"]
  want = grads(lax.conv_general_dilated)["params"]["kernel"]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


def test_implementation_choice(monkeypatch):
  monkeypatch.delenv(conv_ops.WEIGHT_GRAD_ENV, raising=False)
  assert conv_ops.weight_grad_implementation() == "pointwise"  # the CPU default
  for choice in ("xla", "pointwise", "all"):
    monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, choice)
    assert conv_ops.weight_grad_implementation() == choice
  monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, "fast")
  with pytest.raises(errors.ConfigError, match="S4JAX_CONV_WEIGHT_GRAD='fast'"):
    conv_ops.weight_grad_implementation()


def test_pointwise_uses_products_only_for_1x1(monkeypatch):
  """The choice is visible in the compiled gradient: "pointwise" leaves a 3x3 conv's weight
  gradient to XLA's convolution and turns a 1x1's into a dot."""
  x = jnp.ones((1, 6, 6, 3))

  def weight_grad_hlo(k):
    kernel = jnp.ones((k, k, 3, 4))
    f = jax.grad(
      lambda kernel: jnp.sum(
        conv_ops.conv_general_dilated(
          x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        ** 2
      )
    )
    return jax.jit(f).lower(kernel).as_text()

  monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, "pointwise")
  assert weight_grad_hlo(1).count("convolution") == 1  # the forward only
  assert weight_grad_hlo(3).count("convolution") == 2  # forward + XLA's weight gradient
  monkeypatch.setenv(conv_ops.WEIGHT_GRAD_ENV, "xla")
  assert weight_grad_hlo(1).count("convolution") == 2


# (H, W, C, O, dilation, pads): ASPP-like rates on a small map (most taps read padding),
# a rate that only the centre tap survives, asymmetric and zero padding, a 3x3 at rate 2.
TAP_CASES = [
  (9, 9, 4, 3, 6, ((6, 6), (6, 6))),
  (5, 6, 3, 2, 9, ((9, 9), (9, 9))),
  (10, 7, 4, 3, 3, ((1, 4), (0, 2))),
  (11, 11, 3, 4, 2, ((2, 2), (2, 2))),
  (12, 9, 2, 3, 2, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("case", TAP_CASES, ids=lambda c: f"{c[0]}x{c[1]}d{c[4]}")
def test_conv_by_taps_equals_xla_values_and_gradients(case):
  h, w, c, o, d, pads = case
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, c, o)), jnp.float32)

  def xla(x, kernel):
    return lax.conv_general_dilated(
      x,
      kernel,
      (1, 1),
      pads,
      rhs_dilation=(d, d),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest",
    )

  def taps(x, kernel):
    return conv_ops.conv_by_taps(x, kernel, pads, (d, d), precision="highest")

  want, want_vjp = jax.vjp(xla, x, kernel)
  got, got_vjp = jax.vjp(taps, x, kernel)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  for got_grad, want_grad in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-4)


def test_reachable_share_counts_the_taps_that_read_pixels():
  # Rate 18 on 21 x 21 ("SAME"): each axis has the centre tap everywhere and the two outer
  # taps on 3 of 21 outputs, so (21 + 2 * 3)^2 of 9 * 21^2 multiply-adds read pixels.
  share = conv_ops.reachable_share((21, 21), (3, 3), ((18, 18), (18, 18)), (18, 18))
  assert share == pytest.approx(27**2 / (9 * 21**2))
  assert conv_ops.reachable_share((8, 8), (3, 3), ((0, 0), (0, 0)), (2, 2)) == 1.0
  # Beyond the map only the centre tap is left.
  assert conv_ops.reachable_share((4, 4), (3, 3), ((9, 9), (9, 9)), (9, 9)) == pytest.approx(1 / 9)


def test_dilated_implementation_choice_reaches_the_compiled_forward(monkeypatch):
  """ "auto" (CPU) computes a mostly-padding dilated conv tap by tap (no convolution op left),
  keeps XLA's for one that mostly reads pixels; "xla" and "taps" force either; a bad value
  is named."""

  def forward_hlo(h, d):
    x = jnp.ones((1, h, h, 3))
    kernel = jnp.ones((3, 3, 3, 4))
    f = lambda x: conv_ops.conv_general_dilated(
      x, kernel, (1, 1), "SAME", rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.jit(f).lower(x).as_text()

  monkeypatch.delenv(conv_ops.DILATED_ENV, raising=False)
  assert conv_ops.dilated_implementation() == "auto"
  assert forward_hlo(9, 6).count("convolution") == 0  # share 0.31
  assert forward_hlo(32, 2).count("convolution") == 1  # share 0.92
  monkeypatch.setenv(conv_ops.DILATED_ENV, "taps")
  assert forward_hlo(32, 2).count("convolution") == 0
  monkeypatch.setenv(conv_ops.DILATED_ENV, "xla")
  assert forward_hlo(9, 6).count("convolution") == 1
  monkeypatch.setenv(conv_ops.DILATED_ENV, "fast")
  with pytest.raises(errors.ConfigError, match="S4JAX_DILATED_CONV='fast'"):
    conv_ops.dilated_implementation()
