"""Device-side image operations (pure JAX, run inside the compiled step).

The host ships uint8 crops; everything photometric happens here, so the host sends one
weak crop per image instead of several views.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

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


# ---- photometric strong augmentation (per example; vmap over a batch) -------------------
# Luminance weights of ITU-R 601, as torchvision's rgb_to_grayscale and PIL's "L" mode.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def grayscale(image):
  """[..., H, W, 3] in [0, 1] -> same shape, every channel the luminance."""
  luma = jnp.tensordot(image, jnp.asarray(LUMA_WEIGHTS, image.dtype), axes=([-1], [0]))
  return jnp.broadcast_to(luma[..., None], image.shape)


def adjust_brightness(image, factor):
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  """Blend with the mean luminance of the image (torchvision's definition)."""
  mean = jnp.mean(grayscale(image)[..., 0], axis=(-2, -1), keepdims=True)[..., None]
  return jnp.clip(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  """Blend with the per-pixel luminance."""
  return jnp.clip(factor * image + (1.0 - factor) * grayscale(image), 0.0, 1.0)


def rgb_to_hsv(image):
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  delta = maxc - minc
  safe_delta = jnp.where(delta > 0, delta, 1.0)
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv):
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
  g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
  b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(image, shift):
  """Rotates the hue by `shift` turns (in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(key, image, brightness, contrast, saturation, hue):
  """torchvision-style ColorJitter for one image: factors U(1-x, 1+x), hue U(-h, h), the four
  operations applied in a random order."""
  kb, kc, ks, kh, kp = jax.random.split(key, 5)

  def factor(k, amount):
    return jax.random.uniform(k, (), minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)

  ops = (
    lambda x: adjust_brightness(x, factor(kb, brightness)),
    lambda x: adjust_contrast(x, factor(kc, contrast)),
    lambda x: adjust_saturation(x, factor(ks, saturation)),
    lambda x: adjust_hue(x, jax.random.uniform(kh, (), minval=-hue, maxval=hue)),
  )
  order = jax.random.permutation(kp, 4)
  for position in range(4):
    image = jax.lax.switch(order[position], ops, image)
  return image


def gaussian_kernel_1d(sigma, radius: int):
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (x / sigma) ** 2)
  return weights / weights.sum()


def gaussian_blur(image, sigma, radius: int):
  """Separable Gaussian blur of one [H, W, C] image, edges extended (as PIL does).

  `radius` is static (the kernel has 2 * radius + 1 taps); `sigma` may be traced.
  """
  kernel = gaussian_kernel_1d(sigma, radius)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  h, w = image.shape[0], image.shape[1]
  # Shifted weighted sums: 2 * (2r + 1) fused multiply-adds, no convolution layout games.
  rows = sum(kernel[i] * padded[i : i + h, :, :] for i in range(2 * radius + 1))
  return sum(kernel[i] * rows[:, i : i + w, :] for i in range(2 * radius + 1))


def strong_photometric(key, image, cfg):
  """One strong view of one image in [0, 1]: jitter (p), grayscale (p), blur (p).

  cfg: `config.augment` (brightness, contrast, saturation, hue, jitter_p, grayscale_p,
  blur_p, blur_sigma).
  """
  k_jp, k_j, k_gp, k_bp, k_bs = jax.random.split(key, 5)
  jittered = color_jitter(k_j, image, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
  image = jnp.where(jax.random.uniform(k_jp) < cfg.jitter_p, jittered, image)
  image = jnp.where(jax.random.uniform(k_gp) < cfg.grayscale_p, grayscale(image), image)
  lo, hi = cfg.blur_sigma
  sigma = jax.random.uniform(k_bs, (), minval=lo, maxval=hi)
  radius = int(math.ceil(3.0 * hi))
  image = jnp.where(
    jax.random.uniform(k_bp) < cfg.blur_p, gaussian_blur(image, sigma, radius), image
  )
  return image


# ---- CutMix -----------------------------------------------------------------------------
def cutmix_box(key, height: int, width: int, area_range, aspect_range, p):
  """A boolean [H, W] box, empty with probability 1 - p: UniMatch's `obtain_cutmix_box`.

  Area U(area_range) * H * W once; then aspect h/w U(aspect_range) and a top-left corner
  uniform over the whole image are redrawn together until the box fits inside the image
  (sides floored, as UniMatch's `int()`). Rejection keeps the reference's distribution:
  clipping instead would skew large boxes towards the extreme aspects. The loop runs on
  device (`lax.while_loop`); a box that cannot fit at any aspect (area > H * W) would never
  end, so after `_MAX_CUTMIX_TRIES` draws the last one is clipped to the image.
  """
  k_apply, k_area, k_loop = jax.random.split(key, 3)
  area = jax.random.uniform(k_area, (), minval=area_range[0], maxval=area_range[1])
  area = area * height * width

  def draw(k):
    k_aspect, k_y, k_x = jax.random.split(k, 3)
    aspect = jax.random.uniform(k_aspect, (), minval=aspect_range[0], maxval=aspect_range[1])
    box_h = jnp.floor(jnp.sqrt(area * aspect)).astype(jnp.int32)
    box_w = jnp.floor(jnp.sqrt(area / aspect)).astype(jnp.int32)
    y0 = jax.random.randint(k_y, (), 0, height)
    x0 = jax.random.randint(k_x, (), 0, width)
    return y0, x0, box_h, box_w

  def fits(draw_):
    y0, x0, box_h, box_w = draw_
    return (y0 + box_h <= height) & (x0 + box_w <= width)

  def cond(carry):
    tries, _, drawn = carry
    return ~fits(drawn) & (tries < _MAX_CUTMIX_TRIES)

  def body(carry):
    tries, k, _ = carry
    k, k_draw = jax.random.split(k)
    return tries + 1, k, draw(k_draw)

  k_loop, k_first = jax.random.split(k_loop)
  _, _, (y0, x0, box_h, box_w) = jax.lax.while_loop(cond, body, (1, k_loop, draw(k_first)))
  box_h = jnp.minimum(box_h, height - y0)
  box_w = jnp.minimum(box_w, width - x0)
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  box = (ys >= y0) & (ys < y0 + box_h) & (xs >= x0) & (xs < x0 + box_w)
  return box & (jax.random.uniform(k_apply) < p)


_MAX_CUTMIX_TRIES = 1000


def cutmix_partners(n: int) -> np.ndarray:
  """Static partner index of every example of a global batch of n: the batch reversed
  (UniMatch V2's `flip(0)`), except that the middle example of an odd batch, which would be
  its own partner, takes its neighbour. Nobody pastes itself for n >= 2.

  Indexing a sharded batch with it is a collective permute that XLA inserts under `jit`,
  so the partner never depends on how the batch is split over devices.
  """
  partner = np.arange(n)[::-1].copy()
  if n % 2 and n > 1:
    middle = n // 2
    partner[middle] = middle + 1
  return partner


def paste(box, own, partner):
  """own with `partner` pasted inside `box` ([N, H, W] bool); own/partner [N, H, W, ...]."""
  box = box.reshape(box.shape + (1,) * (own.ndim - box.ndim))
  return jnp.where(box, partner, own)
