"""Times one convolution's forward pass, input gradient and weight gradient, per layer shape.

  python benchmarks/conv_grad.py
  python benchmarks/conv_grad.py --batch=4 --shapes=81:304:3:256:1

Where a train step's time goes on this backend: for each shape (H:C:k:O:dilation, square
H x H input, stride 1, "SAME"), the median time of the forward convolution, of its input
gradient and of its weight gradient (XLA's backward-filter convolution), and of the weight
gradient as matrix products (`s4jax.models.conv_ops.weight_grad_by_matmul`), with GFLOP/s
(2 per multiply-add). A dilated shape gets a second row: the three passes of the same
convolution computed tap by tap over the outputs each tap reaches (`conv_ops.conv_by_taps`,
what `S4JAX_DILATED_CONV` picks), with GFLOP/s counted as if dense. The default shapes are
ResNet-50 + DeepLabV3+ layers at crop 321 (stride 4: 81 px, stride 16: 21 px). Measure on an
idle machine.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from s4jax.models import conv_ops

DEFAULT_SHAPES = (
  "81:64:3:64:1",  # layer1 3x3
  "81:256:1:64:1",  # layer1 1x1 reduce
  "81:64:1:256:1",  # layer1 1x1 expand
  "21:256:3:256:2",  # layer4 3x3 (output stride 16: dilation 2)
  "21:1024:1:256:1",  # layer4 1x1 reduce
  "81:304:3:256:1",  # decoder fuse conv (48 + 256 channels, stride 4)
  "21:2048:3:256:6",  # ASPP branches (output stride 16: rates 6, 12, 18)
  "21:2048:3:256:12",
  "21:2048:3:256:18",
)


def median_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="H:C:k:O:dilation,...")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, batch {args.batch}; ms (GFLOP/s)")
  print(
    f"{'H:C:k:O:d':>18} {'forward':>16} {'input grad':>16} {'weight grad':>16} {'as products':>16}"
  )
  rng = np.random.default_rng(0)
  for shape in args.shapes.split(","):
    h, c, k, o, d = (int(v) for v in shape.split(":"))
    x = jnp.asarray(rng.normal(size=(args.batch, h, h, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, c, o)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.normal(size=(args.batch, h, h, o)), jnp.float32)
    pad = d * (k - 1) // 2
    pads = ((pad, pad), (pad, pad))

    def conv(x, w):
      return lax.conv_general_dilated(
        x, w, (1, 1), pads, rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC")
      )

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    products = jax.jit(
      lambda x, g: conv_ops.weight_grad_by_matmul(x, g, (k, k, c, o), (1, 1), pads, (d, d))
    )
    gflop = 2 * args.batch * h * h * k * k * c * o / 1e9
    times = (
      median_ms(forward, x, w, repeats=args.repeats),
      median_ms(input_grad, x, w, g, repeats=args.repeats),
      median_ms(weight_grad, x, w, g, repeats=args.repeats),
      median_ms(products, x, g, repeats=args.repeats),
    )
    cells = " ".join(f"{t:8.1f} ({gflop / t * 1e3:5.0f})" for t in times)
    print(f"{shape:>18} {cells}")
    if d > 1:
      # The same convolution one product per tap over the outputs it reaches
      # (conv_ops.conv_by_taps; GFLOP/s as if dense, so the columns compare).
      def taps(x, w):
        return conv_ops.conv_by_taps(x, w, pads, (d, d))

      share = conv_ops.reachable_share((h, h), (k, k), pads, (d, d))
      times = (
        median_ms(jax.jit(taps), x, w, repeats=args.repeats),
        median_ms(
          jax.jit(lambda x, w, g: jax.vjp(lambda x: taps(x, w), x)[1](g)[0]),
          x,
          w,
          g,
          repeats=args.repeats,
        ),
        median_ms(
          jax.jit(lambda x, w, g: jax.vjp(lambda w: taps(x, w), w)[1](g)[0]),
          x,
          w,
          g,
          repeats=args.repeats,
        ),
      )
      cells = " ".join(f"{t:8.1f} ({gflop / t * 1e3:5.0f})" for t in times)
      print(f"{f'by taps ({100 * share:.0f}% reached)':>18} {cells}")


if __name__ == "__main__":
  main()
