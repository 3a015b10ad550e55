"""Split files: reading the published ones, generating and writing new ones.

Format (as published by UniMatch, U2PL, CPS, ... in their `splits/` folders): one example
per line, either two columns "image_path mask_path" relative to the dataset root
("JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png"), or one column: an image
path or a bare id ("2007_000032"), which the dataset turns into paths by its layout rule.
Blank lines and lines starting with '#' are skipped.

New splits: `generate_split` draws a labelled subset of given size, seeded and
deterministic; with `class_presence` it is class-balanced (greedy: the class with the
fewest labelled examples so far picks next, among the examples that contain it), so rare
classes get labelled examples even in tiny splits. The command line writes them:

  python -m s4jax.data.splits --dataset=voc --root=/data/VOCdevkit/VOC2012 \
      --num_labelled=92 --seed=0 --class_balanced --out=/data/my_splits/92
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from s4jax.errors import DataError

_SPLIT_STREAM = 0x5B117
LABELLED_NAMES = ("labeled.txt", "labelled.txt")
UNLABELLED_NAMES = ("unlabeled.txt", "unlabelled.txt")


def read_split_file(path: str) -> list[tuple[str, str | None, str]]:
  """(first column, second column or None, "file:line") for each example line."""
  if not os.path.isfile(path):
    raise DataError(f"Split file {path} does not exist.")
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      columns = line.split()
      if not columns or columns[0].startswith("#"):
        continue
      if len(columns) > 2:
        raise DataError(
          f"{path}:{number} has {len(columns)} columns; expected 'image_path mask_path' or "
          "one image path / id per line."
        )
      rows.append((columns[0], columns[1] if len(columns) == 2 else None, f"{path}:{number}"))
  if not rows:
    raise DataError(f"Split file {path} lists no examples.")
  return rows


def write_split_file(path: str, pairs: Sequence[tuple[str, str | None]]) -> None:
  """Writes "image mask" (or "image") lines, paths relative to the dataset root."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for image, mask in pairs:
      f.write(f"{image} {mask}\n" if mask else f"{image}\n")


def find_named(directory: str, names: Sequence[str]) -> str | None:
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def generate_split(
  num_examples: int, num_labelled: int, seed: int, class_presence: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (labelled, unlabelled) indices; a pure function of its arguments.

  Args:
    num_examples: N, the size of the training set.
    num_labelled: how many keep their labels, in [1, N].
    seed: the split's seed.
    class_presence: optional bool [N, K], whether example i contains class k; given, the
      labelled set is class-balanced (see the module docstring).
  """
  if not 1 <= num_labelled <= num_examples:
    raise ValueError(f"num_labelled must be in [1, {num_examples}], got {num_labelled}.")
  rng = np.random.default_rng([seed, _SPLIT_STREAM])
  if class_presence is None:
    labelled = rng.choice(num_examples, size=num_labelled, replace=False)
  else:
    presence = np.asarray(class_presence, bool)
    if presence.shape[0] != num_examples:
      raise ValueError(f"class_presence has {presence.shape[0]} rows for {num_examples} examples.")
    labelled = _class_balanced(presence, num_labelled, rng)
  labelled = np.sort(np.asarray(labelled, np.int64))
  return labelled, np.setdiff1d(np.arange(num_examples, dtype=np.int64), labelled)


def _class_balanced(presence: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
  """Greedy: the class with the fewest labelled examples so far picks a random example
  containing it; ties between classes are broken at random. Examples without any class
  are drawn last."""
  available = np.ones(presence.shape[0], bool)
  per_class = np.zeros(presence.shape[1], np.int64)
  chosen = []
  while len(chosen) < count:
    candidates_per_class = (presence & available[:, None]).sum(0)
    open_classes = np.flatnonzero(candidates_per_class > 0)
    if open_classes.size == 0:
      rest = np.flatnonzero(available)
      chosen.extend(rng.choice(rest, size=count - len(chosen), replace=False).tolist())
      break
    fewest = per_class[open_classes].min()
    tied = open_classes[per_class[open_classes] == fewest]
    klass = int(rng.choice(tied))
    pick = int(rng.choice(np.flatnonzero(presence[:, klass] & available)))
    chosen.append(pick)
    available[pick] = False
    per_class += presence[pick]
  return chosen


def class_presence(source, num_classes: int) -> np.ndarray:
  """bool [N, K] from every mask of a source (decodes them all: a one-off for splits)."""
  presence = np.zeros((len(source), num_classes), bool)
  for i in range(len(source)):
    mask = source[i]["mask"]
    values = np.unique(mask)
    presence[i, values[values < num_classes]] = True
  return presence


def main(argv=None) -> None:
  import argparse  # pylint: disable=import-outside-toplevel

  from s4jax.data import datasets  # pylint: disable=import-outside-toplevel
  from s4jax.data import pipeline  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
    prog="python -m s4jax.data.splits",
    description="Write labeled.txt / unlabeled.txt of a new seeded split of a dataset's "
    "training set.",
  )
  parser.add_argument("--dataset", required=True, choices=("voc", "cityscapes", "folder"))
  parser.add_argument("--root", required=True)
  parser.add_argument("--num_labelled", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--class_balanced",
    action="store_true",
    help="balance classes among the labelled images (reads every mask)",
  )
  parser.add_argument("--out", required=True, help="directory for labeled.txt / unlabeled.txt")
  args = parser.parse_args(argv)
  try:
    source = datasets.default_train_source(args.dataset, args.root)
    # Only images with masks can be labelled; the others are always unlabelled (folder).
    with_masks = np.asarray([i for i, e in enumerate(source.entries) if e.mask is not None])
    if with_masks.size == 0:
      raise DataError(f"No training image under {args.root} has a mask.")
    presence = None
    if args.class_balanced:
      masked = pipeline.SubsetSource(source, with_masks)
      presence = class_presence(masked, datasets.num_classes_of(args.dataset, args.root))
    chosen, _ = generate_split(len(with_masks), args.num_labelled, args.seed, presence)
  except (DataError, ValueError) as e:
    parser.exit(2, f"s4jax: error: {e}\n")
  labelled = with_masks[chosen]
  unlabelled = np.setdiff1d(np.arange(len(source)), labelled)
  pairs = [(e.image, e.mask) for e in source.entries]
  write_split_file(os.path.join(args.out, LABELLED_NAMES[0]), [pairs[i] for i in labelled])
  write_split_file(os.path.join(args.out, UNLABELLED_NAMES[0]), [pairs[i] for i in unlabelled])
  print(f"wrote {len(labelled)} labelled and {len(unlabelled)} unlabelled examples to {args.out}")


if __name__ == "__main__":
  main()
