"""Auxiliary heads that objectives ask the segmenter for (docs/methods.md).

An objective declares each head it needs as a `HeadSpec` (a name, a kind from `HEAD_KINDS`,
an output width and which features it reads); the segmenter builds one module per name,
with parameters under `params["head_<name>"]`, and applies it by name
(`Segmenter.head`). Kinds:
- "rgb": `ReconstructionHead`, the light image decoder `D_rec` of §1 (our design): the
  image in the normalised space the network sees, at the input resolution;
- "projection": `ProjectionHead`, 3x3 conv + BN + ReLU + 1x1 conv to `channels` (CSS's
  representation head; Mix-and-Match's embedding);
- "image_classifier": `ImageClassifierHead`, global average pooling, dropout, 1x1 conv to
  `channels` logits (AuxSegNet's multi-label classifier);
- "dense": `DenseHead`, 3x3 conv + ReLU + 1x1 conv to `channels` maps at the input's
  stride (e.g. a 1-channel saliency map);
- "affinity_branch": `AffinityBranchHead`, a task's feature branch F_t (dilated 3x3 convs +
  ReLU) and its two 1x1 projections theta_t(F_t), phi_t(F_t) (AuxSegNet's task affinity);
- "affinity_fusion": `AffinityFusionHead`, 3x3 conv (no bias) + ReLU + 1x1 conv + softmax
  over the channels, applied to stacked HW x HW affinity maps (AuxSegNet's cross-task
  weights).

A head that reads another head's output instead of a feature source sets `input_channels`
(its input width at `init`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s4jax.models import conv_ops
from s4jax.models import resnet
from s4jax.models.resnet import conv_kernel_init

FEATURE_SOURCES = ("fused", "low", "high")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """A head an objective needs.

  Attributes:
    name: unique among the enabled objectives' heads; parameters live under
      `params["head_<name>"]`.
    kind: one of `HEAD_KINDS`.
    channels: output width (RGB heads: the first conv's width, 0 = half the decoder's;
      "image_classifier": 0 = the number of classes).
    source: the features it reads at `init`: "fused" (decoder, stride 4), "low" (encoder,
      stride 4) or "high" (encoder, stride OS). Objectives pass the matching features when
      they apply it.
    dropout: dropout rate before the classifier ("image_classifier" only).
    input_channels: width of the head's input when it reads another head's output rather
      than the `source` features (0 = the source's width); `init` then feeds zeros of this
      width at the source's spatial size.
    dilations: dilation of each 3x3 conv ("affinity_branch" only).
  """

  name: str
  kind: str
  channels: int = 0
  source: str = "fused"
  dropout: float = 0.0
  input_channels: int = 0
  dilations: tuple[int, ...] = ()


class ReconstructionHead(nn.Module):
  """3x3 conv + ReLU, then two rounds of (2x bilinear upsampling, 3x3 conv + ReLU), 1x1 to RGB.

  No BatchNorm: the head is also run on class-wise inputs whose statistics have nothing to
  do with natural images (docs/methods.md §2), and it should not own running statistics that
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
      return nn.Conv(
        width,
        (kernel, kernel),
        conv_general_dilated=conv_ops.conv_general_dilated,
        padding="SAME",
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        name=name,
      )(x)

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


def _conv(width, kernel, dtype, name, use_bias=True):
  return nn.Conv(
    width,
    (kernel, kernel),
    conv_general_dilated=conv_ops.conv_general_dilated,
    padding="SAME",
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_kernel_init,
    name=name,
  )


class ProjectionHead(nn.Module):
  """3x3 conv + BatchNorm + ReLU, then a 1x1 conv to `channels` (float32 output)."""

  channels: int
  hidden: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    x = _conv(self.hidden, 3, self.dtype, "conv0", use_bias=False)(features.astype(self.dtype))
    x = nn.relu(resnet.batch_norm(train, self.dtype, "bn0")(x))
    return _conv(self.channels, 1, self.dtype, "conv1")(x).astype(jnp.float32)


class ImageClassifierHead(nn.Module):
  """Global average pooling, dropout, 1x1 conv: image-level logits [N, channels]."""

  channels: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = nn.Dropout(self.dropout)(pooled, deterministic=not train or self.dropout == 0)
    logits = _conv(self.channels, 1, self.dtype, "classifier")(pooled.astype(self.dtype))
    return logits[:, 0, 0, :].astype(jnp.float32)


class DenseHead(nn.Module):
  """3x3 conv + ReLU, 1x1 conv to `channels` maps at the input's stride (float32)."""

  channels: int = 1
  hidden: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = nn.relu(_conv(self.hidden, 3, self.dtype, "conv0")(features.astype(self.dtype)))
    return _conv(self.channels, 1, self.dtype, "conv1")(x).astype(jnp.float32)


class AffinityBranchHead(nn.Module):
  """A dense task's feature branch and its affinity projections (AuxSegNet): dilated 3x3
  convs + ReLU give F_t; 1x1 convs give theta_t(F_t) and phi_t(F_t), all `channels` wide.
  Returns float32 {"features", "theta", "phi"} at the input's resolution; the HW x HW
  affinity softmax(theta phi^T) is left to the caller, so `init` never builds one."""

  channels: int = 128
  dilations: tuple[int, ...] = (3, 6)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> dict:
    del train
    x = features.astype(self.dtype)
    for i, rate in enumerate(self.dilations):
      x = nn.relu(
        nn.Conv(
          self.channels,
          (3, 3),
          conv_general_dilated=conv_ops.conv_general_dilated,
          padding="SAME",
          kernel_dilation=(rate, rate),
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=conv_kernel_init,
          name=f"conv{i}",
        )(x)
      )
    theta = _conv(self.channels, 1, self.dtype, "theta")(x)
    phi = _conv(self.channels, 1, self.dtype, "phi")(x)
    return {
      "features": x.astype(jnp.float32),
      "theta": theta.astype(jnp.float32),
      "phi": phi.astype(jnp.float32),
    }


class AffinityFusionHead(nn.Module):
  """Cross-task weights (AuxSegNet's `cross_att`): the stacked task affinities [N, HW, HW, T]
  seen as a T-channel image, 3x3 conv (no bias) + ReLU + 1x1 conv, softmax over the T
  tasks; float32 weights [N, HW, HW, T]. Computed in float32: its input is probabilities."""

  channels: int = 2

  @nn.compact
  def __call__(self, stacked: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = stacked.astype(jnp.float32)
    x = nn.relu(_conv(self.channels, 3, jnp.float32, "conv0", use_bias=False)(x))
    return jax.nn.softmax(_conv(self.channels, 1, jnp.float32, "conv1")(x), axis=-1)


HEAD_KINDS = (
  "rgb",
  "projection",
  "image_classifier",
  "dense",
  "affinity_branch",
  "affinity_fusion",
)


def module_name(head: str) -> str:
  """The variable-collection key of auxiliary head `head`: `params["head_<name>"]`."""
  return f"head_{head}"


def build_head(spec: HeadSpec, decoder_channels: int, dtype, num_classes: int = 0) -> nn.Module:
  """The module for `spec` (named `head_<name>`)."""
  name = module_name(spec.name)
  if spec.kind == "rgb":
    # Half the decoder's width by default: light next to the decoder.
    return ReconstructionHead(
      channels=spec.channels or max(decoder_channels // 2, 16), dtype=dtype, name=name
    )
  if spec.kind == "projection":
    return ProjectionHead(channels=spec.channels, hidden=decoder_channels, dtype=dtype, name=name)
  if spec.kind == "image_classifier":
    return ImageClassifierHead(
      channels=spec.channels or num_classes, dropout=spec.dropout, dtype=dtype, name=name
    )
  if spec.kind == "dense":
    return DenseHead(
      channels=spec.channels or 1, hidden=max(decoder_channels // 4, 16), dtype=dtype, name=name
    )
  if spec.kind == "affinity_branch":
    return AffinityBranchHead(
      channels=spec.channels or 128,
      dilations=tuple(spec.dilations) or (3, 6),
      dtype=dtype,
      name=name,
    )
  if spec.kind == "affinity_fusion":
    return AffinityFusionHead(channels=spec.channels or 2, name=name)
  raise ValueError(f"Unknown head kind {spec.kind!r} of head {spec.name!r}; known: {HEAD_KINDS}.")
