"""Small fake VOC (+ SBD aug), Cityscapes and folder trees with real JPEG/PNG files.

Each mask is a known pattern (a block of one class on background, plus an ignore stripe),
returned beside the paths so tests can check decoding against known pixels.
"""

import json
import os

import numpy as np
from PIL import Image

from s4jax.data import voc

CITYSCAPES_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}


def _image(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pattern(height, width, fill, background=0, border=255):
  """background, a block of `fill` in the middle, a `border` stripe on row 1."""
  mask = np.full((height, width), background, np.uint8)
  mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = fill
  mask[1, :] = border
  return mask


def _save_palette_png(path, mask):
  image = Image.fromarray(mask, mode="P")
  image.putpalette(voc.palette().reshape(-1).tolist())
  image.save(path)


def make_voc(root, num_train=12, num_val=4, with_aug=True, seed=0):
  """VOC2012-like tree. Returns {id: mask} of every example written."""
  rng = np.random.default_rng(seed)
  for part in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, part), exist_ok=True)
  if with_aug:
    os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
  ids = [f"2007_{i:06d}" for i in range(num_train + num_val)]
  masks = {}
  for i, image_id in enumerate(ids):
    height, width = 40 + 4 * (i % 3), 48 + 4 * (i % 4)  # varying sizes, as VOC
    Image.fromarray(_image(rng, height, width)).save(
      os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=90
    )
    mask = _pattern(height, width, fill=1 + i % 20)
    masks[image_id] = mask
    _save_palette_png(os.path.join(root, "SegmentationClass", f"{image_id}.png"), mask)
    if with_aug:  # SBD aug masks: single-channel index PNGs
      Image.fromarray(mask, mode="L").save(
        os.path.join(root, "SegmentationClassAug", f"{image_id}.png")
      )
  sets = os.path.join(root, "ImageSets", "Segmentation")
  with open(os.path.join(sets, "train.txt"), "w") as f:
    f.write("\n".join(ids[:num_train]) + "\n")
  with open(os.path.join(sets, "val.txt"), "w") as f:
    f.write("\n".join(ids[num_train:]) + "\n")
  return masks


# label id -> train id for the ids the fake masks use
CITYSCAPES_IDS = {7: 0, 26: 13, 33: 18, 0: 255, 4: 255}


def make_cityscapes(root, per_city=4, height=32, width=64, seed=0):
  """Cityscapes-like tree with labelIds masks. Returns {image path: train-id mask}."""
  rng = np.random.default_rng(seed)
  expected = {}
  label_ids = list(CITYSCAPES_IDS)
  for split, cities in CITYSCAPES_CITIES.items():
    for city in cities:
      image_dir = os.path.join(root, "leftImg8bit", split, city)
      mask_dir = os.path.join(root, "gtFine", split, city)
      os.makedirs(image_dir, exist_ok=True)
      os.makedirs(mask_dir, exist_ok=True)
      for frame in range(per_city):
        base = f"{city}_{frame:06d}_000019"
        Image.fromarray(_image(rng, height, width)).save(
          os.path.join(image_dir, f"{base}_leftImg8bit.png")
        )
        raw = _pattern(height, width, fill=label_ids[frame % 3], background=7, border=4)
        raw[-1, :] = 26  # a car row
        Image.fromarray(raw, mode="L").save(os.path.join(mask_dir, f"{base}_gtFine_labelIds.png"))
        table = np.full(256, 255, np.uint8)
        for label_id, train_id in CITYSCAPES_IDS.items():
          table[label_id] = train_id
        expected[f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png"] = table[raw]
  return expected


FOLDER_CLASSES = ["background", "cat", "dog"]
FOLDER_PALETTE = [[0, 0, 0], [200, 0, 0], [0, 200, 0]]


def make_folder(root, num_labelled=6, num_unlabelled=4, num_val=4, seed=0, colour_masks=False):
  """A folder-dataset tree. Returns {image path: mask} of the images with masks."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "classes.json"), "w") as f:
    json.dump(
      {
        "classes": FOLDER_CLASSES,
        "palette": FOLDER_PALETTE,
        "ignore_colour": [255, 255, 255],
        "background_classes": [0],
      },
      f,
    )
  expected = {}
  plan = (
    [("train", i, True) for i in range(num_labelled)]
    + [("train", num_labelled + i, False) for i in range(num_unlabelled)]
    + [("val", i, True) for i in range(num_val)]
  )
  for split, i, with_mask in plan:
    sub = "a" if i % 2 else "b"  # nested folders
    image_rel = f"images/{split}/{sub}/img{i}.png" if i % 3 else f"images/{split}/{sub}/img{i}.jpg"
    os.makedirs(os.path.dirname(os.path.join(root, image_rel)), exist_ok=True)
    height, width = 36 + 2 * (i % 2), 44
    image = Image.fromarray(_image(rng, height, width))
    image.save(os.path.join(root, image_rel))
    if not with_mask:
      continue
    mask = _pattern(height, width, fill=1 + i % 2)
    mask_rel = f"masks/{split}/{sub}/img{i}.png"
    os.makedirs(os.path.dirname(os.path.join(root, mask_rel)), exist_ok=True)
    if colour_masks:
      colours = np.asarray(FOLDER_PALETTE + [[0, 0, 0]] * 252 + [[255, 255, 255]], np.uint8)
      Image.fromarray(colours[mask]).save(os.path.join(root, mask_rel))
    else:
      Image.fromarray(mask, mode="L").save(os.path.join(root, mask_rel))
    expected[image_rel] = mask
  return expected
