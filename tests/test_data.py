"""Tests for the shapes dataset, the weak transforms and the grain pipelines."""

import dataclasses

import numpy as np
import pytest

from s4jax.data import pipeline
from s4jax.data import shapes
from s4jax.data import transforms


def _batches_equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class _IndexCodedSource:
  """Examples whose pixels say which example they are.

  The mask of example i is the constant i (< 255), and the image is the
  constant i too, so after any rescale/crop/flip the non-padding mask pixels
  still name the example. Sizes vary per example to exercise padding.
  """

  def __init__(self, num_examples, sizes=None):
    self._num_examples = num_examples
    self._sizes = sizes

  def __len__(self):
    return self._num_examples

  def _hw(self, index):
    if self._sizes is None:
      return 20, 20
    return self._sizes[index % len(self._sizes)]

  def __getitem__(self, index):
    h, w = self._hw(index)
    return {
      "image": np.full((h, w, 3), index + 1, dtype=np.uint8),
      "mask": np.full((h, w), index, dtype=np.uint8),
    }

  def __repr__(self):
    return f"_IndexCodedSource({self._num_examples}, {self._sizes})"


def _example_ids(mask_batch):
  """The example id of each row of a batch of _IndexCodedSource masks."""
  ids = []
  for mask in mask_batch:
    values = np.unique(mask[mask != 255])
    assert len(values) == 1, values
    ids.append(int(values[0]))
  return ids


# ----------------------------------------------------------------- shapes ---


def test_shapes_example_format():
  source = shapes.ShapesSource("train", 5, image_size=48, seed=3)
  example = source[4]
  assert set(example) == {"image", "mask"}
  assert example["image"].shape == (48, 48, 3)
  assert example["image"].dtype == np.uint8
  assert example["mask"].shape == (48, 48)
  assert example["mask"].dtype == np.uint8
  assert len(source) == 5
  assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES == 6
  assert shapes.CLASS_NAMES[0] == "background"


def test_shapes_deterministic_per_seed_split_index():
  first = shapes.ShapesSource("train", 10, image_size=64, seed=1)
  again = shapes.ShapesSource("train", 10, image_size=64, seed=1)
  assert _batches_equal(first[7], again[7])
  # The example depends on (seed, split, index) only, not on the split size.
  bigger = shapes.ShapesSource("train", 1000, image_size=64, seed=1)
  assert _batches_equal(first[7], bigger[7])

  other_index = first[8]
  other_split = shapes.ShapesSource("val", 10, image_size=64, seed=1)[7]
  other_seed = shapes.ShapesSource("train", 10, image_size=64, seed=2)[7]
  for other in (other_index, other_split, other_seed):
    assert not np.array_equal(first[7]["image"], other["image"])


def test_shapes_masks_valid_and_every_class_appears():
  source = shapes.ShapesSource("val", 50, image_size=64)
  counts = np.zeros(shapes.NUM_CLASSES, dtype=np.int64)
  for index in range(len(source)):
    mask = source[index]["mask"]
    assert mask.max() < shapes.NUM_CLASSES
    counts += np.bincount(mask.ravel(), minlength=shapes.NUM_CLASSES)
  assert (counts > 0).all(), counts
  # Objects cover a real share of the pixels but do not swamp the background.
  background_share = counts[0] / counts.sum()
  assert 0.4 < background_share < 0.95, background_share


def _connected_regions(mask: np.ndarray) -> int:
  """Number of 4-connected foreground regions (a small flood fill, no SciPy needed)."""
  seen = np.zeros_like(mask, dtype=bool)
  regions = 0
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    regions += 1
    stack = [start]
    seen[start] = True
    while stack:
      y, x = stack.pop()
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
        if inside and mask[ny, nx] and not seen[ny, nx]:
          seen[ny, nx] = True
          stack.append((ny, nx))
  return regions


