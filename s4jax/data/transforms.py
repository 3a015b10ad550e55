"""Host-side weak geometric transforms (the "weak view" of docs/methods.md §0).

Random rescale of the longer side, padding up to the crop size, a random square
crop and a horizontal flip, applied identically to an image and its label-like
companions:

* `mask`: the class index map; resampled with nearest neighbour (so no new
  labels appear) and padded with 255 (ignore).
* `valid`: 1 on real pixels and 0 on padding, for unlabelled images whose
  padding must not count in the consistency loss.

Everything stays uint8 on the host; normalisation and the strong (photometric)
views happen on the device. Every random draw comes from the `rng` argument,
and the draws never depend on whether `mask` or `valid` are given, so the
geometry of an image is the same with or without its companions.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from s4jax.labels import IGNORE_INDEX  # noqa: F401  (re-exported)

IMAGE_PAD_VALUE = 0
VALID_PAD_VALUE = 0

ScaleRange = tuple[float, float]


def _check_scale_range(scale_range: ScaleRange) -> tuple[float, float]:
  low, high = (float(s) for s in scale_range)
  if not 0.0 < low <= high:
    raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}.")
  return low, high


def _check_crop_size(crop_size: int) -> int:
  if int(crop_size) <= 0:
    raise ValueError(f"crop_size must be positive, got {crop_size}.")
  return int(crop_size)


def _resize(array: np.ndarray, height: int, width: int, resample) -> np.ndarray:
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def random_rescale(
  image: np.ndarray,
  mask: np.ndarray | None,
  rng: np.random.Generator,
  scale_range: ScaleRange = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray | None]:
  """Rescales so the longer side becomes `longer side × U(scale_range)`.

  Args:
    image: uint8[H, W, 3].
    mask: uint8[H, W] or None.
    rng: source of the scale draw.
    scale_range: (low, high) bounds of the uniform scale factor.

  Returns:
    (image, mask): image resampled bilinearly, mask with nearest neighbour
    (None stays None). The aspect ratio is kept; no side falls below 1 px.
  """
  low, high = _check_scale_range(scale_range)
  scale = rng.uniform(low, high)
  height, width = image.shape[:2]
  longer = max(height, width)
  new_longer = max(1, int(round(longer * scale)))
  factor = new_longer / longer
  new_height = max(1, int(round(height * factor)))
  new_width = max(1, int(round(width * factor)))
  if (new_height, new_width) == (height, width):
    return image, mask
  image = _resize(image, new_height, new_width, Image.BILINEAR)
  if mask is not None:
    mask = _resize(mask, new_height, new_width, Image.NEAREST)
  return image, mask


def _pad_bottom_right(array: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
  pad = [(0, height - array.shape[0]), (0, width - array.shape[1])]
  pad += [(0, 0)] * (array.ndim - 2)
  return np.pad(array, pad, mode="constant", constant_values=value)


def pad_to_at_least(
  image: np.ndarray,
  mask: np.ndarray | None,
  valid: np.ndarray | None,
  size: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Pads bottom/right so that both sides are at least `size`.

  Padding values: image 0, mask 255 (ignore), valid 0. Arrays already large
  enough are returned unchanged; None companions stay None.
  """
  height, width = image.shape[:2]
  target_h, target_w = max(height, int(size)), max(width, int(size))
  if (target_h, target_w) == (height, width):
    return image, mask, valid
  image = _pad_bottom_right(image, target_h, target_w, IMAGE_PAD_VALUE)
  if mask is not None:
    mask = _pad_bottom_right(mask, target_h, target_w, IGNORE_INDEX)
  if valid is not None:
    valid = _pad_bottom_right(valid, target_h, target_w, VALID_PAD_VALUE)
  return image, mask, valid


def random_crop(
  image: np.ndarray,
  mask: np.ndarray | None,
  valid: np.ndarray | None,
  crop_size: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Crops the same random `crop_size` square from all given arrays.

  The arrays must already be at least `crop_size` on both sides (see
  `pad_to_at_least`).
  """
  crop_size = _check_crop_size(crop_size)
  height, width = image.shape[:2]
  if height < crop_size or width < crop_size:
    raise ValueError(
      f"image of size {height}x{width} is smaller than crop_size={crop_size}; pad it first."
    )
  top = int(rng.integers(0, height - crop_size + 1))
  left = int(rng.integers(0, width - crop_size + 1))
  window = (slice(top, top + crop_size), slice(left, left + crop_size))
  image = image[window]
  mask = mask[window] if mask is not None else None
  valid = valid[window] if valid is not None else None
  return image, mask, valid


def random_hflip(
  image: np.ndarray,
  mask: np.ndarray | None,
  valid: np.ndarray | None,
  rng: np.random.Generator,
  p: float = 0.5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Mirrors all given arrays left-right together with probability `p`."""
  if rng.random() >= p:
    return image, mask, valid
  image = image[:, ::-1]
  mask = mask[:, ::-1] if mask is not None else None
  valid = valid[:, ::-1] if valid is not None else None
  return image, mask, valid


def _contiguous(array: np.ndarray | None) -> np.ndarray | None:
  return None if array is None else np.ascontiguousarray(array)


def _weak_geometry(
  image: np.ndarray,
  mask: np.ndarray | None,
  valid: np.ndarray | None,
  crop_size: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Pad, crop and flip after a rescale; returns contiguous arrays."""
  image, mask, valid = pad_to_at_least(image, mask, valid, crop_size)
  image, mask, valid = random_crop(image, mask, valid, crop_size, rng)
  image, mask, valid = random_hflip(image, mask, valid, rng)
  # Views from flips and crops would otherwise keep the whole rescaled image
  # alive and be slow to batch.
  return _contiguous(image), _contiguous(mask), _contiguous(valid)


def weak_labelled(
  image: np.ndarray,
  mask: np.ndarray,
  crop_size: int,
  rng: np.random.Generator,
  scale_range: ScaleRange = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
  """Weak view of a labelled pair.

  Args:
    image: uint8[H, W, 3].
    mask: uint8[H, W] class indices (255 = ignore).
    crop_size: side `c` of the square output.
    rng: source of all random draws.
    scale_range: bounds of the random rescale factor of the longer side.

  Returns:
    (image uint8[c, c, 3], mask uint8[c, c]); padded pixels have mask 255.
  """
  crop_size = _check_crop_size(crop_size)
  image, mask = random_rescale(image, mask, rng, scale_range)
  image, mask, _ = _weak_geometry(image, mask, None, crop_size, rng)
  return image, mask


def weak_unlabelled(
  image: np.ndarray,
  crop_size: int,
  rng: np.random.Generator,
  scale_range: ScaleRange = (0.5, 2.0),
  *,
  mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Weak view of an unlabelled image.

  Args:
    image: uint8[H, W, 3].
    crop_size: side `c` of the square output.
    rng: source of all random draws.
    scale_range: bounds of the random rescale factor of the longer side.
    mask: optional hidden ground truth, carried through the same geometry for
      pseudo-label diagnostics only (never for training). Passing it does not
      change the image's geometry.

  Returns:
    (image uint8[c, c, 3], valid uint8[c, c]) with valid 0 on padding, and the
    transformed mask uint8[c, c] (255 on padding) as a third element when
    `mask` is given.
  """
  crop_size = _check_crop_size(crop_size)
  image, mask = random_rescale(image, mask, rng, scale_range)
  valid = np.ones(image.shape[:2], dtype=np.uint8)
  image, mask, valid = _weak_geometry(image, mask, valid, crop_size, rng)
  if mask is None:
    return image, valid
  return image, valid, mask
