"""Builds the data sources a run needs from `config.data`.

A `DatasetSpec` bundles the random-access sources, the labelled / unlabelled index split
and the class metadata; the loop never asks which dataset it is training on.

For the datasets on disk ("voc", "cityscapes", "folder") the training set is the labelled
examples followed by the unlabelled ones, chosen by, in order of precedence:
`data.labelled_list` (+ `data.unlabelled_list`, else the rest of the training set), a named
`data.split` (<splits_dir>/<split>/labeled.txt, unlabeled.txt), or a seeded
`data.labelled_fraction` subset of the dataset's standard training set. Validation is
`data.val_list` or the standard validation set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging

from s4jax.data import cityscapes
from s4jax.data import files
from s4jax.data import folder
from s4jax.data import pipeline
from s4jax.data import shapes
from s4jax.data import splits
from s4jax.data import voc
from s4jax.errors import DataError

LAYOUTS = {
  "voc": voc.VocLayout,
  "cityscapes": cityscapes.CityscapesLayout,
  "folder": folder.FolderLayout,
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  train_source: Any
  val_source: Any
  labelled_indices: np.ndarray
  unlabelled_indices: np.ndarray
  class_names: tuple[str, ...]
  # Whether train examples carry masks that may be used for diagnostics on the unlabelled
  # part (never for training).
  unlabelled_has_masks: bool
  # Classes that are "stuff" rather than objects (VOC: background; Cityscapes: road..sky),
  # for objectives that treat objects and background apart.
  background_classes: tuple[int, ...] = (0,)
  # Where examples skipped under data.on_bad_example="skip" are recorded (None: "stop").
  skipped: files.SkippedLog | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def skipped_summary(self) -> str | None:
    """A line naming the skipped bad examples, or None if none were."""
    return None if self.skipped is None else self.skipped.summary()


def build(data_config) -> DatasetSpec:
  if data_config.name == "shapes":
    style = shapes_style(data_config)
    train = shapes.ShapesSource(
      "train",
      data_config.num_train,
      data_config.image_size,
      seed=data_config.split_seed,
      style=style,
    )
    val = shapes.ShapesSource(
      "val", data_config.num_val, data_config.image_size, seed=data_config.split_seed, style=style
    )
    labelled = pipeline.labelled_subset(
      len(train), data_config.labelled_fraction, data_config.split_seed
    )
    return DatasetSpec(
      train_source=train,
      val_source=val,
      labelled_indices=labelled,
      unlabelled_indices=pipeline.unlabelled_complement(len(train), labelled),
      class_names=tuple(shapes.CLASS_NAMES),
      unlabelled_has_masks=bool(data_config.use_unlabelled_masks),
      background_classes=(0,),
    )
  if data_config.name in LAYOUTS:
    return _build_from_files(data_config)
  raise DataError(f"config.data.name={data_config.name!r} is not a known dataset.")


def shapes_style(data_config) -> shapes.Style:
  """The `data.shapes` config block as a shapes.Style (tuples, whatever JSON made of them)."""
  block = data_config.shapes
  return shapes.Style(
    objects=tuple(int(n) for n in block.objects),
    radius=tuple(float(r) for r in block.radius),
    max_rotation=float(block.max_rotation),
    clutter=bool(block.clutter),
    textures=bool(block.textures),
  )


def _read_list(layout: files.Layout, path: str) -> list[files.Entry]:
  path = _under_root(layout.root, path)
  return [
    layout.resolve(first, second, origin) for first, second, origin in splits.read_split_file(path)
  ]


def _under_root(root: str, path: str) -> str:
  """Relative list paths are tried as given, then under the dataset root."""
  if os.path.isabs(path) or os.path.isfile(path) or not root:
    return path
  return os.path.join(root, path)


def _named_split(layout: files.Layout, data_config) -> tuple[str, str]:
  splits_dir = data_config.splits_dir or os.path.join(layout.root, "splits")
  directory = os.path.join(splits_dir, str(data_config.split))
  labelled = splits.find_named(directory, splits.LABELLED_NAMES)
  unlabelled = splits.find_named(directory, splits.UNLABELLED_NAMES)
  if labelled is None or unlabelled is None:
    raise DataError(
      f"config.data.split={data_config.split!r}: no "
      f"{os.path.join(directory, splits.LABELLED_NAMES[0])} and "
      f"{splits.UNLABELLED_NAMES[0]} there. {layout.split_help}"
    )
  return labelled, unlabelled


def _train_entries(layout: files.Layout, data_config, default_train) -> tuple[list, list]:
  """(labelled entries, unlabelled entries)."""
  if data_config.labelled_list or data_config.split:
    if data_config.split:
      labelled_file, unlabelled_file = _named_split(layout, data_config)
    else:
      labelled_file, unlabelled_file = data_config.labelled_list, data_config.unlabelled_list
    labelled = _read_list(layout, labelled_file)
    if unlabelled_file:
      unlabelled = _read_list(layout, unlabelled_file)
    else:  # the rest of the standard training set
      taken = {e.image for e in labelled}
      unlabelled = [e for e in default_train() if e.image not in taken]
    return labelled, unlabelled
  train = default_train()
  with_masks = [e for e in train if e.mask is not None]
  without_masks = [e for e in train if e.mask is None]  # unlabelled by nature (folder)
  if not with_masks:
    raise DataError(
      f"The {layout.name} training set under {layout.root} has no images with "
      "masks; at least one labelled image is needed."
    )
  chosen = pipeline.labelled_subset(
    len(with_masks), data_config.labelled_fraction, data_config.split_seed
  )
  rest = pipeline.unlabelled_complement(len(with_masks), chosen)
  return ([with_masks[i] for i in chosen], [with_masks[i] for i in rest] + without_masks)


def _drop_missing_hidden_masks(root: str, unlabelled: list) -> list:
  """Unlabelled entries whose listed mask is missing are kept, without the mask.

  Masks of unlabelled images only feed diagnostics, and published unlabelled lists name
  masks that a plain VOC download lacks (UniMatch's lists point at its merged
  SegmentationClass folder), so a missing one is not worth stopping for.
  """
  missing = [
    e for e in unlabelled if e.mask is not None and not os.path.isfile(os.path.join(root, e.mask))
  ]
  if not missing:
    return unlabelled
  logging.warning(
    "%d of %d unlabelled images are listed with masks that do not exist (e.g. %s); these "
    "masks only serve the pseudo-label diagnostics, which are off for this run.",
    len(missing),
    len(unlabelled),
    os.path.join(root, missing[0].mask),
  )
  gone = {id(e) for e in missing}
  return [dataclasses.replace(e, mask=None) if id(e) in gone else e for e in unlabelled]


def _build_from_files(data_config) -> DatasetSpec:
  use_tfds = data_config.source == "tfds"
  layout = LAYOUTS[data_config.name](data_config.root, check=not use_tfds)
  skipped = files.SkippedLog() if data_config.on_bad_example == "skip" else None
  if use_tfds:
    from s4jax.data import tfds_builders  # pylint: disable=import-outside-toplevel

    catalogue = tfds_builders.Catalogue(data_config.tfds_dir, data_config.name)
    default_train = lambda: catalogue.entries("train")  # noqa: E731
    default_val = lambda: catalogue.entries("val")  # noqa: E731
  else:
    default_train, default_val = layout.train_entries, layout.val_entries
  labelled, unlabelled = _train_entries(layout, data_config, default_train)
  val = _read_list(layout, data_config.val_list) if data_config.val_list else default_val()
  if not use_tfds:
    unlabelled = _drop_missing_hidden_masks(layout.root, unlabelled)
    check = lambda entries: files.check_entries_exist(  # noqa: E731
      layout.root, entries, on_bad_example=data_config.on_bad_example, skipped=skipped
    )
    labelled, unlabelled, val = check(labelled), check(unlabelled), check(val)
  if not labelled:
    raise DataError(
      f"The {layout.name} training set under {layout.root} has no labelled "
      "images (images with masks); check data.root and the split files."
    )
  missing_val_masks = [e for e in val if e.mask is None]
  if missing_val_masks:
    raise DataError(
      f"Validation image {missing_val_masks[0].image} has no mask "
      f"(listed at {missing_val_masks[0].origin or 'the validation set'})."
    )
  labelled_masks = [e for e in labelled if e.mask is None]
  if labelled_masks:
    raise DataError(
      f"Labelled image {labelled_masks[0].image} has no mask "
      f"(listed at {labelled_masks[0].origin or 'the training set'})."
    )
  # A batch needs the same keys in every example: hidden masks of unlabelled images are kept
  # for diagnostics only if every unlabelled image has one (and the config wants them).
  unlabelled_has_masks = (
    bool(data_config.use_unlabelled_masks)
    and bool(unlabelled)
    and all(e.mask is not None for e in unlabelled)
  )
  if not unlabelled_has_masks:
    unlabelled = [dataclasses.replace(e, mask=None) for e in unlabelled]
  train_entries = labelled + unlabelled
  if use_tfds:
    make = lambda split, entries: tfds_builders.TfdsSource(  # noqa: E731
      catalogue, split, entries, num_classes=len(layout.class_names)
    )
    train_source, val_source = make("train", train_entries), make("val", val)
  else:
    make = lambda entries: layout.source(  # noqa: E731
      entries, on_bad_example=data_config.on_bad_example, skipped=skipped
    )
    train_source, val_source = make(train_entries), make(val)
  return DatasetSpec(
    train_source=train_source,
    val_source=val_source,
    labelled_indices=np.arange(len(labelled), dtype=np.int64),
    unlabelled_indices=np.arange(len(labelled), len(train_entries), dtype=np.int64),
    class_names=tuple(layout.class_names),
    unlabelled_has_masks=unlabelled_has_masks,
    background_classes=tuple(layout.background_classes),
    skipped=skipped,
  )


def default_train_source(name: str, root: str) -> files.PairSource:
  """The standard training set of a dataset on disk (for new splits)."""
  layout = LAYOUTS[name](root)
  entries = files.check_entries_exist(
    root, layout.train_entries(), on_bad_example="stop", skipped=None
  )
  return layout.source(entries)


def num_classes_of(name: str, root: str) -> int:
  return len(LAYOUTS[name](root).class_names)
