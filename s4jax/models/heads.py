"""Auxiliary heads that objectives ask the segmenter for (see `s4jax/objectives/`).

`ReconstructionHead` is the light image decoder `D_rec` of METHODS.md §1 (our design): it
reads the decoder's fused stride-4 feature map and predicts the RGB image, in the
normalised space the network sees, at the input resolution.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4jax.models.resnet import conv_kernel_init


class ReconstructionHead(nn.Module):
  """3x3 conv + ReLU, then two rounds of (2x bilinear upsampling, 3x3 conv + ReLU), 1x1 to RGB.

  No BatchNorm: the head is also run on class-wise inputs whose statistics have nothing to
  do with natural images (METHODS.md §2), and it should not own running statistics that
  evaluation would have to trust.

  Attributes:
    channels: width of the first conv; halved after each upsampling.
    dtype: compute dtype; the output is float32.
  """

  channels: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`features` [N, h, w, C] (stride 4) -> float32 RGB [N, *size, 3]."""

    def conv(x, width, kernel, name):
      return nn.Conv(width, (kernel, kernel), padding="SAME", dtype=self.dtype,
                     param_dtype=jnp.float32, kernel_init=conv_kernel_init, name=name)(x)

    x = nn.relu(conv(features.astype(self.dtype), self.channels, 3, "conv0"))
    width = self.channels
    for i in (1, 2):
      n, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")
      width = max(width // 2, 8)
      x = nn.relu(conv(x, width, 3, f"conv{i}"))
    rgb = conv(x, 3, 1, "to_rgb").astype(jnp.float32)
    # Stride-4 maps of inputs whose side is not a multiple of 4 are rounded up: resize back.
    if rgb.shape[1:3] != tuple(size):
      rgb = jax.image.resize(rgb, (rgb.shape[0], *size, 3), method="bilinear")
    return rgb