def test_shapes_style_objects_radius_and_rotation():
  size = 64
  # One upright object per image, small enough to lie inside the frame.
  style = shapes.Style(objects=(1, 1), radius=(0.1, 0.12), max_rotation=0.0)
  source = shapes.ShapesSource("train", 40, image_size=size, seed=4, style=style)
  rectangles = 0
  for index in range(len(source)):
    mask = source[index]["mask"]
    classes = set(np.unique(mask)) - {0}
    assert len(classes) == 1, classes
    (class_id,) = classes
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    # Diameter at most 2 * 1.1 * radius (stars reach 1.1 r), plus a pixel of rasterisation.
    assert extent <= 2 * 1.1 * 0.12 * size + 2, extent
    if shapes.CLASS_NAMES[class_id] == "rectangle":
      rectangles += 1
      # Upright rectangles fill their bounding box; rotated ones would not.
      box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
      assert len(ys) == box
  assert rectangles >= 3

  # With rotation, some rectangle is tilted: it fills visibly less than its box.
  rotated = shapes.ShapesSource(
    "train", 40, image_size=size, seed=4, style=dataclasses.replace(style, max_rotation=180.0)
  )
  fills = []
  for index in range(len(rotated)):
    mask = rotated[index]["mask"]
    class_id = int(mask.max())
    if shapes.CLASS_NAMES[class_id] == "rectangle":
      ys, xs = np.nonzero(mask)
      fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
  assert fills and min(fills) < 0.85, fills

  # Many objects: most images show several separate object regions.
  crowded = shapes.ShapesSource(
    "train", 20, image_size=size, seed=4, style=shapes.Style(objects=(5, 6), radius=(0.06, 0.08))
  )
  regions = [_connected_regions(crowded[i]["mask"] > 0) for i in range(len(crowded))]
  assert np.mean(regions) >= 3, regions


def test_shapes_style_clutter_and_textures():
  size = 64
  plain = shapes.Style(clutter=False, textures=False, objects=(1, 1))
  busy = shapes.Style(objects=(1, 1))

  def residual(style, region):
    """Mean std of the pixels left after fitting a plane (per channel) to a region.

    Without clutter the background is a linear ramp plus pixel noise, and without
    textures an object is a shaded (linear) flat colour plus noise, so the plane fit
    leaves only the noise; patterns, blotches, distractors and textures add to it.
    """
    source = shapes.ShapesSource("train", 30, image_size=size, seed=2, style=style)
    ys, xs = np.mgrid[0:size, 0:size]
    values = []
    for index in range(len(source)):
      example = source[index]
      inside = example["mask"] > 0
      keep = inside if region == "object" else ~inside
      design = np.stack([ys[keep], xs[keep], np.ones(keep.sum())], axis=1).astype(np.float64)
      pixels = example["image"][keep].astype(np.float64)
      coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
      values.append((pixels - design @ coef).std(axis=0).mean())
    return np.mean(values)

  assert residual(plain, "background") < 0.6 * residual(busy, "background")
  assert residual(plain, "object") < 0.8 * residual(busy, "object")


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"objects": (0, 2)}, "objects"),
    ({"objects": (3, 2)}, "objects"),
    ({"radius": (0.2, 0.1)}, "radius"),
    ({"radius": (0.1, 0.6)}, "radius"),
    ({"max_rotation": 200.0}, "max_rotation"),
  ],
)
def test_shapes_style_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapes.Style(**kwargs)


def test_shapes_argument_errors_and_repr():
  with pytest.raises(ValueError, match="split"):
    shapes.ShapesSource("test", 10)
  with pytest.raises(ValueError, match="num_examples"):
    shapes.ShapesSource("train", 0)
  with pytest.raises(ValueError, match="image_size"):
    shapes.ShapesSource("train", 10, image_size=-1)
  source = shapes.ShapesSource("val", 10, image_size=32, seed=5)
  with pytest.raises(ValueError, match="index"):
    source[10]
  with pytest.raises(IndexError):
    source[-1]
  assert repr(source) == repr(shapes.ShapesSource("val", 10, 32, 5))
  for text in ("'val'", "10", "32", "5"):
    assert text in repr(source)


# ------------------------------------------------------------- transforms ---


