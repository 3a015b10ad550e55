"""EfficientNet-Lite0 feature extractor with dilation (and its ImageNet classifier), in Flax.

EfficientNet-Lite is EfficientNet made for mobile accelerators: no squeeze-and-excitation,
ReLU6 instead of swish, and a stem (32 channels) and head (1280) that do not scale with the
width. Lite0 has EfficientNet-B0's 16 MBConv blocks (`_STAGES`), which are MobileNetV2's
inverted residuals with 3x3 or 5x5 depthwise kernels, so `mobilenet_v2.InvertedResidual`
builds them. The ImageNet weights were trained in TensorFlow, hence:

- **TF "SAME" padding**: a strided conv on an even input pads one pixel more at the bottom
  and right than at the top and left (torch-style symmetric padding would shift every
  feature by a pixel against what the weights expect);
- **BatchNorm eps 1e-3**;
- **inputs (x - 127) / 128** on 0..255 pixels. The project feeds ImageNet mean/std
  normalised images (augment.py), so the backbone maps those back to Lite0's input scale
  first (`to_lite_input`), a fixed affine map, so the pretrained stem sees the statistics
  it was trained on.

Outputs for DeepLabV3+: ``"low"`` after block 2 (stride 4, 24 channels; ``_blocks.2``) and
``"high"`` after block 15 (320 channels; ``_blocks.15``); the 1x1 head conv to 1280 is only
part of the classifier. Output stride 16 or 8 turns the last strides into dilation of the
depthwise convs (`mobilenet_v2.dilated_strides`). Stochastic depth (drop-connect), which
the original training used, is not implemented. Flax names: ``stem_conv``, ``stem_bn``,
``block_<i>`` (i = ``_blocks.<i>``, 0..15) with ``expand_conv/expand_bn`` (absent in block
0), ``depthwise_conv/depthwise_bn``, ``project_conv/project_bn``; models/imagenet.py maps the
torch names.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4jax import augment
from s4jax.models import mobilenet_v2
from s4jax.models import resnet

OUTPUT_STRIDES = mobilenet_v2.OUTPUT_STRIDES
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
LOW_LEVEL_BLOCK = 2  # _blocks.2: the last block at stride 4
HIGH_LEVEL_BLOCK = 15  # _blocks.15: the last MBConv block
LOW_LEVEL_CHANNELS = 24
HIGH_LEVEL_CHANNELS = 320
BN_EPSILON = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet
NUM_IMAGENET_CLASSES = 1000
# The TF Lite models' preprocessing: (pixel - 127) / 128 on 0..255.
LITE_INPUT_MEAN = 127.0
LITE_INPUT_STD = 128.0

# (expand ratio, kernel, first stride, channels, repeats): EfficientNet-B0's stages, which
# Lite0 keeps unchanged (width and depth coefficients 1.0).
_STAGES = (
  (1, 3, 1, 16, 1),
  (6, 3, 2, 24, 2),
  (6, 5, 2, 40, 2),
  (6, 3, 2, 80, 3),
  (6, 5, 1, 112, 3),
  (6, 5, 2, 192, 4),
  (6, 3, 1, 320, 1),
)


def block_specs() -> list[mobilenet_v2.BlockSpec]:
  """Blocks 0..15."""
  return mobilenet_v2.specs_from_stages(_STAGES)


def to_lite_input(x: jax.Array) -> jax.Array:
  """ImageNet mean/std normalised images -> Lite0's (pixel - 127) / 128 input scale."""
  mean = jnp.asarray(augment.IMAGENET_MEAN, x.dtype)
  std = jnp.asarray(augment.IMAGENET_STD, x.dtype)
  pixels = (x * std + mean) * 255.0
  return (pixels - LITE_INPUT_MEAN) / LITE_INPUT_STD


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 returning DeepLabV3+'s low- and high-level features.

  Attributes:
    output_stride: 8, 16 or 32. OS16 runs blocks 11-15 at stride 1 (dilation 2 from block
      12 on), OS8 also blocks 5-10 (dilation 2 from block 6, 4 from block 12).
    dtype: compute dtype. Parameters are always float32.
  """

  output_stride: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """x: ImageNet-normalised images. Returns ``{"low": [N, H/4, W/4, 24], "high":
    [N, H/OS, W/OS, 320]}``."""
    mobilenet_v2.check_output_stride(self.output_stride, "EfficientNet-Lite0")
    x = to_lite_input(x.astype(jnp.float32)).astype(self.dtype)
    x = mobilenet_v2.conv(STEM_CHANNELS, 3, 2, tf_same=True, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu6(resnet.batch_norm(train, self.dtype, "stem_bn", epsilon=BN_EPSILON)(x))
    specs = block_specs()
    layout = mobilenet_v2.dilated_strides([s.stride for s in specs], self.output_stride)
    features = {}
    for index, (spec, (stride, dilation)) in enumerate(zip(specs, layout)):
      x = mobilenet_v2.InvertedResidual(
        spec,
        stride,
        dilation,
        tf_same=True,
        bn_epsilon=BN_EPSILON,
        dtype=self.dtype,
        name=f"block_{index}",
      )(x, train)
      if index == LOW_LEVEL_BLOCK:
        features["low"] = x
    features["high"] = x
    return features


class EfficientNetLite0Classifier(nn.Module):
  """The ImageNet classifier: backbone (output stride 32) + 1x1 head conv to 1280, BN,
  ReLU6, global average pool, 1000-way linear layer (torch ``_conv_head``, ``_bn1``,
  ``_fc``). Only used to check the imported weights (tests, benchmarks/imagenet_sanity.py).
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: ImageNet-normalised images [N, H, W, 3]. Returns float32 logits [N, 1000]."""
    y = EfficientNetLite0(output_stride=32, dtype=self.dtype, name="backbone")(x, train)["high"]
    y = mobilenet_v2.conv(HEAD_CHANNELS, 1, dtype=self.dtype, name="head_conv")(y)
    y = nn.relu6(resnet.batch_norm(train, self.dtype, "head_bn", epsilon=BN_EPSILON)(y))
    y = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(NUM_IMAGENET_CLASSES, param_dtype=jnp.float32, name="fc")(y)
