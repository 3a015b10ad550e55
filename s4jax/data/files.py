"""Image/mask pairs read from files: the shared core of the VOC, Cityscapes and folder datasets.

A dataset on disk is a list of `Entry`s (image path, optional mask path, both relative to
the dataset root) plus the rule that turns a stored mask into class indices. `PairSource`
serves such a list to grain: `__len__`, `__getitem__` (decoded with PIL), `image_hw` (from
the file header, no decoding) and a `__repr__` that identifies the list without naming
the root, so a run whose data moved (`data.root` may change on resume) still restores its
iterator state.

Bad examples. Everything that can be checked without decoding (that the files exist) is
checked when the dataset is built (`check_entries_exist`); content (decodable image, mask
size, label values) is checked when an example is read, because decoding the whole
training set up front would take minutes on VOC and longer on Cityscapes. With
`on_bad_example="stop"` both raise `DataError` naming the file; with "skip" the example is
recorded in a `SkippedLog` and replaced by the next good one (index + 1, wrapping around).
The log is a small temporary file that every process appends to (lines are short, so
appends from grain's worker processes and threads do not interleave); its line count at
the end of training is the number of distinct bad files, whichever process met them.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import operator
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

from s4jax.errors import DataError

IGNORE_INDEX = 255
ON_BAD_EXAMPLE = ("stop", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_WHAT_TO_DO = (
  "Fix or remove the file, or set --config.data.on_bad_example=skip to skip bad "
  "examples (they are counted at the end of training)."
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One example on disk. Paths are relative to the dataset root; `origin` says where the
  entry came from (e.g. "splits/92/labeled.txt:12") for error messages."""

  image: str
  mask: str | None
  origin: str = ""


def index_table(num_classes: int) -> np.ndarray:
  """Raw mask value -> class index for masks that already store class indices.

  int16[256]: v for v < num_classes, 255 for 255 (ignore), -1 (invalid) otherwise.
  """
  table = np.full(256, -1, np.int16)
  table[:num_classes] = np.arange(num_classes)
  table[IGNORE_INDEX] = IGNORE_INDEX
  return table


class SkippedLog:
  """Bad examples skipped under `on_bad_example="skip"`, shared by every process of a host.

  Pickles as its file path, so grain's worker processes append to the same file.
  """

  def __init__(self):
    handle, self._path = tempfile.mkstemp(prefix="s4jax-skipped-", suffix=".tsv")
    os.close(handle)
    # Registered in the creating process only: unpickled copies in workers do not remove it.
    atexit.register(self._remove)

  def _remove(self) -> None:
    if os.path.exists(self._path):
      os.remove(self._path)

  def record(self, path: str, reason: str) -> None:
    line = f"{path}\t{' '.join(reason.split())}\n"
    with open(self._path, "a", encoding="utf-8") as f:
      f.write(line)

  def entries(self) -> dict[str, str]:
    """Distinct skipped files -> the first reason given for each."""
    found = {}
    if not os.path.exists(self._path):
      return found
    with open(self._path, encoding="utf-8") as f:
      for line in f:
        path, _, reason = line.rstrip("\n").partition("\t")
        found.setdefault(path, reason)
    return found

  def summary(self) -> str | None:
    """One line for the end of training, or None if nothing was skipped."""
    entries = self.entries()
    if not entries:
      return None
    shown = "; ".join(f"{path} ({reason})" for path, reason in list(entries.items())[:5])
    more = f"; and {len(entries) - 5} more" if len(entries) > 5 else ""
    return f"Skipped {len(entries)} bad example file(s) (data.on_bad_example=skip): {shown}{more}"

  def __repr__(self) -> str:
    return "SkippedLog()"


