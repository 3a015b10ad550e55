"""ResNet backbones (18/34/50/101) with dilation, in Flax Linen, NHWC.

The architecture follows torchvision's ResNet v1.5 (the stride of a bottleneck
sits on its 3x3 conv), with torchvision's ``replace_stride_with_dilation``
mechanism to reach output stride 8 or 16, and an optional "deep stem" (three
3x3 convs instead of the 7x7) as used by ResNet-D and the UniMatch backbones.

Parameter names are chosen so that importing torchvision (or UniMatch) weights
is a rename plus a kernel transpose. Torch conv weights are OIHW, Flax conv
kernels are HWIO, so every conv weight maps with ``w.transpose(2, 3, 1, 0)``.
BatchNorm ``weight``/``bias`` go to ``params`` as ``scale``/``bias`` and
``running_mean``/``running_var`` go to ``batch_stats`` as ``mean``/``var``
(``num_batches_tracked`` is dropped). The mapping, torch -> Flax:

  Stem (7x7, default):
    conv1.weight                     -> params/conv1/kernel
    bn1.{weight,bias}                -> params/bn1/{scale,bias}
    bn1.{running_mean,running_var}   -> batch_stats/bn1/{mean,var}
  Deep stem (UniMatch's ``conv1`` is an nn.Sequential):
    conv1.0.weight                   -> params/conv1_0/kernel
    conv1.1.*                        -> bn1_0/*
    conv1.3.weight                   -> params/conv1_1/kernel
    conv1.4.*                        -> bn1_1/*
    conv1.6.weight                   -> params/conv1_2/kernel
    bn1.*                            -> bn1/*
  Blocks (i = 1..4, j = block index):
    layer{i}.{j}.conv{k}.weight      -> params/layer{i}_{j}/conv{k}/kernel
    layer{i}.{j}.bn{k}.*             -> layer{i}_{j}/bn{k}/*
    layer{i}.{j}.downsample.0.weight -> params/layer{i}_{j}/downsample_conv/kernel
    layer{i}.{j}.downsample.1.*      -> layer{i}_{j}/downsample_bn/*
  fc.* has no counterpart (the backbone has no classifier).

Convs are padded explicitly and symmetrically (``padding = dilation`` for 3x3,
3 for the 7x7, 1 for the max pool) rather than with "SAME", because "SAME"
pads asymmetrically for strided convs on even inputs and imported torch
weights would then see shifted inputs.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4jax.models import conv_ops
from s4jax.models.names import OUTPUT_STRIDES

RESNET_DEPTHS = (18, 34, 50, 101)

# Blocks per stage, as in torchvision.
_STAGE_SIZES = {
  18: (2, 2, 2, 2),
  34: (3, 4, 6, 3),
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
}

# torchvision's replace_stride_with_dilation for layer2..layer4.
_REPLACE_STRIDE_WITH_DILATION = {
  32: (False, False, False),
  16: (False, False, True),
  8: (False, True, True),
}

# Kaiming-normal (fan_out, relu), untruncated, as torchvision initialises
# its convs: std = sqrt(2 / (k * k * out_channels)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _block_expansion(depth: int) -> int:
  return 1 if depth < 50 else 4


def _check_depth(depth: int) -> None:
  if depth not in RESNET_DEPTHS:
    raise ValueError(f"ResNet depth must be one of {RESNET_DEPTHS}, got {depth!r}.")


def resnet_output_channels(depth: int, width: int = 64) -> tuple[int, int]:
  """Channels of the layer1 (low-level) and layer4 (high-level) features.

  Args:
    depth: ResNet depth, one of ``RESNET_DEPTHS``.
    width: base channel count (64 in the standard networks).

  Returns:
    ``(low_level_channels, high_level_channels)``, e.g. ``(256, 2048)`` for
    ResNet-50 and ``(64, 512)`` for ResNet-18 at width 64.
  """
  _check_depth(depth)
  expansion = _block_expansion(depth)
  return width * expansion, 8 * width * expansion


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  dilation: int = 1,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """A bias-free conv with torch-style symmetric padding."""
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    conv_general_dilated=conv_ops.conv_general_dilated,
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    kernel_dilation=(dilation, dilation),
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_kernel_init,
    name=name,
  )


def batch_norm(train: bool, dtype: Any, name: str, epsilon: float = 1e-5) -> nn.BatchNorm:
  # Flax momentum is the weight of the old statistics: 0.9 == torch's 0.1. The epsilon is
  # the source network's (1e-5 in torch's BatchNorm2d; TF-trained networks use 1e-3).
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=epsilon,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual (ResNet-18/34).

  torchvision refuses dilation in BasicBlock; here both 3x3 convs use
  ``dilation`` so ResNet-18/34 can run at output stride 8/16 like the
  DeepLab-style re-implementations do.
  """

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    identity = x
    y = conv(self.planes, 3, self.stride, self.dilation, self.dtype, "conv1")(x)
    y = batch_norm(train, self.dtype, "bn1")(y)
    y = nn.relu(y)
    y = conv(self.planes, 3, 1, self.dilation, self.dtype, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    if self.downsample:
      identity = conv(self.planes, 1, self.stride, 1, self.dtype, "downsample_conv")(x)
      identity = batch_norm(train, self.dtype, "downsample_bn")(identity)
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 with a residual (ResNet-50/101)."""

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    identity = x
    out_channels = self.planes * self.expansion
    y = conv(self.planes, 1, 1, 1, self.dtype, "conv1")(x)
    y = batch_norm(train, self.dtype, "bn1")(y)
    y = nn.relu(y)
    y = conv(self.planes, 3, self.stride, self.dilation, self.dtype, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    y = nn.relu(y)
    y = conv(out_channels, 1, 1, 1, self.dtype, "conv3")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    if self.downsample:
      identity = conv(out_channels, 1, self.stride, 1, self.dtype, "downsample_conv")(x)
      identity = batch_norm(train, self.dtype, "downsample_bn")(identity)
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """ResNet feature extractor returning the output of every stage.

  Attributes:
    depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
    output_stride: 8, 16 or 32. Strides of the last stages are replaced by
      dilation (torchvision's ``replace_stride_with_dilation``): OS16 dilates
      layer4, OS8 dilates layer3 and layer4. The first block of a dilated
      stage keeps the previous stage's dilation, as in torchvision.
    deep_stem: three 3x3 convs (width, width, 2 * width channels; the first
      with stride 2) instead of the 7x7 stem. Layer1 then sees 2 * width
      input channels, so it gets a downsample branch even for BasicBlock.
    width: base channel count (64 in the standard networks).
    dtype: compute dtype. Parameters are always float32.
  """

  depth: int
  output_stride: int = 16
  deep_stem: bool = False
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: float images ``[N, H, W, 3]`` (NHWC).
      train: use batch statistics and update ``batch_stats`` if True.

    Returns:
      A dict with ``"stem"`` (after the stem's ReLU, before the max pool:
      stride 2), ``"layer1"`` (stride 4), ``"layer2"`` (stride 8),
      ``"layer3"`` (stride min(16, output_stride)) and ``"layer4"`` (stride
      ``output_stride``).
    """
    _check_depth(self.depth)
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(
        f"ResNet output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r}."
      )
    block_cls = BasicBlock if self.depth < 50 else Bottleneck
    x = x.astype(self.dtype)

    if self.deep_stem:
      x = conv(self.width, 3, 2, 1, self.dtype, "conv1_0")(x)
      x = nn.relu(batch_norm(train, self.dtype, "bn1_0")(x))
      x = conv(self.width, 3, 1, 1, self.dtype, "conv1_1")(x)
      x = nn.relu(batch_norm(train, self.dtype, "bn1_1")(x))
      x = conv(2 * self.width, 3, 1, 1, self.dtype, "conv1_2")(x)
      in_channels = 2 * self.width
    else:
      x = conv(self.width, 7, 2, 1, self.dtype, "conv1")(x)
      in_channels = self.width
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    features = {"stem": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    dilate_stage = (False,) + _REPLACE_STRIDE_WITH_DILATION[self.output_stride]
    dilation = 1
    for stage, num_blocks in enumerate(_STAGE_SIZES[self.depth]):
      planes = self.width * 2**stage
      stride = 1 if stage == 0 else 2
      previous_dilation = dilation
      if dilate_stage[stage]:
        dilation *= stride
        stride = 1
      out_channels = planes * block_cls.expansion
      for j in range(num_blocks):
        first = j == 0
        x = block_cls(
          planes=planes,
          stride=stride if first else 1,
          dilation=previous_dilation if first else dilation,
          downsample=first and (stride != 1 or in_channels != out_channels),
          dtype=self.dtype,
          name=f"layer{stage + 1}_{j}",
        )(x, train)
        in_channels = out_channels
      features[f"layer{stage + 1}"] = x
    return features
