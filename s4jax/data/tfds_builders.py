"""TFDS builders for VOC and Cityscapes: prepared once into ArrayRecord, read without TensorFlow.

Preparing (`python -m s4jax.data.prepare`) reads the manual download (the dataset root, the
same layout as `data.source="folder"`) through the same decoding and checks as the folder
reader, and stores per example the original image file bytes, the mask as a PNG of class
indices (Cityscapes: already mapped to train ids) and the image's path relative to the
root. Nothing here needs TensorFlow: TFDS encodes images given as bytes or file paths and
`as_data_source` decodes them with PIL.

TFDS stores records in its own (hashed) order, so preparing also writes an index
(`s4jax_<dataset>_index.json` in the TFDS directory): per split, in the dataset's standard
order, each example's image path, mask path, size and record number. Split files are
matched to records by image path through it, and `image_hw` reads sizes from it without
decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from s4jax.data import cityscapes
from s4jax.data import files
from s4jax.data import voc
from s4jax.errors import DataError

_VERSION = tfds.core.Version("1.0.0")
SPLITS = ("train", "val")


def _features():
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3)),
      # One channel: TFDS's PNG encoding round-trips a (H, W, 1) uint8 mask exactly.
      "mask": tfds.features.Image(shape=(None, None, 1)),
      "image_path": tfds.features.Text(),
      "mask_path": tfds.features.Text(),
    }
  )


def _png_bytes(mask: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(mask, mode="L").save(buffer, format="PNG")  # decodes as (H, W, 1)
  return buffer.getvalue()


class _S4jaxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generator: every example of the layout's train and val sets."""

  VERSION = _VERSION
  LAYOUT: type[files.Layout] = files.Layout
  # Nothing is downloaded. Without this, TFDS looks for a checksums file next to the
  # builder's code, which for an editable install of a package needs `importlib_resources`
  # (not installed with TFDS) and fails.
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=_features(),
      description=f"{self.LAYOUT.name} for s4jax (images + masks)",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    layout = self.LAYOUT(root)
    generators = {}
    for split in SPLITS:
      entries = layout.train_entries() if split == "train" else layout.val_entries()
      entries = files.check_entries_exist(root, entries, on_bad_example="stop", skipped=None)
      generators[split] = self._generate_examples(layout, entries)
    return generators

  def _generate_examples(self, layout, entries):
    source = layout.source(entries)
    for index, entry in enumerate(entries):
      example = source[index]  # decodes and checks (DataError naming the file)
      if "mask" not in example:
        raise DataError(
          f"{source.describe(index)} has no mask; the TFDS datasets hold labelled images only."
        )
      with open(os.path.join(layout.root, entry.image), "rb") as f:
        image_bytes = f.read()
      yield (
        entry.image,
        {
          "image": image_bytes,
          "mask": _png_bytes(example["mask"]),
          "image_path": entry.image,
          "mask_path": entry.mask,
        },
      )


class S4jaxVoc(_S4jaxBuilder):
  """PASCAL VOC 2012 + SBD augmented masks (TFDS name "s4jax_voc")."""

  LAYOUT = voc.VocLayout
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download VOC 2012 (VOCtrainval_11-May-2012.tar) and the SBD augmented masks "
    "(SegmentationClassAug) and pass the VOC2012 directory as --root. Layout:\n" + voc.EXPECTED_TREE
  )


class S4jaxCityscapes(_S4jaxBuilder):
  """Cityscapes fine annotations, 19 train ids (TFDS name "s4jax_cityscapes")."""

  LAYOUT = cityscapes.CityscapesLayout
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
    "https://www.cityscapes-dataset.com and pass their common directory as --root. "
    "Layout:\n" + cityscapes.EXPECTED_TREE
  )


BUILDERS = {"voc": S4jaxVoc, "cityscapes": S4jaxCityscapes}


def _index_path(tfds_dir: str, name: str) -> str:
  return os.path.join(tfds_dir, f"s4jax_{name}_index.json")


