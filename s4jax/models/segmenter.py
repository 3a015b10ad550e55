"""The segmentation network: ResNet backbone + DeepLabV3+ decoder.

Top-level parameter collections are ``params["backbone"]`` and
``params["decoder"]`` (the optimizer picks the decoder's higher learning rate
by that name). ``encode`` and ``decode`` are exposed as methods so that
training code can run them separately, e.g. to perturb (channel-drop) the
encoder features before decoding::

  low, high = model.apply(variables, x, train, method="encode")
  out = model.apply(variables, low, high, train, method="decode")

With ``train=True`` pass ``mutable=["batch_stats"]`` as usual.

Auxiliary heads (e.g. image reconstruction) are built when an objective asks for them
(``aux_heads``, names from ``HEAD_TYPES``); their parameters live under
``params["head_<name>"]`` (so the optimizer treats them as head parameters) and are created
at ``init`` even though ``__call__`` does not use them::

  rgb = model.apply(variables, features, size, "recon", method="reconstruct")
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from s4jax.models.deeplabv3plus import DeepLabV3PlusDecoder
from s4jax.models.deeplabv3plus import aspp_rates_for_output_stride
from s4jax.models.heads import ReconstructionHead
from s4jax.models.resnet import OUTPUT_STRIDES
from s4jax.models.resnet import ResNet

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Auxiliary head name -> module class. Every head maps decoder features to an output.
HEAD_TYPES = {
    "recon": ReconstructionHead,      # METHODS.md §1 and §2: D_rec
    "recon_fg": ReconstructionHead,   # §1 object/background variant: D_fg
    "recon_bg": ReconstructionHead,   # and D_bg
}


def validate_model_args(backbone: str, output_stride: int) -> None:
  """Raises a ValueError naming the config field if an argument is invalid."""
  if backbone not in BACKBONES:
    raise ValueError(
        f"model.backbone must be one of {BACKBONES}, got {backbone!r}."
    )
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(
        f"model.output_stride must be one of {OUTPUT_STRIDES}, "
        f"got {output_stride!r}."
    )


def parse_dtype(name: str) -> Any:
  """Maps a config dtype string ("float32" | "bfloat16") to a JAX dtype."""
  if name not in DTYPES:
    raise ValueError(
        f"model.dtype must be one of {tuple(DTYPES)}, got {name!r}."
    )
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
    deep_stem: three 3x3 convs instead of the 7x7 stem (UniMatch backbones).
    width: backbone base channels (64 in the real networks).
    aspp_channels: ASPP branch/projection channels.
    decoder_channels: fuse conv channels.
    aspp_dropout: dropout after the ASPP projection (UniMatch uses 0.5); a
      nonzero rate needs a "dropout" rng when ``train=True``.
    dtype: compute dtype; parameters and output logits are float32.
    aux_heads: names (keys of ``HEAD_TYPES``) of the auxiliary heads to build.
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
  aux_heads: tuple[str, ...] = ()

  def setup(self):
    validate_model_args(self.backbone, self.output_stride)
    # Attribute names differ from the field `backbone`; the explicit names
    # fix the top-level parameter collections.
    self.backbone_net = ResNet(
        depth=int(self.backbone.removeprefix("resnet")),
        output_stride=self.output_stride,
        deep_stem=self.deep_stem,
        width=self.width,
        dtype=self.dtype,
        name="backbone",
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
    unknown = sorted(set(self.aux_heads) - set(HEAD_TYPES))
    if unknown:
      raise ValueError(f"Unknown auxiliary heads {unknown}; known: {sorted(HEAD_TYPES)}.")
    # Half the decoder's width: the heads are meant to be light next to the decoder.
    head_channels = max(self.decoder_channels // 2, 16)
    self.heads = {name: HEAD_TYPES[name](channels=head_channels, dtype=self.dtype,
                                         name=f"head_{name}")
                  for name in self.aux_heads}

  def encode(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns the (layer1 stride-4, layer4 stride-OS) backbone features."""
    features = self.backbone_net(x, train)
    return features["layer1"], features["layer4"]

  def decode(
      self, low: jax.Array, high: jax.Array, train: bool
  ) -> dict[str, jax.Array]:
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
      "logits_stride4": float32 [N, H/4, W/4, K],
      "features": [N, H/4, W/4, decoder_channels]}``.
    """
    low, high = self.encode(x, train)
    out = self.decode(low, high, train)
    if self.is_initializing():
      for name in self.aux_heads:  # create their parameters; the result is not needed
        self.reconstruct(out["features"], x.shape[1:3], name)
    return {
        "logits": upsample_logits(out["logits"], x.shape[1:3]),
        "logits_stride4": out["logits"],
        "features": out["features"],
    }


  def reconstruct(self, features: jax.Array, size: tuple[int, int], head: str) -> jax.Array:
    """Runs auxiliary head `head` on stride-4 decoder features; float32 [N, *size, 3]."""
    return self.heads[head](features, tuple(size))


def build_segmenter(
    model_config: ml_collections.ConfigDict, num_classes: int,
    aux_heads: tuple[str, ...] = ()
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
      aux_heads=tuple(sorted(aux_heads)),
  )
