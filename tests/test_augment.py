"""Device-side augmentations against NumPy references or their defining properties."""

import colorsys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from s4jax import augment


def _rng_image(seed, shape=(12, 10, 3)):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_grayscale_is_luminance():
  img = _rng_image(0)
  got = np.asarray(augment.grayscale(img))
  luma = img @ np.array([0.299, 0.587, 0.114], np.float32)
  for c in range(3):
    np.testing.assert_allclose(got[..., c], luma, rtol=1e-6)


def test_brightness_contrast_saturation_match_numpy():
  img = _rng_image(1)
  luma = img @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(
    augment.adjust_brightness(img, 1.3), np.clip(img * 1.3, 0, 1), rtol=1e-6
  )
  expected = np.clip(0.6 * img + 0.4 * luma.mean(), 0, 1)
  np.testing.assert_allclose(augment.adjust_contrast(img, 0.6), expected, rtol=1e-5, atol=1e-6)
  expected = np.clip(1.4 * img - 0.4 * luma[..., None], 0, 1)
  np.testing.assert_allclose(augment.adjust_saturation(img, 1.4), expected, rtol=1e-5, atol=1e-6)


def test_hue_shift_matches_colorsys():
  img = _rng_image(2, (6, 5, 3))
  got = np.asarray(augment.adjust_hue(img, 0.2))
  expected = np.zeros_like(img)
  for idx in np.ndindex(img.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*img[idx])
    expected[idx] = colorsys.hsv_to_rgb((h + 0.2) % 1.0, s, v)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # A zero shift is the identity.
  np.testing.assert_allclose(augment.adjust_hue(img, 0.0), img, atol=1e-5)


def test_blur_preserves_constant_images_and_matches_numpy():
  const = np.full((9, 11, 3), 0.37, np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(const, 1.5, 4), const, rtol=1e-6)
  img = _rng_image(3, (9, 11, 3))
  sigma, radius = 1.2, 4
  x = np.arange(-radius, radius + 1)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  padded = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  expected = np.zeros_like(img)
  for i in range(img.shape[0]):
    for j in range(img.shape[1]):
      patch = padded[i : i + 2 * radius + 1, j : j + 2 * radius + 1]
      expected[i, j] = np.einsum("abc,a,b->c", patch, k, k)
  np.testing.assert_allclose(
    augment.gaussian_blur(img, sigma, radius), expected, rtol=1e-5, atol=1e-6
  )


