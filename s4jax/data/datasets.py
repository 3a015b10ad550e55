"""Builds the data sources a run needs from `config.data`.

A `DatasetSpec` bundles the random-access sources, the labelled / unlabelled index split
and the class metadata; the loop never asks which dataset it is training on.
"""

import dataclasses
from typing import Any

import numpy as np

from s4jax.data import pipeline
from s4jax.data import shapes
from s4jax.errors import DataError


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

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def build(data_config) -> DatasetSpec:
  if data_config.name == "shapes":
    train = shapes.ShapesSource("train", data_config.num_train, data_config.image_size,
                                seed=data_config.split_seed)
    val = shapes.ShapesSource("val", data_config.num_val, data_config.image_size,
                              seed=data_config.split_seed)
    labelled = pipeline.labelled_subset(len(train), data_config.labelled_fraction,
                                        data_config.split_seed)
    return DatasetSpec(
        train_source=train, val_source=val, labelled_indices=labelled,
        unlabelled_indices=pipeline.unlabelled_complement(len(train), labelled),
        class_names=tuple(shapes.CLASS_NAMES), unlabelled_has_masks=True)
  raise DataError(f"config.data.name={data_config.name!r} is not a known dataset.")
