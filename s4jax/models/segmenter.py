"""The segmentation network: ResNet backbone + DeepLabV3+ decoder.

Top-level parameter collections are ``params["backbone"]`` and
``params["decoder"]`` (the optimizer picks the decoder's higher learning rate
by that name). ``encode`` and ``decode`` are exposed as methods so that
training code can run them separately, e.g. to perturb (channel-drop) the
encoder features before decoding::

  low, high = model.apply(variables, x, train, method="encode")
  out = model.apply(variables, low, high, train, method="decode")

With ``train=True`` pass ``mutable=["batch_stats"]`` as usual.

Auxiliary heads (image reconstruction, projections, classifiers, dense maps) are built when
an objective asks for them (``aux_heads``: ``heads.HeadSpec`` records); their parameters
live under
``params["head_<name>"]`` (so the optimizer treats them as head parameters) and are created
at ``init`` even though ``__call__`` does not use them::

  rgb = model.apply(variables, "recon", features, size, method="head")
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from s4jax.errors import ConfigError
from s4jax.models.deeplabv3plus import DeepLabV3PlusDecoder
from s4jax.models.deeplabv3plus import aspp_rates_for_output_stride
from s4jax.models import efficientnet_lite
from s4jax.models import mobilenet_v2
from s4jax.models import heads as heads_lib
from s4jax.models.names import BACKBONE_OUTPUT_STRIDES
from s4jax.models.names import BACKBONES
from s4jax.models.names import RESNETS
from s4jax.models.resnet import ResNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Auxiliary head name -> module class. Every head maps decoder features to an output.


def validate_model_args(backbone: str, output_stride: int) -> None:
  """Raises a ConfigError (a ValueError) naming the config field if an argument is invalid."""
  if backbone not in BACKBONES:
    raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {backbone!r}.")
  strides = BACKBONE_OUTPUT_STRIDES[backbone]
  if output_stride not in strides:
    raise ConfigError(
      f"model.output_stride must be one of {strides} for {backbone}, got {output_stride!r}."
    )


def parse_dtype(name: str) -> Any:
  """Maps a config dtype string ("float32" | "bfloat16") to a JAX dtype."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {name!r}.")
  return DTYPES[name]


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinearly resizes ``[N, h, w, K]`` logits to ``size`` in float32."""
  logits = logits.astype(jnp.float32)
  n, _, _, k = logits.shape
  return jax.image.resize(logits, (n, *size, k), method="bilinear")


class Segmenter(nn.Module):
  """ResNet + DeepLabV3+ semantic segmentation network.

  Attributes:
    num_classes: number of classes K.
    backbone: one of ``BACKBONES``.
    output_stride: backbone output stride, 8, 16 or 32. The ASPP rates follow
      it ((12, 24, 36), (6, 12, 18), (3, 6, 9)).
    deep_stem: three 3x3 convs instead of the 7x7 stem (UniMatch backbones); ResNet only.
    width: backbone base channels (64 in the real networks); ResNet only.
    aspp_channels: ASPP branch/projection channels.
    decoder_channels: fuse conv channels.
    aspp_dropout: channel dropout after the ASPP projection, an optional
      regulariser (UniMatch's decoder has none, so the configs keep 0); a
      nonzero rate needs a "dropout" rng when ``train=True``.
    dtype: compute dtype; parameters and output logits are float32.
    aux_heads: ``heads.HeadSpec`` of every auxiliary head to build (unique names).
  """

  num_classes: int
  backbone: str = "resnet50"
  output_stride: int = 16
  deep_stem: bool = False
  width: int = 64
  aspp_channels: int = 256
  decoder_channels: int = 256
  aspp_dropout: float = 0.0
  dtype: Any = jnp.float32
  aux_heads: tuple[heads_lib.HeadSpec, ...] = ()

  def setup(self):
    validate_model_args(self.backbone, self.output_stride)
    # Attribute names differ from the field `backbone`; the explicit names
    # fix the top-level parameter collections.
    if self.backbone in RESNETS:
      self.backbone_net = ResNet(
        depth=int(self.backbone.removeprefix("resnet")),
        output_stride=self.output_stride,
        deep_stem=self.deep_stem,
        width=self.width,
        dtype=self.dtype,
        name="backbone",
      )
    else:  # fixed-width ImageNet networks: `width` and `deep_stem` do not apply
      network = {
        "mobilenet_v2": mobilenet_v2.MobileNetV2,
        "efficientnet_lite0": efficientnet_lite.EfficientNetLite0,
      }[self.backbone]
      self.backbone_net = network(
        output_stride=self.output_stride, dtype=self.dtype, name="backbone"
      )
    self.decoder = DeepLabV3PlusDecoder(
      num_classes=self.num_classes,
      atrous_rates=aspp_rates_for_output_stride(self.output_stride),
      aspp_channels=self.aspp_channels,
      decoder_channels=self.decoder_channels,
      dropout_rate=self.aspp_dropout,
      dtype=self.dtype,
      name="decoder",
    )
    self.heads = {
      spec.name: heads_lib.build_head(
        spec, self.decoder_channels, self.dtype, num_classes=self.num_classes
      )
      for spec in self.aux_heads
    }

  def encode(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns the (stride-4, stride-OS) backbone features: ResNet layer1 and layer4,
    MobileNetV2 blocks 3 and 17, EfficientNet-Lite0 blocks 2 and 15 (24 and 320 channels)."""
    features = self.backbone_net(x, train)
    if self.backbone in RESNETS:
      return features["layer1"], features["layer4"]
    return features["low"], features["high"]

  def decode(self, low: jax.Array, high: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Runs the decoder.

    Returns:
      ``{"features": stride-4 fused features (compute dtype), "logits":
      stride-4 float32 logits}``.
    """
    out = self.decoder(low, high, train)
    return {
      "features": out["features"],
      "logits": out["logits"].astype(jnp.float32),
    }

  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Segments ``x``.

    Args:
      x: float images ``[N, H, W, 3]``.
      train: batch statistics / batch_stats updates if True.

    Returns:
      ``{"logits": float32 [N, H, W, K] (bilinearly upsampled),
      "features": [N, H/4, W/4, decoder_channels] fused decoder features,
      "low", "high": the encoder's stride-4 and stride-OS features}``.
    """
    low, high = self.encode(x, train)
    out = self.decode(low, high, train)
    if self.is_initializing():
      sources = {"fused": out["features"], "low": low, "high": high}
      for spec in self.aux_heads:  # create their parameters; the result is not needed
        inputs = sources[spec.source]
        if spec.input_channels:  # a head on another head's output: only the width matters
          inputs = jnp.zeros(inputs.shape[:-1] + (spec.input_channels,), jnp.float32)
        self.head(spec.name, inputs, x.shape[1:3])
    return {
      "logits": upsample_logits(out["logits"], x.shape[1:3]),
      "features": out["features"],
      "low": low,
      "high": high,
    }

  def head(
    self, name: str, features: jax.Array, size: tuple[int, int] | None = None, train: bool = False
  ) -> jax.Array:
    """Auxiliary head `name` on `features`. RGB heads need `size` (the input's H, W) and
    return float32 [N, *size, 3]; the other kinds ignore it (heads.py)."""
    module = self.heads[name]
    if isinstance(module, heads_lib.ReconstructionHead):
      return module(features, tuple(size))
    return module(features, train)

  def reconstruct(self, features: jax.Array, size: tuple[int, int], head: str) -> jax.Array:
    """RGB head `head` on stride-4 decoder features; float32 [N, *size, 3]."""
    return self.head(head, features, size)


def build_segmenter(
  model_config: ml_collections.ConfigDict, num_classes: int, aux_heads: tuple = ()
) -> Segmenter:
  """Builds a Segmenter from the ``model`` section of the config.

  Args:
    model_config: ConfigDict with fields backbone, output_stride, deep_stem,
      width, aspp_channels, decoder_channels, dtype ("float32" | "bfloat16")
      and optionally aspp_dropout (default 0).
    num_classes: number of classes.
    aux_heads: auxiliary heads the enabled objectives need
      (`objectives.required_heads(config)`).

  Returns:
    An unbound Segmenter.
  """
  validate_model_args(model_config.backbone, model_config.output_stride)
  return Segmenter(
    num_classes=num_classes,
    backbone=model_config.backbone,
    output_stride=int(model_config.output_stride),
    deep_stem=bool(model_config.deep_stem),
    width=int(model_config.width),
    aspp_channels=int(model_config.aspp_channels),
    decoder_channels=int(model_config.decoder_channels),
    aspp_dropout=float(model_config.get("aspp_dropout", 0.0)),
    dtype=parse_dtype(model_config.dtype),
    aux_heads=tuple(sorted(aux_heads, key=lambda spec: spec.name)),
  )


def feature_widths(model: Segmenter) -> dict[str, int]:
  """Channels of the named features objectives read: {"low", "high", "fused"} (from shapes
  alone; nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  plain = model.clone(aux_heads=())
  out = jax.eval_shape(lambda x: plain.init_with_output(jax.random.key(0), x, train=False)[0], x)
  return {
    "low": out["low"].shape[-1],
    "high": out["high"].shape[-1],
    "fused": out["features"].shape[-1],
  }