def test_color_jitter_with_zero_strength_is_identity():
  img = _rng_image(4)
  out = augment.color_jitter(jax.random.key(0), img, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(out, img, atol=1e-5)
  out = augment.color_jitter(jax.random.key(0), img, 0.5, 0.5, 0.5, 0.25)
  assert np.abs(np.asarray(out) - img).max() > 1e-3
  assert out.min() >= 0 and out.max() <= 1


def _strong_cfg(**kw):
  cfg = dict(
    brightness=0.5,
    contrast=0.5,
    saturation=0.5,
    hue=0.25,
    jitter_p=0.8,
    grayscale_p=0.2,
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
  )
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_strong_view_probabilities():
  img = _rng_image(5, (8, 8, 3))
  keys = jax.random.split(jax.random.key(1), 2000)
  # Only grayscale on: the share of gray outputs is ~0.2.
  cfg = _strong_cfg(jitter_p=0.0, blur_p=0.0, grayscale_p=0.2)
  out = jax.vmap(lambda k: augment.strong_photometric(k, img, cfg))(keys)
  is_gray = np.all(np.abs(np.asarray(out[..., 0]) - np.asarray(out[..., 1])) < 1e-6, axis=(1, 2))
  assert abs(is_gray.mean() - 0.2) < 0.03
  # Everything off: identity.
  cfg = _strong_cfg(jitter_p=0.0, blur_p=0.0, grayscale_p=0.0)
  out = jax.vmap(lambda k: augment.strong_photometric(k, img, cfg))(keys[:4])
  np.testing.assert_allclose(out, np.broadcast_to(img, out.shape))


def test_cutmix_box_area_aspect_and_inside():
  h, w = 64, 48
  keys = jax.random.split(jax.random.key(2), 3000)
  boxes = np.asarray(
    jax.vmap(lambda k: augment.cutmix_box(k, h, w, (0.02, 0.4), (0.3, 1 / 0.3), 0.5))(keys)
  )
  applied = boxes.any(axis=(1, 2))
  assert abs(applied.mean() - 0.5) < 0.03
  areas = boxes[applied].sum(axis=(1, 2)) / (h * w)
  assert areas.max() <= 0.4 + 1e-9
  assert areas.min() >= 0.005  # clipping at extreme aspects can only shrink a little
  for box in boxes[applied][:200]:
    ys, xs = np.nonzero(box)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert box.sum() == bh * bw  # a filled rectangle
    aspect = bh / bw
    # Sides are floored/clipped, so allow a little slack around [0.3, 1/0.3].
    assert 0.3 * 0.6 <= aspect <= (1 / 0.3) / 0.6


def test_paste_uses_the_same_box_for_image_and_labels():
  rng = np.random.default_rng(6)
  images = rng.random((4, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 5, (4, 8, 8))
  box = np.zeros((4, 8, 8), bool)
  box[:, 2:5, 3:7] = True
  box[3] = False
  partner = augment.cutmix_partners(4)
  partner_images = jnp.asarray(images)[partner]
  partner_labels = jnp.asarray(labels)[partner]
  mixed_images = np.asarray(augment.paste(box, images, partner_images))
  mixed_labels = np.asarray(augment.paste(box, labels, partner_labels))
  np.testing.assert_array_equal(mixed_images[0, 2:5, 3:7], images[3, 2:5, 3:7])
  np.testing.assert_array_equal(mixed_labels[0, 2:5, 3:7], labels[3, 2:5, 3:7])
  np.testing.assert_array_equal(mixed_images[0, 0], images[0, 0])
  np.testing.assert_array_equal(mixed_labels[3], labels[3])


def test_cutmix_partners_are_the_reversed_batch_and_never_the_example_itself():
  np.testing.assert_array_equal(augment.cutmix_partners(4), [3, 2, 1, 0])
  np.testing.assert_array_equal(augment.cutmix_partners(5), [4, 3, 3, 1, 0])
  for n in range(2, 12):
    partner = augment.cutmix_partners(n)
    assert np.all(partner != np.arange(n)), n
    assert partner.min() >= 0 and partner.max() < n


def _numpy_obtain_cutmix_box(
  rng, size, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3
):
  """UniMatch's obtain_cutmix_box (dataset/transform.py), re-written in NumPy: returns the
  box (h, w), or None when no box is drawn."""
  if rng.random() > p:
    return None
  area = rng.uniform(size_min, size_max) * size * size
  while True:
    ratio = rng.uniform(ratio_1, ratio_2)
    box_w = int(np.sqrt(area / ratio))
    box_h = int(np.sqrt(area * ratio))
    x = rng.integers(0, size)
    y = rng.integers(0, size)
    if x + box_w <= size and y + box_h <= size:
      return box_h, box_w


def test_cutmix_box_aspect_quantiles_match_the_reference_sampler():
  size, draws = 64, 4000
  rng = np.random.default_rng(0)
  ref = [b for b in (_numpy_obtain_cutmix_box(rng, size, p=1.0) for _ in range(draws))]
  ref_aspect = np.array([h / w for h, w in ref])
  ref_area = np.array([h * w for h, w in ref]) / size**2
  boxes = np.asarray(
    jax.vmap(lambda k: augment.cutmix_box(k, size, size, (0.02, 0.4), (0.3, 1 / 0.3), 1.0))(
      jax.random.split(jax.random.key(5), draws)
    )
  )
  rows, cols = boxes.any(axis=2).sum(axis=1), boxes.any(axis=1).sum(axis=1)
  aspect, area = rows / cols, boxes.sum(axis=(1, 2)) / size**2
  qs = (0.1, 0.25, 0.5, 0.75, 0.9)
  # Sampling error of a quantile of 4000 draws is a few percent; clipping (the old sampler)
  # moved the median aspect from ~1.56 to ~1.8, far outside this tolerance.
  np.testing.assert_allclose(np.quantile(aspect, qs), np.quantile(ref_aspect, qs), rtol=0.08)
  np.testing.assert_allclose(
    np.quantile(area, qs), np.quantile(ref_area, qs), rtol=0.08, atol=0.005
  )
