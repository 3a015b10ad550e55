"""MSRC-v2 (cleaned labels) -> the folder-dataset layout (s4jax/data/folder.py).

MSRC-v2 (Microsoft Research Cambridge object recognition set, v2): 591 photographs of about
320 x 213 with 23 classes; we read the cleaned-up annotations of Malisiewicz & Efros
(BMVC 2007), one `<name>_GT.mat` per image holding `newseg` (a segment id per pixel, 1..S)
and `newlabels` (the class of segment k, 1-based, at position k-1). When `newlabels` is one
shorter than the number of segments, the last segment is void. Horse and mountain are
dropped (the dataset's own notes: too few examples), as is usual, leaving 21 classes;
their pixels and void become 255 (ignore).

MSRC has no background class. For the objectives that split objects from background
(recon's fg/bg variant, the pseudo-label object coverage) the "stuff" classes count as
background: building, grass, tree, sky, water, road (`background_classes` in classes.json;
our choice).

The validation set is a seeded share of the images (`--val_fraction`, default 0.2), fixed
by `--seed`; the rest is the training set, every image with its mask. Make a labelled split
of it with the project's split tool, e.g. 1/8 of the 473 training images:

  python benchmarks/datasets/msrc.py --raw=/data/MSRC_v2 --out=/data/msrc21
  python -m s4jax.data.splits --dataset=folder --root=/data/msrc21 --num_labelled=59 \
      --seed=0 --class_balanced --out=/data/msrc21/splits/59

then train with --config.data.name=folder --config.data.root=/data/msrc21
--config.data.split=59. `--raw` is the folder holding `Images/*.bmp` and
`newsegmentations_mats/*_GT.mat` (e.g. MSRC_v2/ of github.com/TonyZZX/
MultiGraph_MultiLabel_Learning). Nothing of the dataset is part of this repository.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
from PIL import Image
from scipy import io as scipy_io

# The 23 classes of the annotations, in their 1-based order.
MSRC_CLASSES = (
  "building",
  "grass",
  "tree",
  "cow",
  "horse",
  "sheep",
  "sky",
  "mountain",
  "aeroplane",
  "water",
  "face",
  "car",
  "bicycle",
  "flower",
  "sign",
  "bird",
  "book",
  "chair",
  "road",
  "cat",
  "dog",
  "body",
  "boat",
)
DROPPED = ("horse", "mountain")
CLASSES = tuple(c for c in MSRC_CLASSES if c not in DROPPED)
STUFF = ("building", "grass", "tree", "sky", "water", "road")
IGNORE = 255


def label_lookup() -> np.ndarray:
  """uint8 [24]: annotation class (1-based; 0 = void) -> our class index or 255."""
  lookup = np.full(len(MSRC_CLASSES) + 1, IGNORE, np.uint8)
  for k, name in enumerate(MSRC_CLASSES, start=1):
    if name in CLASSES:
      lookup[k] = CLASSES.index(name)
  return lookup


def class_mask(segments: np.ndarray, segment_labels: np.ndarray, source: str) -> np.ndarray:
  """uint8 [H, W] class indices from a segment-id map and the segments' 1-based classes."""
  segments = np.asarray(segments, np.int64)
  segment_labels = np.asarray(segment_labels, np.int64).ravel()
  count = int(segments.max())
  if segments.min() < 0 or count - len(segment_labels) not in (0, 1):
    raise ValueError(
      f"{source}: {count} segments but {len(segment_labels)} labels (expected "
      "as many, or one fewer when the last segment is void)."
    )
  if segment_labels.min(initial=1) < 1 or segment_labels.max(initial=1) > len(MSRC_CLASSES):
    raise ValueError(f"{source}: a segment label outside 1..{len(MSRC_CLASSES)}.")
  # Segment id -> annotation class; id 0 and a trailing unlabelled segment are void (0).
  by_segment = np.zeros(count + 1, np.int64)
  by_segment[1 : len(segment_labels) + 1] = segment_labels
  return label_lookup()[by_segment[segments]]


def convert(raw: str, out: str, *, val_fraction: float = 0.2, seed: int = 0) -> dict:
  """Writes the folder layout under `out`; returns {"train": n, "val": n}."""
  mats = sorted(glob.glob(os.path.join(raw, "newsegmentations_mats", "*_GT.mat")))
  if not mats:
    raise FileNotFoundError(f"No newsegmentations_mats/*_GT.mat under {raw}.")
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"{out} exists and is not empty; give a new --out.")
  names = [os.path.basename(p)[: -len("_GT.mat")] for p in mats]
  order = np.random.default_rng(seed).permutation(len(names))
  num_val = int(round(val_fraction * len(names)))
  split_of = {names[i]: ("val" if rank < num_val else "train") for rank, i in enumerate(order)}
  counts = {"train": 0, "val": 0}
  for mat, name in zip(mats, names):
    image_path = os.path.join(raw, "Images", name + ".bmp")
    record = scipy_io.loadmat(mat)
    mask = class_mask(record["newseg"], record["newlabels"], mat)
    image = Image.open(image_path).convert("RGB")
    if image.size != (mask.shape[1], mask.shape[0]):
      raise ValueError(
        f"{image_path} is {image.size[0]}x{image.size[1]} but its mask "
        f"{mat} is {mask.shape[1]}x{mask.shape[0]}."
      )
    split = split_of[name]
    for kind, array_or_image, ext in (("images", image, ".png"), ("masks", mask, ".png")):
      path = os.path.join(out, kind, split, name + ext)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      picture = array_or_image if kind == "images" else Image.fromarray(array_or_image, "L")
      picture.save(path)
    counts[split] += 1
  with open(os.path.join(out, "classes.json"), "w") as f:
    json.dump(
      {"classes": list(CLASSES), "background_classes": [CLASSES.index(c) for c in STUFF]},
      f,
      indent=1,
    )
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--raw", required=True, help="folder with Images/ and newsegmentations_mats/")
  parser.add_argument("--out", required=True, help="new folder for the folder dataset")
  parser.add_argument("--val_fraction", type=float, default=0.2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    counts = convert(args.raw, args.out, val_fraction=args.val_fraction, seed=args.seed)
  except (OSError, ValueError) as e:
    sys.exit(f"msrc.py: error: {e}")
  print(
    f"wrote {counts['train']} training and {counts['val']} validation images with masks "
    f"and classes.json to {args.out}"
  )


if __name__ == "__main__":
  main()