def _coordinate_image(height, width):
  """Image whose channels encode (row, column); mask = column mod 6."""
  rows, cols = np.mgrid[0:height, 0:width]
  image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
  return image, (cols % 6).astype(np.uint8)


def test_random_rescale_sizes_and_nearest_labels():
  image, _ = _coordinate_image(40, 60)
  label_set = np.array([0, 3, 7], dtype=np.uint8)
  mask = label_set[np.random.default_rng(0).integers(0, 3, size=(40, 60))]
  for seed in range(5):
    out_image, out_mask = transforms.random_rescale(
      image, mask, np.random.default_rng(seed), (0.5, 2.0)
    )
    height, width = out_image.shape[:2]
    assert out_mask.shape == (height, width)
    assert 30 <= width <= 120
    assert abs(height / width - 40 / 60) < 0.05
    assert set(np.unique(out_mask)) <= set(label_set.tolist())
  out_image, out_mask = transforms.random_rescale(image, None, np.random.default_rng(0), (0.5, 0.5))
  assert out_image.shape == (20, 30, 3) and out_mask is None


def test_pad_to_at_least_values():
  image = np.full((5, 8, 3), 9, np.uint8)
  mask = np.full((5, 8), 2, np.uint8)
  valid = np.ones((5, 8), np.uint8)
  out_image, out_mask, out_valid = transforms.pad_to_at_least(image, mask, valid, 7)
  assert out_image.shape == (7, 8, 3)
  assert (out_image[:5] == 9).all() and (out_image[5:] == 0).all()
  assert (out_mask[:5] == 2).all() and (out_mask[5:] == 255).all()
  assert (out_valid[:5] == 1).all() and (out_valid[5:] == 0).all()
  same = transforms.pad_to_at_least(image, None, None, 4)
  assert same[0] is image and same[1] is None and same[2] is None


def test_weak_views_shapes_and_padding():
  # A scale of exactly 0.5 turns 40x40 into 20x20, padded to the 32 crop.
  image = np.full((40, 40, 3), 200, np.uint8)
  mask = np.full((40, 40), 4, np.uint8)
  for seed in range(4):
    out_image, out_valid, out_mask = transforms.weak_unlabelled(
      image, 32, np.random.default_rng(seed), (0.5, 0.5), mask=mask
    )
    assert out_image.shape == (32, 32, 3) and out_image.dtype == np.uint8
    assert out_valid.shape == out_mask.shape == (32, 32)
    assert out_valid.sum() == 20 * 20
    padding = out_valid == 0
    assert (out_mask[padding] == 255).all() and (out_mask[~padding] == 4).all()
    assert (out_image[padding] == 0).all() and (out_image[~padding] == 200).all()
    # The real pixels are one 20x20 block (top-left, or top-right if flipped).
    rows, cols = np.nonzero(~padding)
    assert rows.max() - rows.min() == cols.max() - cols.min() == 19

    # Same geometry without the hidden mask.
    image_only, valid_only = transforms.weak_unlabelled(
      image, 32, np.random.default_rng(seed), (0.5, 0.5)
    )
    assert np.array_equal(image_only, out_image)
    assert np.array_equal(valid_only, out_valid)

    labelled_image, labelled_mask = transforms.weak_labelled(
      image, mask, 32, np.random.default_rng(seed), (0.5, 0.5)
    )
    assert labelled_image.shape == (32, 32, 3)
    assert np.array_equal(labelled_mask, out_mask)


def test_crop_and_flip_keep_image_and_mask_aligned():
  image, mask = _coordinate_image(50, 70)
  flipped = 0
  for seed in range(12):
    out_image, out_mask = transforms.weak_labelled(
      image, mask, 24, np.random.default_rng(seed), (1.0, 1.0)
    )
    cols = out_image[..., 1].astype(np.int64)
    # Every output pixel still carries the label of the pixel it came from.
    assert np.array_equal(out_mask, (cols % 6).astype(np.uint8))
    # Columns run +1 (kept) or -1 (flipped) along each row; rows stay rows.
    steps = np.unique(np.diff(cols, axis=1))
    assert steps.tolist() in ([1], [-1])
    flipped += steps[0] == -1
    assert (np.diff(out_image[..., 0].astype(np.int64), axis=0) == 1).all()
  assert 0 < flipped < 12