def prepare(name: str, root: str, tfds_dir: str) -> dict[str, int]:
  """Prepares dataset `name` from `root` into ArrayRecord under `tfds_dir` and writes the
  index. Returns the number of examples per split."""
  if name not in BUILDERS:
    raise DataError(
      f"TFDS preparation exists for {sorted(BUILDERS)}, not {name!r}; read the "
      "folder dataset with data.source=folder."
    )
  layout = BUILDERS[name].LAYOUT(root)  # a layout error now, before TFDS prints anything
  builder = BUILDERS[name](data_dir=tfds_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  index = {}
  for split in SPLITS:
    # Bytes only: no image is decoded to learn the record order and the sizes.
    records = builder.as_data_source(
      split=split,
      decoders={"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()},
    )
    rows = []
    for i in range(len(records)):
      record = records[i]
      with Image.open(io.BytesIO(record["image"])) as image:
        width, height = image.size
      rows.append([_text(record["image_path"]), _text(record["mask_path"]), height, width, i])
    # Rows in the layout's order (not TFDS's hashed one), so that data.labelled_fraction picks
    # the same images as with data.source="folder".
    entries = layout.train_entries() if split == "train" else layout.val_entries()
    order = {e.image: position for position, e in enumerate(entries)}
    index[split] = sorted(rows, key=lambda row: order[row[0]])
  with open(_index_path(tfds_dir, name), "w", encoding="utf-8") as f:
    json.dump({"version": str(_VERSION), "splits": index}, f)
  return {split: len(rows) for split, rows in index.items()}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Catalogue:
  """The index of a prepared dataset: which record holds which file, and its size."""

  def __init__(self, tfds_dir: str, name: str):
    if name not in BUILDERS:
      raise DataError(
        f"config.data.source='tfds' exists for {sorted(BUILDERS)}, not "
        f"{name!r}; use --config.data.source=folder."
      )
    path = _index_path(tfds_dir, name)
    if not os.path.isfile(path):
      raise DataError(
        f"{path} does not exist: {tfds_dir!r} holds no prepared {name} dataset. Prepare it "
        f"with: python -m s4jax.data.prepare --dataset={name} --root=<dataset root> "
        f"--out={tfds_dir}"
      )
    with open(path, encoding="utf-8") as f:
      self._index = json.load(f)["splits"]
    self.tfds_dir = tfds_dir
    self.name = name
    # image path -> (record index, height, width)
    self._records = {
      split: {image: (record, height, width) for image, _, height, width, record in rows}
      for split, rows in self._index.items()
    }

  def entries(self, split: str) -> list[files.Entry]:
    """The split's examples in the dataset's standard order."""
    return [files.Entry(image, mask) for image, mask, *_ in self._index[split]]

  def record_of(self, split: str, entry: files.Entry) -> int:
    image = entry.image.replace(os.sep, "/")
    for candidate_split in (split,) + tuple(s for s in SPLITS if s != split):
      found = self._records[candidate_split].get(image)
      if found is not None:
        if candidate_split != split:
          raise DataError(
            f"{entry.image} (listed at {entry.origin}) is in the prepared "
            f"{candidate_split} split, not {split}."
          )
        return found[0]
    raise DataError(
      f"{entry.image} (listed at {entry.origin or split}) is not in the {self.name} "
      f"dataset prepared in {self.tfds_dir}. Prepare again from a root that holds it, or "
      "read the files directly with --config.data.source=folder."
    )

  def hw(self, split: str, image: str) -> tuple[int, int]:
    _, height, width = self._records[split][image.replace(os.sep, "/")]
    return int(height), int(width)

  def data_source(self, split: str):
    builder = BUILDERS[self.name](data_dir=self.tfds_dir, file_format="array_record")
    return builder.as_data_source(split=split)


class TfdsSource:
  """A grain source over a prepared split, in the order of `entries` (same interface as
  files.PairSource). Entries without a mask yield no "mask"."""

  def __init__(
    self, catalogue: Catalogue, split: str, entries: Sequence[files.Entry], *, num_classes: int
  ):
    if not entries:
      raise DataError(f"No {split} examples for the prepared {catalogue.name} dataset.")
    self._catalogue = catalogue
    self._split = split
    self._records = np.asarray([catalogue.record_of(split, e) for e in entries], np.int64)
    self._keep_mask = np.asarray([e.mask is not None for e in entries])
    self._num_classes = int(num_classes)
    self._entries = tuple(entries)
    self._source = None

  def _records_source(self):
    if self._source is None:  # opened lazily: also in each grain worker process
      self._source = self._catalogue.data_source(self._split)
    return self._source

  def __len__(self) -> int:
    return len(self._records)

  def describe(self, index: int) -> str:
    return f"{self._entries[index].image} (prepared {self._catalogue.name} {self._split})"

  def image_hw(self, index: int) -> tuple[int, int]:
    return self._catalogue.hw(self._split, self._entries[index].image)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._records_source()[int(self._records[index])]
    example = {"image": np.asarray(record["image"])}
    if self._keep_mask[index]:
      example["mask"] = np.asarray(record["mask"])[..., 0]
    return example

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __repr__(self) -> str:
    digest = hashlib.sha1(self._records.tobytes() + self._keep_mask.tobytes()).hexdigest()[:16]
    return (
      f"TfdsSource(name={self._catalogue.name!r}, split={self._split!r}, "
      f"num_examples={len(self._records)}, records_sha1={digest})"
    )