def check_entries_exist(
  root: str, entries: Sequence[Entry], *, on_bad_example: str, skipped: SkippedLog | None
) -> list[Entry]:
  """The entries whose files exist; a missing file stops (DataError) or is skipped."""
  kept = []
  for entry in entries:
    missing = [
      p
      for p in (entry.image, entry.mask)
      if p is not None and not os.path.isfile(os.path.join(root, p))
    ]
    if not missing:
      kept.append(entry)
      continue
    where = f" (listed at {entry.origin})" if entry.origin else ""
    message = f"{os.path.join(root, missing[0])} does not exist{where}."
    if on_bad_example == "skip":
      skipped.record(os.path.join(root, missing[0]), "missing file")
      continue
    raise DataError(
      f"{message} Check data.root and the split file, or set "
      "--config.data.on_bad_example=skip to leave such lines out."
    )
  if entries and not kept:
    raise DataError(
      f"None of the {len(entries)} listed files exist under {root}; check "
      "data.root and the split files."
    )
  return kept


def decode_image(path: str) -> np.ndarray:
  """uint8[H, W, 3] RGB, or DataError naming the file."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except FileNotFoundError:
    raise DataError(f"Image {path} does not exist. {_WHAT_TO_DO}") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"Cannot decode image {path} ({e}). {_WHAT_TO_DO}") from None


def file_hw(path: str) -> tuple[int, int]:
  """(height, width) from the file header, without decoding the pixels."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"Cannot read the size of image {path} ({e}). {_WHAT_TO_DO}") from None
  return height, width


def colour_codes(colours: np.ndarray) -> np.ndarray:
  colours = np.asarray(colours, np.int64)
  return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]


def _map_colours(
  rgb: np.ndarray, path: str, colours: np.ndarray, ignore_colours: np.ndarray
) -> np.ndarray:
  """RGB colour mask -> class indices through the palette (colour i = class i)."""
  codes, inverse = np.unique(colour_codes(rgb[..., :3]), return_inverse=True)
  lookup = {int(c): i for i, c in enumerate(colour_codes(colours))}
  lookup.update({int(c): IGNORE_INDEX for c in colour_codes(ignore_colours)})
  unknown = [int(c) for c in codes if int(c) not in lookup]
  if unknown:
    shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:5]]
    raise DataError(
      f"Mask {path} has colours {shown} that are not in the palette of classes.json. {_WHAT_TO_DO}"
    )
  mapped = np.asarray([lookup[int(c)] for c in codes], np.uint8)
  return mapped[inverse.reshape(rgb.shape[:2])]


