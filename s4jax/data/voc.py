"""PASCAL VOC 2012 with the SBD augmented masks (the "aug" training set of 10582 images).

Masks are PNGs of class indices: `SegmentationClass/` holds palette ("P") PNGs whose
indices are the classes (0 background, 1..20 objects, 255 the ignored object borders);
`SegmentationClassAug/` (SBD converted to PNG, as distributed with DeepLab and the S4
repositories) holds single-channel PNGs of the same indices. Both are read as indices,
never through their colours.

Without split files, the training set is every image with a mask in
`SegmentationClassAug/` that is not in `val.txt` (the 10582 "train_aug" images), or
`ImageSets/Segmentation/train.txt` (1464) if there are no augmented masks; validation is
`val.txt` (1449) with `SegmentationClass/` masks.
"""

from __future__ import annotations

import os

import numpy as np

from s4jax.data import files

CLASS_NAMES = (
  "background",
  "aeroplane",
  "bicycle",
  "bird",
  "boat",
  "bottle",
  "bus",
  "car",
  "cat",
  "chair",
  "cow",
  "diningtable",
  "dog",
  "horse",
  "motorbike",
  "person",
  "pottedplant",
  "sheep",
  "sofa",
  "train",
  "tvmonitor",
)
NUM_CLASSES = len(CLASS_NAMES)
# Sizes the configs use to turn the papers' epochs into steps.
NUM_TRAIN_AUG = 10582
NUM_VAL = 1449

EXPECTED_TREE = """\
  VOC2012/                          <- data.root
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png      (palette PNGs, train + val)
    SegmentationClassAug/<id>.png   (optional: SBD augmented masks, 12031 index PNGs)
    ImageSets/Segmentation/train.txt, val.txt
    splits/<split>/labeled.txt, unlabeled.txt   (optional: published splits, see README)
"""

SPLIT_HELP = (
  "Published VOC splits (92, 183, 366, 732, 1464, 1_16, 1_8, 1_4, ...) are in the "
  "splits/pascal/ folder of https://github.com/LiheYoung/UniMatch; copy that folder to "
  "<data.root>/splits or point --config.data.splits_dir at it, or give the files with "
  "--config.data.labelled_list / --config.data.unlabelled_list. New splits: python -m "
  "s4jax.data.splits --dataset=voc ..."
)


def palette() -> np.ndarray:
  """The VOC colour map: uint8 [256, 3], colour of class i is row i (255: the border)."""
  colours = np.zeros((256, 3), np.uint8)
  for index in range(256):
    value, r, g, b = index, 0, 0, 0
    for bit in range(8):
      # The bits of the index are spread over the channels, most significant first.
      r |= ((value >> 0) & 1) << (7 - bit)
      g |= ((value >> 1) & 1) << (7 - bit)
      b |= ((value >> 2) & 1) << (7 - bit)
      value >>= 3
    colours[index] = (r, g, b)
  return colours


class VocLayout(files.Layout):
  name = "voc"
  class_names = CLASS_NAMES
  background_classes = (0,)
  expected_tree = EXPECTED_TREE
  split_help = SPLIT_HELP

  def check_root(self) -> None:
    super().check_root()
    if not os.path.isdir(os.path.join(self.root, "JPEGImages")):
      nested = os.path.join(self.root, "VOC2012")
      hint = (
        f" (did you mean {nested}?)" if os.path.isdir(os.path.join(nested, "JPEGImages")) else ""
      )
      raise self.layout_error(f"{self.root} has no JPEGImages/ folder{hint}.")

  def _ids(self, list_name: str) -> list[str]:
    path = os.path.join(self.root, "ImageSets", "Segmentation", list_name)
    if not os.path.isfile(path):
      raise self.layout_error(f"{path} does not exist.")
    with open(path, encoding="utf-8") as f:
      return [line.split()[0] for line in f if line.strip()]

  def _aug_dir(self) -> str:
    return os.path.join(self.root, "SegmentationClassAug")

  def _mask_for(self, image_id: str) -> str:
    aug = os.path.join("SegmentationClassAug", f"{image_id}.png")
    if os.path.isfile(os.path.join(self.root, aug)):
      return aug
    return os.path.join("SegmentationClass", f"{image_id}.png")

  def train_entries(self) -> list[files.Entry]:
    val_ids = set(self._ids("val.txt"))
    if os.path.isdir(self._aug_dir()):
      ids = sorted(files.stem(n) for n in os.listdir(self._aug_dir()) if n.endswith(".png"))
      ids = [i for i in ids if i not in val_ids]
      mask_dir = "SegmentationClassAug"
    else:
      ids = self._ids("train.txt")
      mask_dir = "SegmentationClass"
    return [
      files.Entry(os.path.join("JPEGImages", f"{i}.jpg"), os.path.join(mask_dir, f"{i}.png"))
      for i in ids
    ]

  def val_entries(self) -> list[files.Entry]:
    return [
      files.Entry(
        os.path.join("JPEGImages", f"{i}.jpg"),
        os.path.join("SegmentationClass", f"{i}.png"),
        origin=f"ImageSets/Segmentation/val.txt ({i})",
      )
      for i in self._ids("val.txt")
    ]

  def resolve(self, first: str, second: str | None, origin: str) -> files.Entry:
    if second is not None:
      return files.Entry(first, second, origin)
    if "/" in first or "." in first:  # an image path
      return files.Entry(first, self._mask_for(files.stem(first)), origin)
    return files.Entry(os.path.join("JPEGImages", f"{first}.jpg"), self._mask_for(first), origin)
