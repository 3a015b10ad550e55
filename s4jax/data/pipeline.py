"""grain input pipelines: labelled/unlabelled training streams and evaluation.

Training streams are infinite, checkpointable grain iterators:

  subset of the source (this process's shard of the chosen indices)
    -> shuffle (a new order every epoch) -> repeat
    -> weak view (random_map: deterministic per (seed, position in stream))
    -> batch (drop_remainder) -> thread prefetch [-> worker processes]

Because every random draw is a function of the seeds and the element's position
in the stream, the batches do not depend on `num_workers`, and restoring a
`get_state()` snapshot resumes at exactly the next batch.

Evaluation is a plain, ordered, re-iterable pass over the whole source, split
into global batches of which each process yields its own rows; the last global
batch is filled with dummy rows (mask all 255) so all processes see the same
number of equally shaped batches, which a multi-host jitted step needs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import signal
from collections.abc import Iterator, Sequence
from typing import Protocol

import grain
import numpy as np

from s4jax.data import transforms
from s4jax.errors import DataError

# Fixed ids that keep the derived random streams apart.
_LABELLED_SUBSET_STREAM = 0x5E1EC7
_KIND_IDS = {"labelled": 1, "unlabelled": 2}
_SHUFFLE_STREAM = 0
_TRANSFORM_STREAM = 1

# Per-process read-ahead, in batches. Two threads let the next batch be drawn
# while the device runs the current step (JAX releases the GIL), without
# starving the two host cores of the development machine.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


class _RandomAccessSource(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def labelled_subset(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a seeded random subset of `max(1, round(n*fraction))`.

  Args:
    num_examples: size `n` of the training set.
    fraction: share of it that keeps its labels, in (0, 1].
    seed: the subset is a pure function of (num_examples, fraction, seed).

  Returns:
    int64 array of distinct indices in [0, n), ascending.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data.labelled_fraction must be in (0, 1], got {fraction}.")
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive, got {num_examples}.")
  count = max(1, round(num_examples * fraction))
  rng = np.random.default_rng([seed, _LABELLED_SUBSET_STREAM])
  chosen = rng.choice(num_examples, size=count, replace=False)
  return np.sort(chosen).astype(np.int64)


def unlabelled_complement(num_examples: int, labelled: Sequence[int] | np.ndarray) -> np.ndarray:
  """Sorted indices in [0, num_examples) that are not in `labelled`."""
  labelled = np.asarray(labelled, dtype=np.int64)
  if labelled.size and (labelled.min() < 0 or labelled.max() >= num_examples):
    raise ValueError(
      f"labelled indices must lie in [0, {num_examples}), got [{labelled.min()}, {labelled.max()}]."
    )
  return np.setdiff1d(np.arange(num_examples, dtype=np.int64), labelled)


class SubsetSource:
  """Random-access view of `source` restricted to `indices` (in that order)."""

  def __init__(self, source: _RandomAccessSource, indices: Sequence[int]):
    self._source = source
    self._indices = np.asarray(indices, dtype=np.int64)
    if self._indices.ndim != 1:
      raise ValueError(f"indices must be one-dimensional, got shape {self._indices.shape}.")
    if self._indices.size and (self._indices.min() < 0 or self._indices.max() >= len(source)):
      raise ValueError(f"indices must lie in [0, {len(source)}) for source {source!r}.")

  @property
  def indices(self) -> np.ndarray:
    return self._indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._source[int(self._indices[index])]

  def __repr__(self) -> str:
    # A digest rather than the indices themselves: the repr must identify the
    # subset for grain's state checks without growing with the dataset.
    digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:16]
    return (
      f"SubsetSource(source={self._source!r},"
      f" num_indices={len(self._indices)}, indices_sha1={digest})"
    )


def _derived_seed(seed: int, kind: str, process_index: int, stream: int) -> int:
  """A 32-bit seed for one random stream of one pipeline.

  Hashing (rather than `seed + k`) keeps streams unrelated: grain shuffles
  epoch e with `shuffle_seed + e`, so adjacent raw seeds would replay each
  other's epochs.
  """
  sequence = np.random.SeedSequence([seed, _KIND_IDS[kind], process_index, stream])
  return int(sequence.generate_state(1, dtype=np.uint32)[0])


def _labelled_view(
  example: dict[str, np.ndarray],
  rng: np.random.Generator,
  *,
  crop_size: int,
  scale_range: tuple[float, float],
) -> dict[str, np.ndarray]:
  image, mask = transforms.weak_labelled(
    example["image"], example["mask"], crop_size, rng, scale_range
  )
  return {"image": image, "mask": mask}


def _unlabelled_view(
  example: dict[str, np.ndarray],
  rng: np.random.Generator,
  *,
  crop_size: int,
  scale_range: tuple[float, float],
) -> dict[str, np.ndarray]:
  hidden_mask = example.get("mask")
  outputs = transforms.weak_unlabelled(
    example["image"], crop_size, rng, scale_range, mask=hidden_mask
  )
  if hidden_mask is None:
    image, valid = outputs
    return {"image": image, "valid": valid}
  image, valid, mask = outputs
  return {"image": image, "valid": valid, "mask": mask}


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")


def make_train_iterator(
  source: _RandomAccessSource,
  indices: Sequence[int] | np.ndarray,
  *,
  batch_size: int,
  crop_size: int,
  seed: int,
  kind: str,
  scale_range: tuple[float, float] = (0.5, 2.0),
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator of weak-view training batches.

  Args:
    source: random-access source of {"image": uint8[H, W, 3], "mask":
      uint8[H, W]} examples (the mask is optional for kind="unlabelled").
    indices: the source indices this stream draws from (e.g. the labelled
      subset); process `p` uses the disjoint shard `indices[p::process_count]`.
    batch_size: examples per batch on THIS process.
    crop_size: side of the square weak-view crop.
    seed: base seed; order and transforms are deterministic per (seed, kind,
      process_index, position in the stream).
    kind: "labelled" or "unlabelled".
    scale_range: bounds of the random rescale of the longer side.
    process_index: this host's index.
    process_count: number of hosts.
    num_workers: worker processes for the transforms (0: in this process).
      The batches are the same for any value.

  Returns:
    A grain DatasetIterator (with get_state/set_state). Labelled batches are
    {"image": uint8[B, c, c, 3], "mask": uint8[B, c, c]}; unlabelled ones are
    {"image", "valid": uint8[B, c, c]} plus "mask" (hidden ground truth through
    the same geometry) when the source provides masks.
  """
  if kind not in _KIND_IDS:
    raise ValueError(f"kind must be one of {sorted(_KIND_IDS)}, got {kind!r}.")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if crop_size <= 0:
    raise ValueError(f"crop_size must be positive, got {crop_size}.")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
  _check_process(process_index, process_count)
  shard = np.asarray(indices, dtype=np.int64)[process_index::process_count]
  if shard.size == 0:
    raise ValueError(
      f"process {process_index} of {process_count} got no {kind} examples"
      f" (only {len(indices)} indices); use fewer processes or more data."
    )

  view_fn = _labelled_view if kind == "labelled" else _unlabelled_view
  view_fn = functools.partial(
    view_fn,
    crop_size=int(crop_size),
    scale_range=tuple(float(s) for s in scale_range),
  )
  dataset = (
    grain.MapDataset.source(SubsetSource(source, shard))
    # Shuffle before repeat: grain reseeds the shuffle per epoch, so every
    # epoch is a fresh permutation and epochs never mix.
    .shuffle(seed=_derived_seed(seed, kind, process_index, _SHUFFLE_STREAM))
    .repeat()
    .random_map(
      view_fn,
      seed=_derived_seed(seed, kind, process_index, _TRANSFORM_STREAM),
    )
    .batch(int(batch_size), drop_remainder=True)
  )
  iter_dataset = dataset.to_iter_dataset(_READ_OPTIONS)
  if num_workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=int(num_workers)),
      worker_init_fn=_ignore_stop_signals,
    )
  return iter(iter_dataset)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """Grain workers leave Ctrl-C / SIGTERM to the main process, which finishes its step,
  saves and stops them (otherwise each worker prints a KeyboardInterrupt traceback)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Number of global batches covering `num_examples` (the last one padded)."""
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive, got {num_examples}.")
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
  return math.ceil(num_examples / global_batch_size)


