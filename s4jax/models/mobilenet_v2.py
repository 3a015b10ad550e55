"""MobileNetV2 (width x1.0) feature extractor with dilation, in Flax Linen, NHWC.

The network is torchvision's / the MobileNetV2 paper's: a 3x3 stride-2 stem (32 channels),
then 17 inverted-residual blocks (1x1 expansion, 3x3 depthwise, linear 1x1 projection, with a
residual when the block keeps its size). ReLU6 everywhere, BatchNorm eps 1e-5, torch-style
symmetric padding (``padding = dilation`` for the 3x3 convs), so that imported torch weights
see the same pixels. The final 1x1 conv to 1280 channels (torch ``features.18``) is left out:
DeepLabV3+ takes its high-level features from the last block (320 channels), as DeepLab's
MobileNetV2 recipe does.

Outputs for DeepLabV3+: ``"low"`` after block 3 (stride 4, 24 channels; torch
``features.3``) and ``"high"`` after block 17 (320 channels; ``features.17``) at the output
stride. Output stride 16 or 8 replaces the strides of the last strided blocks by dilation of
the depthwise convs (`dilated_strides`). Flax names: ``stem_conv``, ``stem_bn``,
``block_<i>`` (i = torch's ``features.<i>``) with ``expand_conv/expand_bn`` (absent in block
1, whose expansion ratio is 1), ``depthwise_conv/depthwise_bn``, ``project_conv/project_bn``;
the mapping from torch names is in models/imagenet.py.

`InvertedResidual` and `dilated_strides` are shared with EfficientNet-Lite
(models/efficientnet_lite.py), whose blocks are the same apart from kernel sizes, TF "SAME"
padding and BatchNorm eps.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4jax.models import conv_ops
from s4jax.models import resnet
from s4jax.models.names import OUTPUT_STRIDES

STEM_CHANNELS = 32
LOW_LEVEL_BLOCK = 3  # torch features.3: the last block at stride 4
HIGH_LEVEL_BLOCK = 17  # torch features.17: the last inverted-residual block
LOW_LEVEL_CHANNELS = 24
HIGH_LEVEL_CHANNELS = 320
BN_EPSILON = 1e-5  # torch BatchNorm2d's default, which the torch-trained weights used


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One inverted-residual block: expansion ratio, depthwise kernel, stride, output channels."""

  expand_ratio: int
  kernel: int
  stride: int
  out_channels: int


def specs_from_stages(stages: Sequence[tuple[int, int, int, int, int]]) -> list[BlockSpec]:
  """(expand ratio, kernel, first stride, channels, repeats) per stage -> one spec per block.

  The first block of a stage carries the stage's stride, the others stride 1.
  """
  return [BlockSpec(t, k, s if i == 0 else 1, c) for t, k, s, c, n in stages for i in range(n)]


# The MobileNetV2 paper's Table 2 (as torchvision builds it), width x1.0.
_STAGES = (
  (1, 3, 1, 16, 1),
  (6, 3, 2, 24, 2),
  (6, 3, 2, 32, 3),
  (6, 3, 2, 64, 4),
  (6, 3, 1, 96, 3),
  (6, 3, 2, 160, 3),
  (6, 3, 1, 320, 1),
)


def block_specs() -> list[BlockSpec]:
  """Blocks 1..17 (list index 0 is block 1)."""
  return specs_from_stages(_STAGES)


def check_output_stride(output_stride: int, network: str) -> None:
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(
      f"{network} output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}."
    )


def dilated_strides(
  strides: Sequence[int], output_stride: int, stem_stride: int = 2
) -> list[tuple[int, int]]:
  """(stride, dilation) of each block so that the features stop at `output_stride`.

  DeepLab's rule for MobileNet (and torchvision's replace_stride_with_dilation for ResNets):
  once the running stride has reached the output stride, every later block runs at stride 1
  with the accumulated dilation, and a block whose stride was replaced passes its stride on
  to the dilation of the blocks *after* it (it keeps the previous dilation itself).
  """
  current, rate, out = stem_stride, 1, []
  for stride in strides:
    if current == output_stride:
      out.append((1, rate))
      rate *= stride
    else:
      out.append((stride, 1))
      current *= stride
  return out


def conv_padding(kernel: int, dilation: int, tf_same: bool):
  """torch-style symmetric padding, or TF "SAME" (for TF-trained weights).

  TF "SAME" pads ``total = max((ceil(n / s) - 1) * s + dilated kernel - n, 0)`` with the
  extra pixel at the bottom/right; XLA's "SAME" is exactly that. For stride 1 both agree.
  """
  if tf_same:
    return "SAME"
  pad = dilation * (kernel - 1) // 2
  return ((pad, pad), (pad, pad))


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  dilation: int = 1,
  tf_same: bool = False,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """A bias-free conv (BatchNorm follows every conv in these networks)."""
  return nn.Conv(
    features,
    (kernel, kernel),
    conv_general_dilated=conv_ops.conv_general_dilated,
    strides=(stride, stride),
    padding=conv_padding(kernel, dilation, tf_same),
    kernel_dilation=(dilation, dilation),
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=resnet.conv_kernel_init,
    name=name,
  )