def test_hflip_flips_all_arrays_together():
  image, mask = _coordinate_image(4, 6)
  valid = np.tile(np.arange(6, dtype=np.uint8), (4, 1))
  # Search for one flipping and one non-flipping draw.
  outcomes = {}
  for seed in range(20):
    out = transforms.random_hflip(image, mask, valid, np.random.default_rng(seed))
    outcomes[out[0] is image] = out
  flipped_image, flipped_mask, flipped_valid = outcomes[False]
  assert np.array_equal(flipped_image, image[:, ::-1])
  assert np.array_equal(flipped_mask, mask[:, ::-1])
  assert np.array_equal(flipped_valid, valid[:, ::-1])
  assert outcomes[True][1] is mask


# --------------------------------------------------------------- pipeline ---


def test_labelled_subset_and_complement():
  subset = pipeline.labelled_subset(100, 0.1, seed=0)
  assert len(subset) == 10
  assert np.array_equal(subset, np.sort(subset)) and len(set(subset)) == 10
  assert np.array_equal(subset, pipeline.labelled_subset(100, 0.1, seed=0))
  assert not np.array_equal(subset, pipeline.labelled_subset(100, 0.1, seed=1))
  assert len(pipeline.labelled_subset(100, 0.001, seed=0)) == 1
  assert np.array_equal(pipeline.labelled_subset(7, 1.0, seed=3), np.arange(7))
  complement = pipeline.unlabelled_complement(100, subset)
  assert np.array_equal(np.union1d(subset, complement), np.arange(100))
  assert len(np.intersect1d(subset, complement)) == 0
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="data.labelled_fraction"):
      pipeline.labelled_subset(100, bad, seed=0)


def _index_iterator(indices, seed=0, **kwargs):
  kwargs.setdefault("batch_size", 4)
  kwargs.setdefault("kind", "labelled")
  kwargs.setdefault("scale_range", (0.5, 1.5))
  return pipeline.make_train_iterator(
    _IndexCodedSource(40), indices, crop_size=16, seed=seed, **kwargs
  )


def test_train_iterator_deterministic_per_seed():
  indices = np.arange(0, 40, 2)
  first = next(_index_iterator(indices, seed=7))
  again = next(_index_iterator(indices, seed=7))
  other = next(_index_iterator(indices, seed=8))
  assert _batches_equal(first, again)
  assert not _batches_equal(first, other)
  assert first["image"].shape == (4, 16, 16, 3)
  assert first["mask"].shape == (4, 16, 16)
  assert first["image"].dtype == first["mask"].dtype == np.uint8


def test_train_iterator_epochs_cover_shard_and_reshuffle():
  indices = np.array([1, 4, 6, 9, 13, 17, 22, 30])
  iterator = _index_iterator(indices, seed=0)
  # 8 examples, batch 4: two batches per epoch.
  epochs = []
  for _ in range(3):
    order = []
    for _ in range(2):
      order += _example_ids(next(iterator)["mask"])
    epochs.append(order)
  for order in epochs:
    assert sorted(order) == indices.tolist()
  assert len({tuple(order) for order in epochs}) == 3


def test_train_iterator_resumes_from_state():
  indices = np.arange(12)
  iterator = _index_iterator(indices, seed=3)
  for _ in range(4):  # Cross an epoch boundary (3 batches per epoch).
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]

  restored = _index_iterator(indices, seed=3)
  restored.set_state(state)
  for batch in expected:
    assert _batches_equal(next(restored), batch)


def test_train_iterator_process_shards_are_disjoint_and_cover():
  indices = np.arange(3, 38, 2)  # 18 indices.
  seen = []
  for process_index in range(3):
    iterator = _index_iterator(
      indices,
      seed=1,
      batch_size=2,
      process_index=process_index,
      process_count=3,
    )
    ids = []
    for _ in range(3):  # One epoch of the 6-example shard.
      ids += _example_ids(next(iterator)["mask"])
    assert sorted(ids) == indices[process_index::3].tolist()
    seen.append(set(ids))
  assert not seen[0] & seen[1] and not seen[0] & seen[2]
  assert not seen[1] & seen[2]
  assert set.union(*seen) == set(indices.tolist())


