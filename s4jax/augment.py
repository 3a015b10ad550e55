"""Device-side image operations (pure JAX, run inside the compiled step).

The host ships uint8 crops; everything photometric happens here, so the host sends one
weak crop per image instead of several views.
"""

import jax.numpy as jnp

# ImageNet statistics (RGB, 0..1 scale), as used by torchvision-pretrained backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_range(images_uint8):
  """uint8 [..., 3] in 0..255 -> float32 in [0, 1]."""
  return images_uint8.astype(jnp.float32) / 255.0


def normalize(images_unit):
  """Images in [0, 1] -> ImageNet-normalised float32."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images_unit - mean) / std


def normalize_uint8(images_uint8):
  """uint8 images -> ImageNet-normalised float32 (the network's input space)."""
  return normalize(to_unit_range(images_uint8))


def denormalize_to_uint8(images):
  """Inverse of `normalize_uint8`, clipped; for visualisation."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  unit = jnp.clip(images * std + mean, 0.0, 1.0)
  return jnp.round(unit * 255.0).astype(jnp.uint8)
