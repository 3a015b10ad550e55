"""Any folder of images and masks, described by a small classes.json: no dataset code to write.

Layout (masks mirror the images' relative paths, with a .png extension; a training image
without a mask is unlabelled):

  my_data/                         <- data.root
    classes.json
    images/train/**/<name>.jpg|png
    masks/train/**/<name>.png      (class index per pixel, 255 = ignore)
    images/val/**/...
    masks/val/**/...               (every validation image needs one)

classes.json:

  {"classes": ["background", "cat", "dog"],     # required, index = position
   "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]],   # optional, RGB per class
   "ignore_colour": [255, 255, 255],            # optional, read as 255 in colour masks
   "background_classes": [0]}                   # optional, default [0]

Masks are single-channel PNGs of class indices (mode L or P: palette PNGs are read as
their indices). With a "palette", colour (RGB) masks are accepted too and read by colour.
Split files (`data.labelled_list`, ...) may list "images/train/a.jpg masks/train/a.png"
pairs, image paths, or names relative to images/train/.
"""

from __future__ import annotations

import json
import os

import numpy as np

from s4jax.data import files
from s4jax.errors import DataError

CLASSES_FILE = "classes.json"

EXPECTED_TREE = """\
  my_data/                         <- data.root
    classes.json                   {"classes": ["background", ...], "palette": [[r, g, b], ...]}
    images/train/**/<name>.jpg|png
    masks/train/**/<name>.png      (class indices; an image without a mask is unlabelled)
    images/val/**/<name>.jpg|png
    masks/val/**/<name>.png
"""


def read_classes(path: str) -> dict:
  """The parsed and checked classes.json: {"classes", "palette", "ignore_colour",
  "background_classes"}."""
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise DataError(
      f"{path} does not exist. The folder dataset needs it: "
      '{"classes": ["background", "cat", ...]} (see README, "Real datasets").'
    ) from None
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"Cannot read {path} as JSON ({e}).") from None

  def fail(problem):
    raise DataError(f"{path}: {problem}")

  if not isinstance(spec, dict):
    fail('expected an object like {"classes": ["background", "cat", ...]}.')
  unknown = set(spec) - {"classes", "palette", "ignore_colour", "background_classes"}
  if unknown:
    fail(
      f"unknown keys {sorted(unknown)}; expected classes, palette, ignore_colour, "
      "background_classes."
    )
  names = spec.get("classes")
  if (
    not isinstance(names, list)
    or not names
    or len(names) > 255
    or not all(isinstance(n, str) and n for n in names)
  ):
    fail('"classes" must be a list of 1 to 255 non-empty class names.')
  if len(set(names)) != len(names):
    fail('"classes" has repeated names.')

  def colour_list(key, value, count=None):
    array = np.asarray(value)
    if (
      array.ndim != 2
      or array.shape[1] != 3
      or array.dtype.kind not in "iu"
      or array.min(initial=0) < 0
      or array.max(initial=0) > 255
    ):
      fail(f'"{key}" must be a list of [r, g, b] integer triples in 0..255.')
    if count is not None and len(array) != count:
      fail(f'"{key}" has {len(array)} colours for {count} classes.')
    return array.astype(np.int64)

  palette = colour_list("palette", spec["palette"], len(names)) if "palette" in spec else None
  if palette is not None and len(np.unique(files.colour_codes(palette))) != len(palette):
    fail('"palette" has repeated colours.')
  ignore = None
  if "ignore_colour" in spec:
    ignore = colour_list("ignore_colour", [spec["ignore_colour"]])
  background = spec.get("background_classes", [0])
  if not isinstance(background, list) or not all(
    isinstance(c, int) and 0 <= c < len(names) for c in background
  ):
    fail(f'"background_classes" must be a list of class indices in 0..{len(names) - 1}.')
  return {
    "classes": tuple(names),
    "palette": palette,
    "ignore_colour": ignore,
    "background_classes": tuple(background),
  }


class FolderLayout(files.Layout):
  name = "folder"
  expected_tree = EXPECTED_TREE
  split_help = (
    "The folder dataset has no published splits: give your own files with "
    "--config.data.labelled_list / --config.data.unlabelled_list (python -m "
    "s4jax.data.splits --dataset=folder ... writes seeded ones)."
  )

  def __init__(self, root: str, check: bool = True):
    super().__init__(root, check)
    classes = read_classes(os.path.join(root, CLASSES_FILE))
    self.class_names = classes["classes"]
    self.background_classes = classes["background_classes"]
    self.colours = classes["palette"]
    self.ignore_colours = classes["ignore_colour"]

  def check_root(self) -> None:
    super().check_root()
    self.require_dir("images")

  def _entries(self, split: str, masks_required: bool) -> list[files.Entry]:
    image_dir = self.require_dir("images", split)
    entries = []
    for relative in files.list_images(image_dir):
      mask = self._mask_for(os.path.join("images", split, relative))
      if mask is None and masks_required:
        raise DataError(
          f"Validation image {os.path.join(image_dir, relative)} has no mask "
          f"{os.path.join(self.root, 'masks', split, files.stem(relative))}.png;"
          " every validation image needs one."
        )
      entries.append(files.Entry(os.path.join("images", split, relative), mask))
    if not entries:
      raise self.layout_error(f"{image_dir} holds no images.")
    return entries

  def _mask_for(self, image_path: str) -> str | None:
    """masks/<split>/<same relative path>.png if it exists."""
    parts = image_path.replace(os.sep, "/").split("/")
    if parts[0] != "images":
      return None
    mask = "/".join(["masks"] + parts[1:-1] + [files.stem(parts[-1]) + ".png"])
    return mask if os.path.isfile(os.path.join(self.root, mask)) else None

  def train_entries(self) -> list[files.Entry]:
    return self._entries("train", masks_required=False)

  def val_entries(self) -> list[files.Entry]:
    return self._entries("val", masks_required=True)

  def resolve(self, first: str, second: str | None, origin: str) -> files.Entry:
    if second is not None:
      return files.Entry(first, second, origin)
    if not first.replace(os.sep, "/").startswith("images/"):
      first = os.path.join("images", "train", first)
    return files.Entry(first, self._mask_for(first), origin)