def test_unlabelled_batches_carry_valid_and_hidden_mask():
  iterator = _index_iterator(
    np.arange(8),
    kind="unlabelled",
    batch_size=8,
    seed=2,
    scale_range=(0.5, 0.7),
  )
  batch = next(iterator)
  assert set(batch) == {"image", "valid", "mask"}
  assert batch["valid"].shape == batch["mask"].shape == (8, 16, 16)
  # Hidden mask is 255 exactly on the padding that valid marks.
  assert np.array_equal(batch["mask"] == 255, batch["valid"] == 0)
  # 20 px scaled by <= 0.7 is smaller than the 16 px crop: always padded.
  assert (batch["valid"] == 0).any(axis=(1, 2)).all()

  class ImagesOnly(_IndexCodedSource):
    def __getitem__(self, index):
      return {"image": super().__getitem__(index)["image"]}

  no_mask = pipeline.make_train_iterator(
    ImagesOnly(8),
    np.arange(8),
    batch_size=2,
    crop_size=16,
    seed=0,
    kind="unlabelled",
  )
  assert set(next(no_mask)) == {"image", "valid"}


def test_train_iterator_argument_errors():
  with pytest.raises(ValueError, match="kind"):
    _index_iterator(np.arange(8), kind="weak")
  with pytest.raises(ValueError, match="process_index"):
    _index_iterator(np.arange(8), process_index=2, process_count=2)
  with pytest.raises(ValueError, match="no labelled examples"):
    _index_iterator(np.arange(2), process_index=2, process_count=3)


def test_train_iterator_workers_match_in_process():
  # Worker processes must import the source, so use the package's own one.
  source = shapes.ShapesSource("train", 12, image_size=24)
  kwargs = dict(
    batch_size=2,
    crop_size=16,
    seed=4,
    kind="unlabelled",
    indices=np.arange(12),
  )
  in_process = pipeline.make_train_iterator(source, num_workers=0, **kwargs)
  expected = [next(in_process) for _ in range(3)]
  with_workers = pipeline.make_train_iterator(source, num_workers=2, **kwargs)
  try:
    for batch in expected:
      assert _batches_equal(next(with_workers), batch)
  finally:
    with_workers.close()


def test_eval_batches_group_sizes_cover_once_and_agree_across_processes():
  sizes = [(10, 12), (17, 9), (8, 20), (13, 13)]
  source = _IndexCodedSource(11, sizes)
  global_batch, process_count = 2, 2
  seen = []
  plans = []
  for process_index in range(process_count):
    batches = pipeline.make_eval_batches(
      source,
      global_batch_size=global_batch,
      process_index=process_index,
      process_count=process_count,
    )
    first_pass, second_pass = list(batches), list(batches)  # re-iterable, same content
    # 11 examples of 4 sizes (3, 3, 3 and 2 of each): batches of 2 -> 2 + 2 + 2 + 1.
    assert batches.num_shapes == 4 and len(first_pass) == len(second_pass) == 7
    for a, b in zip(first_pass, second_pass):
      assert _batches_equal(a, b)
    plans.append([b["image"].shape for b in first_pass])
    for batch in first_pass:
      assert batch["image"].dtype == batch["mask"].dtype == np.uint8
      for image, mask in zip(batch["image"], batch["mask"]):
        if (mask == 255).all():
          assert (image == 0).all()  # a dummy row
          continue
        index = int(mask[0, 0])
        assert mask.shape == sizes[index % 4]  # the image at its own size, unpadded
        assert (mask == index).all() and (image == index + 1).all()
        seen.append(index)
  assert sorted(seen) == list(range(len(source)))
  assert plans[0] == plans[1]

  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_eval_batches(source, global_batch_size=5, process_count=2)