class EvalBatches:
  """Re-iterable, ordered pass over a source in process-local batch slices, each global
  batch holding images of **one size**, so nothing is ever padded spatially.

  Evaluating an image padded to a larger size changes what the network computes (the ASPP
  image pooling averages over the padding, border convolutions see it instead of their zero
  padding, the decoder's resize ratios change), so each image is evaluated at its own size,
  as UniMatch does. Images are grouped by (height, width) in order of first appearance;
  each group is cut into global batches of `global_batch_size`, the last one filled with
  dummy rows (image 0, mask all 255) of the same size. The eval step compiles once per
  distinct size (`num_shapes`) and reuses it at every later evaluation.

  Process `p` yields rows `[p*b, (p+1)*b)` of each global batch, `b = G // process_count`;
  every process computes the same grouping from `source.image_hw(index)` when the source has
  it (cheap, file headers), else from reading the examples once.
  """

  def __init__(
    self,
    source: _RandomAccessSource,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    _check_process(process_index, process_count)
    if global_batch_size <= 0:
      raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size ({global_batch_size}) must be divisible by"
        f" process_count ({process_count})."
      )
    self._source = source
    self._global_batch_size = int(global_batch_size)
    self._local_batch_size = self._global_batch_size // process_count
    self._process_index = int(process_index)
    self._batches = None  # [(height, width, [global indices])], built on first use

  @property
  def local_batch_size(self) -> int:
    return self._local_batch_size

  def _plan(self) -> list[tuple[int, int, list[int]]]:
    if self._batches is None:
      groups: dict[tuple[int, int], list[int]] = {}
      for index in range(len(self._source)):
        groups.setdefault(self._image_hw(index), []).append(index)
      g = self._global_batch_size
      self._batches = [
        (h, w, members[i : i + g])
        for (h, w), members in groups.items()
        for i in range(0, len(members), g)
      ]
    return self._batches

  @property
  def num_shapes(self) -> int:
    """Distinct image sizes, i.e. compiled shapes of the eval step."""
    return len({(h, w) for h, w, _ in self._plan()})

  def __len__(self) -> int:
    return len(self._plan())

  def _image_hw(self, index: int) -> tuple[int, int]:
    image_hw = getattr(self._source, "image_hw", None)
    if image_hw is not None:
      return tuple(int(v) for v in image_hw(index))
    return tuple(self._source[index]["image"].shape[:2])

  def _local_batch(self, batch_index: int) -> dict[str, np.ndarray]:
    height, width, members = self._plan()[batch_index]
    first = self._process_index * self._local_batch_size
    local = members[first : first + self._local_batch_size]
    images = np.full(
      (self._local_batch_size, height, width, 3), transforms.IMAGE_PAD_VALUE, dtype=np.uint8
    )
    masks = np.full(
      (self._local_batch_size, height, width), transforms.IGNORE_INDEX, dtype=np.uint8
    )
    for row, index in enumerate(local):
      example = self._source[index]
      h, w = example["image"].shape[:2]
      if (h, w) != (height, width) and (height, width) == _SKIPPED_HW:
        continue  # a bad file skipped by the source (data.on_bad_example=skip): no score
      if (h, w) != (height, width):
        raise DataError(
          f"{_describe(self._source, index)} decodes to {h}x{w}, but its file header "
          f"says {height}x{width}; re-save the file (or set data.on_bad_example=skip)."
        )
      images[row] = example["image"]
      masks[row] = example["mask"]
    return {"image": images, "mask": masks}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    # A fresh grain pipeline per pass: ordered, with read-ahead threads.
    dataset = grain.MapDataset.range(len(self)).map(self._local_batch)
    return iter(dataset.to_iter_dataset(_READ_OPTIONS))

  def __repr__(self) -> str:
    return (
      f"EvalBatches(source={self._source!r},"
      f" global_batch_size={self._global_batch_size},"
      f" local_batch_size={self._local_batch_size},"
      f" process_index={self._process_index})"
    )


# What a source's image_hw reports for an unreadable file it skips (data/files.py).
_SKIPPED_HW = (1, 1)


def _describe(source, index: int) -> str:
  describe = getattr(source, "describe", None)
  return describe(index) if describe is not None else f"example {index}"


def make_eval_batches(
  source: _RandomAccessSource,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> EvalBatches:
  """A re-iterable of this process's rows of each global evaluation batch.

  See `EvalBatches`. Each pass yields dicts {"image": uint8[b, H, W, 3], "mask": uint8[b,
  H, W]} with `b = global_batch_size // process_count`, every image at its own size.
  """
  return EvalBatches(
    source,
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
  )
