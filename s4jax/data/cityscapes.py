"""Cityscapes (fine annotations): 19 evaluation classes, everything else ignored (255).

Masks are read from `gtFine/.../*_gtFine_labelIds.png` (the official label ids 0..33,
mapped here to the 19 train ids) or, where a split file names them or no labelIds file
exists, `*_gtFine_labelTrainIds.png` (already train ids, as produced by cityscapesScripts'
createTrainIdLabelImgs and shipped by some S4 repositories).
"""

from __future__ import annotations

import os

import numpy as np

from s4jax.data import files

CLASS_NAMES = (
  "road",
  "sidewalk",
  "building",
  "wall",
  "fence",
  "pole",
  "traffic_light",
  "traffic_sign",
  "vegetation",
  "terrain",
  "sky",
  "person",
  "rider",
  "car",
  "truck",
  "bus",
  "train",
  "motorcycle",
  "bicycle",
)
NUM_CLASSES = len(CLASS_NAMES)
# The "stuff" classes road..sky: background for objectives that separate objects.
BACKGROUND_CLASSES = tuple(range(11))
NUM_TRAIN = 2975
NUM_VAL = 500

# Official label id -> train id (cityscapesScripts labels.py); unlisted ids 0..33 -> 255.
_TRAIN_ID_OF_LABEL_ID = {
  7: 0,
  8: 1,
  11: 2,
  12: 3,
  13: 4,
  17: 5,
  19: 6,
  20: 7,
  21: 8,
  22: 9,
  23: 10,
  24: 11,
  25: 12,
  26: 13,
  27: 14,
  28: 15,
  31: 16,
  32: 17,
  33: 18,
}
NUM_LABEL_IDS = 34

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"

EXPECTED_TREE = """\
  cityscapes/                                   <- data.root
    leftImg8bit/train/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    leftImg8bit/val/<city>/...
    gtFine/train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (or _labelTrainIds.png)
    gtFine/val/<city>/...
    splits/<split>/labeled.txt, unlabeled.txt   (optional: published splits, see README)
"""

SPLIT_HELP = (
  "Published Cityscapes splits (1_16, 1_8, 1_4, 1_2) are in the splits/cityscapes/ folder "
  "of https://github.com/LiheYoung/UniMatch; copy that folder to <data.root>/splits or "
  "point --config.data.splits_dir at it, or give the files with "
  "--config.data.labelled_list / --config.data.unlabelled_list."
)


def label_id_table() -> np.ndarray:
  """int16[256]: label id -> train id (255 for the unused ids 0..33), -1 above 33."""
  table = np.full(256, -1, np.int16)
  table[:NUM_LABEL_IDS] = files.IGNORE_INDEX
  for label_id, train_id in _TRAIN_ID_OF_LABEL_ID.items():
    table[label_id] = train_id
  table[files.IGNORE_INDEX] = files.IGNORE_INDEX
  return table


def mask_path_for(image_path: str, root: str | None = None) -> str:
  """gtFine path of a leftImg8bit image path: labelIds, or labelTrainIds if only that exists."""
  parts = image_path.replace(os.sep, "/").split("/")
  if "leftImg8bit" in parts:
    parts[parts.index("leftImg8bit")] = "gtFine"
  name = parts[-1]
  base = name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else files.stem(name)
  label_ids = "/".join(parts[:-1] + [base + LABEL_IDS_SUFFIX])
  train_ids = "/".join(parts[:-1] + [base + TRAIN_IDS_SUFFIX])
  if (
    root is not None
    and not os.path.isfile(os.path.join(root, label_ids))
    and os.path.isfile(os.path.join(root, train_ids))
  ):
    return train_ids
  return label_ids


class CityscapesLayout(files.Layout):
  name = "cityscapes"
  class_names = CLASS_NAMES
  background_classes = BACKGROUND_CLASSES
  expected_tree = EXPECTED_TREE
  label_tables = ((LABEL_IDS_SUFFIX, label_id_table()),)
  split_help = SPLIT_HELP

  def check_root(self) -> None:
    super().check_root()
    for part in ("leftImg8bit", "gtFine"):
      self.require_dir(part)

  def _entries(self, split: str) -> list[files.Entry]:
    image_dir = self.require_dir("leftImg8bit", split)
    images = [
      os.path.join("leftImg8bit", split, p)
      for p in files.list_images(image_dir)
      if p.endswith(IMAGE_SUFFIX)
    ]
    if not images:
      raise self.layout_error(f"{image_dir} holds no *{IMAGE_SUFFIX} images.")
    return [files.Entry(p, mask_path_for(p, self.root)) for p in images]

  def train_entries(self) -> list[files.Entry]:
    return self._entries("train")

  def val_entries(self) -> list[files.Entry]:
    return self._entries("val")

  def resolve(self, first: str, second: str | None, origin: str) -> files.Entry:
    if second is not None:
      return files.Entry(first, second, origin)
    if "/" not in first:  # a bare id "<city>_<seq>_<frame>": find its split
      city = first.split("_")[0]
      for split in ("train", "val"):
        candidate = f"leftImg8bit/{split}/{city}/{first}{IMAGE_SUFFIX}"
        if os.path.isfile(os.path.join(self.root, candidate)):
          first = candidate
          break
      else:
        first = f"leftImg8bit/train/{city}/{first}{IMAGE_SUFFIX}"
    return files.Entry(first, mask_path_for(first, self.root), origin)