class PairSource:
  """Random-access grain source of {"image": uint8[H, W, 3], "mask": uint8[H, W]} from files.

  Args:
    root: the dataset root the entries' paths are relative to.
    entries: the examples, in index order. An entry without a mask yields no "mask" key.
    num_classes: K; mask values must map into [0, K) or to 255 (ignore).
    name: dataset name, for the repr and messages.
    label_tables: (mask file suffix, int16[256] table) pairs: the first whose suffix ends
      the mask path maps raw values to class indices (-1 = a value that must not occur);
      masks matching none use `index_table(num_classes)`.
    colours: optional [K, 3] palette; RGB masks are then read by colour.
    ignore_colours: [M, 3] colours read as 255 in RGB masks.
    on_bad_example: "stop" or "skip" (see the module docstring).
    skipped: where skips are recorded (required for "skip").
  """

  def __init__(
    self,
    root: str,
    entries: Sequence[Entry],
    *,
    num_classes: int,
    name: str,
    label_tables: Sequence[tuple[str, np.ndarray]] = (),
    colours: np.ndarray | None = None,
    ignore_colours: np.ndarray | None = None,
    on_bad_example: str = "stop",
    skipped: SkippedLog | None = None,
  ):
    if on_bad_example not in ON_BAD_EXAMPLE:
      raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {on_bad_example!r}")
    if on_bad_example == "skip" and skipped is None:
      raise ValueError("on_bad_example='skip' needs a SkippedLog.")
    if not entries:
      raise DataError(f"The {name} dataset under {root} has no examples.")
    self._root = root
    self._entries = tuple(entries)
    self._num_classes = int(num_classes)
    self._name = name
    self._label_tables = tuple((suffix, np.asarray(t, np.int16)) for suffix, t in label_tables)
    self._default_table = index_table(self._num_classes)
    self._colours = None if colours is None else np.asarray(colours, np.int64)
    self._ignore_colours = (
      np.zeros((0, 3), np.int64)
      if ignore_colours is None
      else np.asarray(ignore_colours, np.int64).reshape(-1, 3)
    )
    self._on_bad_example = on_bad_example
    self._skipped = skipped
    self._warned = set()

  @property
  def entries(self) -> tuple[Entry, ...]:
    return self._entries

  @property
  def root(self) -> str:
    return self._root

  @property
  def has_masks(self) -> bool:
    return all(e.mask is not None for e in self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def _check_index(self, index) -> int:
    index = operator.index(index)
    if not 0 <= index < len(self._entries):
      raise IndexError(f"index must be in [0, {len(self._entries)}), got {index}.")
    return index

  def describe(self, index: int) -> str:
    """The image file of an example (for messages)."""
    return os.path.join(self._root, self._entries[index].image)

  def image_hw(self, index: int) -> tuple[int, int]:
    """(height, width) of an example from its file header (cheap; used for batching)."""
    index = self._check_index(index)
    try:
      return file_hw(self.describe(index))
    except DataError:
      if self._on_bad_example == "skip":
        return 1, 1  # pipeline._SKIPPED_HW: evaluation leaves the file out
      raise

  def _table_for(self, mask_path: str) -> np.ndarray:
    for suffix, table in self._label_tables:
      if mask_path.endswith(suffix):
        return table
    return self._default_table

  def decode_mask(self, path: str) -> np.ndarray:
    """uint8[H, W] class indices (255 = ignore), or DataError naming the file."""
    try:
      with Image.open(path) as image:
        mode = image.mode
        # Palette ("P") PNGs give their indices, not colours: VOC's SegmentationClass.
        raw = np.asarray(image)
    except FileNotFoundError:
      raise DataError(f"Mask {path} does not exist. {_WHAT_TO_DO}") from None
    except (OSError, SyntaxError, ValueError) as e:
      raise DataError(f"Cannot decode mask {path} ({e}). {_WHAT_TO_DO}") from None
    if raw.ndim == 3:
      if self._colours is None or raw.shape[-1] not in (3, 4):
        raise DataError(
          f"Mask {path} is a colour image (mode {mode}); expected a single-channel PNG "
          "of class indices (mode L or P). For colour masks, give the class colours as "
          f"'palette' in classes.json (folder dataset). {_WHAT_TO_DO}"
        )
      return _map_colours(raw, path, self._colours, self._ignore_colours)
    if raw.dtype != np.uint8:
      # 16/32-bit PNGs: values above 255 cannot be class indices.
      if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise DataError(f"Mask {path} has values outside 0..255 (mode {mode}). {_WHAT_TO_DO}")
      raw = raw.astype(np.uint8)
    table = self._table_for(path)
    mapped = table[raw]
    if mapped.size and mapped.min() < 0:
      bad = np.unique(raw[mapped < 0])[:8].tolist()
      valid = np.flatnonzero(table >= 0)
      raise DataError(
        f"Mask {path} has label values {bad} outside the valid ones "
        f"({_ranges(valid)}; 255 = ignore) for the {self._num_classes} classes of "
        f"{self._name}. {_WHAT_TO_DO}"
      )
    return mapped.astype(np.uint8)

  def _read(self, index: int) -> dict[str, np.ndarray]:
    entry = self._entries[index]
    image_path = os.path.join(self._root, entry.image)
    example = {"image": decode_image(image_path)}
    if entry.mask is not None:
      mask_path = os.path.join(self._root, entry.mask)
      mask = self.decode_mask(mask_path)
      if mask.shape != example["image"].shape[:2]:
        raise DataError(
          f"Mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image {image_path} "
          f"is {example['image'].shape[0]}x{example['image'].shape[1]}. {_WHAT_TO_DO}"
        )
      example["mask"] = mask
    return example

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._check_index(index)
    if self._on_bad_example == "stop":
      return self._read(index)
    for attempt in range(len(self._entries)):
      current = (index + attempt) % len(self._entries)
      try:
        return self._read(current)
      except DataError as e:
        path = self.describe(current)
        reason = str(e).replace(_WHAT_TO_DO, "").strip()
        self._skipped.record(path, reason)
        if path not in self._warned:
          self._warned.add(path)
          logging.warning("Skipping a bad example (data.on_bad_example=skip): %s", reason)
    raise DataError(
      f"Every example of the {self._name} dataset under {self._root} is bad; "
      "see the messages above."
    )

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_warned"] = set()
    return state

  def __repr__(self) -> str:
    # No root (it may move between resumed runs) and no on_bad_example (it may be changed to
    # get past a bad file): only what decides the content of example i.
    digest = hashlib.sha1(
      "\n".join(f"{e.image}\t{e.mask}" for e in self._entries).encode()
    ).hexdigest()[:16]
    return (
      f"PairSource(name={self._name!r}, num_examples={len(self._entries)}, "
      f"num_classes={self._num_classes}, entries_sha1={digest})"
    )


def _ranges(values: np.ndarray) -> str:
  """[0, 1, 2, 5] -> '0..2, 5'."""
  parts, start = [], None
  values = [int(v) for v in values if v != IGNORE_INDEX]
  for i, v in enumerate(values):
    if start is None:
      start = v
    if i + 1 == len(values) or values[i + 1] != v + 1:
      parts.append(f"{start}" if start == v else f"{start}..{v}")
      start = None
  return ", ".join(parts)


def list_images(directory: str) -> list[str]:
  """Image files under `directory` (recursively), as sorted paths relative to it."""
  found = []
  for parent, _, names in os.walk(directory):
    for name in names:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(parent, name), directory))
  return sorted(found)


def stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


class Layout:
  """How a dataset is laid out on disk; subclasses fill in the rules.

  Attributes set by subclasses: `name`, `class_names`, `background_classes`,
  `expected_tree` (shown when the root does not match), `label_tables` (see PairSource),
  `colours` / `ignore_colours` (RGB masks), `split_help` (where published splits come from).
  """

  name = ""
  class_names: tuple[str, ...] = ()
  background_classes: tuple[int, ...] = (0,)
  expected_tree = ""
  label_tables: tuple[tuple[str, np.ndarray], ...] = ()
  colours = None
  ignore_colours = None
  split_help = ""

  def __init__(self, root: str, check: bool = True):
    self.root = root
    if check:
      self.check_root()

  def layout_error(self, problem: str) -> DataError:
    return DataError(
      f"{problem} The dataset root {self.root!r} should be a {self.name} dataset laid out "
      f"like this:\n{self.expected_tree.rstrip()}\nSet --config.data.root=DIR (--root=DIR "
      "for the prepare and splits commands) to that directory."
    )

  def require_dir(self, *parts: str) -> str:
    path = os.path.join(self.root, *parts)
    if not os.path.isdir(path):
      raise self.layout_error(f"{path} is not a directory.")
    return path

  def check_root(self) -> None:
    if not self.root or not os.path.isdir(self.root):
      raise self.layout_error(f"The dataset directory {self.root!r} does not exist.")

  def train_entries(self) -> list[Entry]:
    raise NotImplementedError

  def val_entries(self) -> list[Entry]:
    raise NotImplementedError

  def resolve(self, first: str, second: str | None, origin: str) -> Entry:
    """An entry from a split-file line (see splits.read_split_file)."""
    raise NotImplementedError

  def source(
    self,
    entries: Sequence[Entry],
    *,
    on_bad_example: str = "stop",
    skipped: SkippedLog | None = None,
  ) -> PairSource:
    return PairSource(
      self.root,
      entries,
      num_classes=len(self.class_names),
      name=self.name,
      label_tables=self.label_tables,
      colours=self.colours,
      ignore_colours=self.ignore_colours,
      on_bad_example=on_bad_example,
      skipped=skipped,
    )