def _explicit_padding(
  size: int, kernel: int, stride: int, dilation: int, tf_same: bool
) -> tuple[int, int]:
  if not tf_same:
    pad = dilation * (kernel - 1) // 2
    return (pad, pad)
  total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
  return (total // 2, total - total // 2)


def depthwise_by_taps(
  x: jax.Array, kernel: jax.Array, stride: int, dilation: int, padding: Sequence[tuple[int, int]]
) -> jax.Array:
  """Depthwise conv as a sum over the k x k taps of strided slices times per-channel weights.

  The same function as a grouped convolution with one group per channel; written out
  because XLA:CPU runs grouped convolutions slowly (forward and, above all, the kernel
  gradient: several times slower than this sum, which XLA fuses).
  """
  kh, kw = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (xp.shape[1] - dilation * (kh - 1) - 1) // stride + 1
  out_w = (xp.shape[2] - dilation * (kw - 1) - 1) // stride + 1
  out = None
  for a in range(kh):
    for b in range(kw):
      start = (0, a * dilation, b * dilation, 0)
      limit = (
        xp.shape[0],
        start[1] + (out_h - 1) * stride + 1,
        start[2] + (out_w - 1) * stride + 1,
        xp.shape[3],
      )
      tap = jax.lax.slice(xp, start, limit, (1, stride, stride, 1)) * kernel[a, b, 0]
      out = tap if out is None else out + tap
  return out


class DepthwiseConv(nn.Module):
  """A bias-free k x k depthwise conv; its ``kernel`` is ``[k, k, 1, C]``, as nn.Conv's with
  ``feature_group_count=C``, so imported weights map the same way.

  Attributes:
    kernel_size, stride, dilation: of the conv.
    tf_same: TF "SAME" padding instead of torch's symmetric padding.
    implementation: "xla" (a grouped convolution), "taps" (`depthwise_by_taps`) or
      "auto": taps on CPU, where XLA's grouped convolution is slow, XLA elsewhere.
    dtype: compute dtype; the kernel is float32.
  """

  kernel_size: int
  stride: int = 1
  dilation: int = 1
  tf_same: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    channels = x.shape[-1]
    kernel = self.param("kernel", resnet.conv_kernel_init, (k, k, 1, channels), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    padding = [
      _explicit_padding(n, k, self.stride, self.dilation, self.tf_same) for n in x.shape[1:3]
    ]
    implementation = self.implementation
    if implementation == "auto":
      implementation = "taps" if jax.default_backend() == "cpu" else "xla"
    if implementation == "taps":
      return depthwise_by_taps(x, kernel, self.stride, self.dilation, padding)
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      (self.stride, self.stride),
      padding,
      rhs_dilation=(self.dilation, self.dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels,
    )


class InvertedResidual(nn.Module):
  """1x1 expansion -> depthwise kxk (strided, dilated) -> linear 1x1 projection (+ residual).

  Attributes:
    spec: expansion ratio (1 = no expansion conv), kernel, stride, output channels. The
      residual is added when the block keeps its size (``stride == 1`` and equal channels).
    stride: the stride actually used (the spec's, or 1 where dilation replaced it).
    dilation: of the depthwise conv.
    tf_same: TF "SAME" padding instead of torch's symmetric padding.
    bn_epsilon: of every BatchNorm (the source network's).
    depthwise: `DepthwiseConv.implementation`.
    dtype: compute dtype; parameters are float32.
  """

  spec: BlockSpec
  stride: int = 1
  dilation: int = 1
  tf_same: bool = False
  bn_epsilon: float = BN_EPSILON
  depthwise: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_channels = x.shape[-1]
    hidden = in_channels * self.spec.expand_ratio

    def bn(name):
      return resnet.batch_norm(train, self.dtype, name, epsilon=self.bn_epsilon)

    y = x
    if self.spec.expand_ratio != 1:
      y = conv(hidden, 1, dtype=self.dtype, name="expand_conv")(y)
      y = nn.relu6(bn("expand_bn")(y))
    y = DepthwiseConv(
      self.spec.kernel,
      self.stride,
      self.dilation,
      self.tf_same,
      self.depthwise,
      self.dtype,
      name="depthwise_conv",
    )(y)
    y = nn.relu6(bn("depthwise_bn")(y))
    y = conv(self.spec.out_channels, 1, dtype=self.dtype, name="project_conv")(y)
    y = bn("project_bn")(y)
    if self.stride == 1 and in_channels == self.spec.out_channels:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 x1.0 returning DeepLabV3+'s low- and high-level features.

  Attributes:
    output_stride: 8, 16 or 32 (`dilated_strides`: OS16 dilates blocks 15-17 by 2, OS8
      dilates blocks 8-14 by 2 and 15-17 by 4; the block
      whose stride is replaced keeps the previous dilation).
    dtype: compute dtype. Parameters are always float32.
  """

  output_stride: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Returns ``{"low": stride-4 [N, H/4, W/4, 24], "high": [N, H/OS, W/OS, 320]}``."""
    check_output_stride(self.output_stride, "MobileNetV2")
    x = x.astype(self.dtype)
    x = conv(STEM_CHANNELS, 3, 2, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu6(resnet.batch_norm(train, self.dtype, "stem_bn", epsilon=BN_EPSILON)(x))
    specs = block_specs()
    layout = dilated_strides([s.stride for s in specs], self.output_stride)
    features = {}
    for index, (spec, (stride, dilation)) in enumerate(zip(specs, layout), start=1):
      x = InvertedResidual(spec, stride, dilation, dtype=self.dtype, name=f"block_{index}")(
        x, train
      )
      if index == LOW_LEVEL_BLOCK:
        features["low"] = x
    features["high"] = x
    return features
