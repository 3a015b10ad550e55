"""Colour palettes and image grids for segmentation visualisations.

Everything here is host-side numpy on uint8 images; callers pass device arrays
through `np.asarray` (done here too) before logging.
"""

from collections.abc import Sequence

import numpy as np

from s4jax.labels import IGNORE_INDEX

# White marks "ignore" pixels in label maps.
IGNORE_COLOR = (255, 255, 255)
# Light grey between grid cells. Every channel value of a VOC palette colour
# has only its top three bits possibly set, so 200 (0b11001000) can never be
# confused with a class colour, nor with white (ignore) or black (background,
# padding).
SEPARATOR_COLOR = (200, 200, 200)


def make_palette(num_classes: int) -> np.ndarray:
  """Builds the PASCAL VOC colour map as a uint8 [256, 3] lookup table.

  Index i's colour comes from interleaving the bits of i into the top bits of
  R, G and B (the VOC development kit's `labelcolormap`), so VOC class colours
  are the standard ones: 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ... The table
  always has 256 rows so any uint8 mask can index it directly; entries at and
  beyond `num_classes` keep their (distinct) VOC colours, which makes
  out-of-range predictions visible instead of crashing, and index 255 (ignore)
  is white.

  Args:
    num_classes: Number of real classes, 1..255 (255 is reserved for ignore).
  """
  if not 1 <= num_classes <= IGNORE_INDEX:
    raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX}], got {num_classes}")
  palette = np.zeros((256, 3), dtype=np.uint8)
  for index in range(256):
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):  # Fill bits from the most significant down.
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
      if c == 0:
        break
    palette[index] = (r, g, b)
  palette[IGNORE_INDEX] = IGNORE_COLOR
  return palette


def _as_label_map(mask) -> np.ndarray:
  array = np.asarray(mask)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise ValueError(f"Mask must be [H, W] (or [H, W, 1]), got {array.shape}")
  if not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"Mask must hold integer class indices, got {array.dtype}")
  return array


def colorize(mask, palette: np.ndarray) -> np.ndarray:
  """Maps an integer class mask [H, W] to uint8 RGB [H, W, 3].

  Values outside 0..255 (e.g. a -1 ignore convention) are drawn as ignore.
  """
  labels = _as_label_map(mask).astype(np.int64)
  labels = np.where((labels < 0) | (labels > 255), IGNORE_INDEX, labels)
  return np.asarray(palette, dtype=np.uint8)[labels]


def _as_rgb_cell(cell) -> np.ndarray:
  array = np.asarray(cell)
  if array.dtype != np.uint8:
    raise TypeError(f"Grid cells must be uint8, got {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[:, :, None], 3, axis=2)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"Grid cells must be [H, W, 3] or [H, W], got {array.shape}")
  return array


def image_grid(rows: Sequence[Sequence[np.ndarray]], separator: int = 2) -> np.ndarray:
  """Tiles uint8 images into one image, row by row.

  Cells are uint8 [H, W, 3] or [H, W] (grayscale, expanded to RGB) and may
  differ in size: every cell slot is as large as the largest cell in the whole
  grid, with each cell placed at the slot's top-left and the rest padded black,
  so columns line up. Rows with fewer cells are padded with black slots.
  Slots are separated by `separator` pixels of `SEPARATOR_COLOR` (no outer
  border).

  Returns:
    uint8 [R * H + (R - 1) * s, C * W + (C - 1) * s, 3] for R rows, at most C
    cells per row, largest cell H x W and separator s.
  """
  if separator < 0:
    raise ValueError(f"separator must be >= 0, got {separator}")
  cells = [[_as_rgb_cell(cell) for cell in row] for row in rows]
  if not cells or not any(cells):
    raise ValueError("image_grid needs at least one cell")
  cell_h = max(c.shape[0] for row in cells for c in row)
  cell_w = max(c.shape[1] for row in cells for c in row)
  num_rows = len(cells)
  num_cols = max(len(row) for row in cells)
  height = num_rows * cell_h + (num_rows - 1) * separator
  width = num_cols * cell_w + (num_cols - 1) * separator
  grid = np.empty((height, width, 3), dtype=np.uint8)
  grid[...] = SEPARATOR_COLOR
  for i in range(num_rows):
    top = i * (cell_h + separator)
    for j in range(num_cols):
      left = j * (cell_w + separator)
      grid[top : top + cell_h, left : left + cell_w] = 0
      if j < len(cells[i]):
        cell = cells[i][j]
        grid[top : top + cell.shape[0], left : left + cell.shape[1]] = cell
  return grid


def prediction_grid(
  images,
  labels,
  predictions: Sequence,
  palette: np.ndarray,
  *,
  max_rows: int = 8,
  separator: int = 2,
) -> np.ndarray | None:
  """One row per example: image | ground truth | each prediction (e.g. student, teacher).

  Args:
    images: uint8 [N, H, W, 3].
    labels: integer [N, H, W] (or [N, H, W, 1]) class indices, 255 = ignore.
    predictions: a sequence of integer [N, H, W] (or [N, H, W, 1]) predicted classes.
    palette: uint8 [256, 3] from `make_palette`.
    max_rows: Only the first `max_rows` examples are drawn.
    separator: Pixels between panels and rows.

  Rows stop at the first example whose labels are all 255: the dummy padding of a short
  evaluation batch. Returns None when no row is left.

  Returns:
    uint8 [n * H + (n - 1) * separator, (2 + P) * W + (1 + P) * separator, 3] with
    n = min(N, max_rows) and P predictions (for equal-sized inputs; see `image_grid`).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  predictions = [np.asarray(p) for p in predictions]
  if any(len(p) != len(images) for p in [labels, *predictions]):
    raise ValueError(
      f"Batch sizes differ: images {len(images)}, labels {len(labels)}, "
      f"predictions {[len(p) for p in predictions]}"
    )
  if max_rows < 1:
    raise ValueError(f"max_rows must be >= 1, got {max_rows}")
  rows = []
  for i in range(min(len(images), max_rows)):
    if np.all(labels[i] == 255):
      break
    rows.append(
      [images[i], colorize(labels[i], palette)] + [colorize(p[i], palette) for p in predictions]
    )
  return image_grid(rows, separator=separator) if rows else None


def overlay(image, mask, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blends mask colours over an image: (1 - alpha) * image + alpha * colour.

  Ignore pixels (255, or outside 0..255) keep the original image, so the
  white ignore colour doesn't wash out object boundaries.

  Args:
    image: uint8 [H, W, 3].
    mask: integer [H, W] class indices of the same size.
    palette: uint8 [256, 3].
    alpha: Weight of the mask colour, in [0, 1].
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  base = _as_rgb_cell(image)
  labels = _as_label_map(mask)
  if labels.shape != base.shape[:2]:
    raise ValueError(f"Mask shape {labels.shape} != image size {base.shape[:2]}")
  colours = colorize(labels, palette).astype(np.float32)
  blended = (1.0 - alpha) * base.astype(np.float32) + alpha * colours
  blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
  ignore = (labels < 0) | (labels >= IGNORE_INDEX)
  return np.where(ignore[..., None], base, blended)
