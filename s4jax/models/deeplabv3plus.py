"""DeepLabV3+ decoder (ASPP + low-level fusion), following the UniMatch recipe.

Layout and names, with the UniMatch (PyTorch) counterparts:

  aspp/b0            1x1 conv + BN + ReLU            (head.b0)
  aspp/b1..b3        3x3 atrous conv + BN + ReLU     (head.b1..b3)
  aspp/b4            image pooling: global mean, 1x1 conv + BN + ReLU,
                     broadcast back to the map        (head.b4)
  aspp/project       1x1 conv + BN + ReLU on the concatenated branches
                                                      (head.project)
  reduce             1x1 conv to 48 channels + BN + ReLU on the stride-4
                     features                         (reduce)
  fuse               two 3x3 conv + BN + ReLU         (fuse.0/1, fuse.3/4 ->
                     fuse/conv1, bn1, conv2, bn2)
  classifier         1x1 conv with bias               (classifier)

Every ``ConvBNReLU`` holds ``conv`` (bias-free) and ``bn``; e.g. UniMatch's
``head.b1.0.weight`` -> ``aspp/b1/conv/kernel`` (OIHW -> HWIO) and
``head.b4.1.*`` -> ``aspp/b4/bn/*``.

One numerical difference from UniMatch: the ASPP output is upsampled with
``jax.image.resize(..., "bilinear")``, i.e. half-pixel centres (torch's
``align_corners=False``), whereas UniMatch uses ``align_corners=True``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4jax.models import conv_ops
from s4jax.models import resnet

# DeepLab's ASPP rates per output stride: doubled at OS 8, halved at OS 32
# (so the receptive field in input pixels stays the same).
_ASPP_RATES = {
  8: (12, 24, 36),
  16: (6, 12, 18),
  32: (3, 6, 9),
}


def aspp_rates_for_output_stride(output_stride: int) -> tuple[int, ...]:
  """The ASPP atrous rates to use at a backbone output stride."""
  if output_stride not in _ASPP_RATES:
    raise ValueError(f"output_stride must be one of {tuple(_ASPP_RATES)}, got {output_stride!r}.")
  return _ASPP_RATES[output_stride]


class ConvBNReLU(nn.Module):
  """Bias-free conv (``conv``) + BatchNorm (``bn``) + ReLU."""

  features: int
  kernel: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = resnet.conv(
      self.features, self.kernel, dilation=self.dilation, dtype=self.dtype, name="conv"
    )(x)
    x = resnet.batch_norm(train, self.dtype, "bn")(x)
    return nn.relu(x)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: 1x1, atrous 3x3s and image pooling."""

  atrous_rates: tuple[int, ...] = (6, 12, 18)
  channels: int = 256
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    branches = [ConvBNReLU(self.channels, 1, dtype=self.dtype, name="b0")(x, train)]
    for i, rate in enumerate(self.atrous_rates):
      branches.append(
        ConvBNReLU(self.channels, 3, rate, dtype=self.dtype, name=f"b{i + 1}")(x, train)
      )
    # Image pooling: the mean is taken in float32 so that bf16 compute does
    # not lose precision summing over a large map.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = ConvBNReLU(self.channels, 1, dtype=self.dtype, name=f"b{len(self.atrous_rates) + 1}")(
      pooled.astype(x.dtype), train
    )
    # Bilinear upsampling of a 1x1 map is a broadcast.
    branches.append(
      jnp.broadcast_to(pooled, x.shape[:3] + (pooled.shape[-1],)).astype(branches[0].dtype)
    )
    y = jnp.concatenate(branches, axis=-1)
    y = ConvBNReLU(self.channels, 1, dtype=self.dtype, name="project")(y, train)
    # UniMatch's projection is conv + BN + ReLU with no dropout; this optional
    # regulariser (off by default) drops whole channels per example (Dropout2d),
    # and a nonzero rate needs a "dropout" rng in training.
    return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(y, deterministic=not train)


class _Fuse(nn.Module):
  """Two 3x3 conv + BN + ReLU, named like UniMatch's ``fuse`` Sequential."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = resnet.conv(self.channels, 3, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(resnet.batch_norm(train, self.dtype, "bn1")(x))
    x = resnet.conv(self.channels, 3, dtype=self.dtype, name="conv2")(x)
    return nn.relu(resnet.batch_norm(train, self.dtype, "bn2")(x))


class DeepLabV3PlusDecoder(nn.Module):
  """DeepLabV3+ head on (stride-4, stride-OS) backbone features.

  Attributes:
    num_classes: number of output classes K.
    atrous_rates: ASPP rates; (6, 12, 18) at output stride 16, (12, 24, 36) at
      8 (see ``aspp_rates_for_output_stride``).
    aspp_channels: channels of every ASPP branch and of its projection.
    low_level_channels: channels of the 1x1 projection of the stride-4
      features (48 in DeepLabV3+).
    decoder_channels: channels of the two fuse convs.
    dropout_rate: channel dropout after the ASPP projection, an optional
      regulariser that UniMatch does not have. Default 0, which needs no rng.
    dtype: compute dtype; parameters are float32.
  """

  num_classes: int
  atrous_rates: tuple[int, ...] = (6, 12, 18)
  aspp_channels: int = 256
  low_level_channels: int = 48
  decoder_channels: int = 256
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, low_level: jax.Array, high_level: jax.Array, train: bool
  ) -> dict[str, jax.Array]:
    """Decodes backbone features.

    Args:
      low_level: stride-4 features ``[N, h, w, C_low]``.
      high_level: stride-OS features ``[N, h', w', C_high]``.
      train: batch statistics / batch_stats updates (and dropout) if True.

    Returns:
      ``{"features": [N, h, w, decoder_channels], "logits": [N, h, w, K]}``,
      both in the compute dtype.
    """
    low_level = low_level.astype(self.dtype)
    high_level = high_level.astype(self.dtype)
    high = ASPP(
      atrous_rates=tuple(self.atrous_rates),
      channels=self.aspp_channels,
      dropout_rate=self.dropout_rate,
      dtype=self.dtype,
      name="aspp",
    )(high_level, train)
    low = ConvBNReLU(self.low_level_channels, 1, dtype=self.dtype, name="reduce")(low_level, train)
    n, h, w = low.shape[:3]
    high = jax.image.resize(high, (n, h, w, high.shape[-1]), method="bilinear").astype(low.dtype)
    # Low-level channels first, as UniMatch concatenates [c1, c4]: keeps the
    # fuse conv's input-channel order identical for weight import.
    fused = _Fuse(self.decoder_channels, self.dtype, name="fuse")(
      jnp.concatenate([low, high], axis=-1), train
    )
    logits = nn.Conv(
      self.num_classes,
      (1, 1),
      conv_general_dilated=conv_ops.conv_general_dilated,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="classifier",
    )(fused)
    return {"features": fused, "logits": logits}
