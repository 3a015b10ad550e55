"""Datasets on disk (VOC + SBD aug, Cityscapes, folder), splits, TFDS, OHEM, bad input, CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import fake_datasets
from s4jax import config_schema
from s4jax import evaluate
from s4jax.data import cityscapes
from s4jax.data import datasets
from s4jax.data import files
from s4jax.data import pipeline
from s4jax.data import splits
from s4jax.data import voc
from s4jax.errors import ConfigError, DataError
from s4jax.losses import supervised
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  """One fake tree per dataset, shared by the read-only tests of this module."""
  base = tmp_path_factory.mktemp("trees")
  return {
    "voc": (str(base / "voc"), fake_datasets.make_voc(str(base / "voc"))),
    "cityscapes": (str(base / "cs"), fake_datasets.make_cityscapes(str(base / "cs"))),
    "folder": (str(base / "folder"), fake_datasets.make_folder(str(base / "folder"))),
  }


def _build(name, root, **overrides):
  return datasets.build(tiny_config(**{"data.name": name, "data.root": root, **overrides}).data)


def _copy(trees, name, tmp_path):
  """A private copy of a fake tree, for tests that break it."""
  root = str(tmp_path / name)
  shutil.copytree(trees[name][0], root)
  return root


# ---- decoding and label mapping ---------------------------------------------------------


def test_voc_palette_is_the_standard_colour_map():
  colours = voc.palette()
  assert colours[0].tolist() == [0, 0, 0]
  assert colours[1].tolist() == [128, 0, 0]
  assert colours[15].tolist() == [192, 128, 128]  # person
  assert colours[255].tolist() == [224, 224, 192]  # the border colour


def test_voc_reads_palette_and_aug_masks_as_indices(trees):
  root, masks = trees["voc"]
  spec = _build("voc", root, **{"data.labelled_fraction": 1.0})
  assert spec.num_classes == 21 and spec.class_names[0] == "background"
  assert spec.background_classes == (0,)
  # Default training set: the aug masks minus val.txt; validation: palette PNGs.
  assert len(spec.train_source) == 12 and len(spec.val_source) == 4
  assert all(e.mask.startswith("SegmentationClassAug/") for e in spec.train_source.entries)
  assert all(e.mask.startswith("SegmentationClass/") for e in spec.val_source.entries)
  with Image.open(os.path.join(root, spec.val_source.entries[0].mask)) as palette_png:
    assert palette_png.mode == "P"
  for source in (spec.train_source, spec.val_source):
    for i in (0, len(source) - 1):
      example = source[i]
      image_id = files.stem(source.entries[i].image)
      np.testing.assert_array_equal(example["mask"], masks[image_id])
      assert example["image"].shape == masks[image_id].shape + (3,)
      assert source.image_hw(i) == masks[image_id].shape
  example = spec.val_source[1]
  h, w = example["mask"].shape
  assert example["mask"][h // 2, w // 2] == 1 + 13 % 20  # the block of val image 13
  assert example["mask"][1, 0] == 255 and example["mask"][0, 0] == 0


def test_voc_without_aug_masks_trains_on_train_txt(tmp_path):
  root = str(tmp_path / "voc")
  fake_datasets.make_voc(root, num_train=5, num_val=3, with_aug=False)
  spec = _build("voc", root, **{"data.labelled_fraction": 1.0})
  assert [files.stem(e.image) for e in spec.train_source.entries] == [
    f"2007_{i:06d}" for i in range(5)
  ]
  assert all(e.mask.startswith("SegmentationClass/") for e in spec.train_source.entries)


def test_cityscapes_maps_label_ids_to_train_ids(trees):
  root, expected = trees["cityscapes"]
  spec = _build("cityscapes", root)
  assert spec.num_classes == 19 and spec.background_classes == tuple(range(11))
  assert len(spec.train_source) == 8 and len(spec.val_source) == 4
  for source in (spec.train_source, spec.val_source):
    for i in range(len(source)):
      np.testing.assert_array_equal(source[i]["mask"], expected[source.entries[i].image])
  mask = spec.val_source[0]["mask"]
  assert mask[0, 0] == 0  # label id 7 (road) -> 0
  assert mask[1, 0] == 255  # label id 4 (static) -> ignore
  assert mask[-1, 0] == 13  # label id 26 (car) -> 13
  table = cityscapes.label_id_table()
  assert table[33] == 18 and table[24] == 11 and table[0] == 255 and table[34] == -1


def test_cityscapes_label_train_ids_are_read_as_they_are(tmp_path):
  root = str(tmp_path / "cs")
  expected = fake_datasets.make_cityscapes(root, per_city=1)
  for image, mask in expected.items():
    label_ids = os.path.join(root, cityscapes.mask_path_for(image))
    os.remove(label_ids)
    Image.fromarray(mask, mode="L").save(
      label_ids.replace(cityscapes.LABEL_IDS_SUFFIX, cityscapes.TRAIN_IDS_SUFFIX)
    )
  spec = _build("cityscapes", root)
  entry = spec.val_source.entries[0]
  assert entry.mask.endswith(cityscapes.TRAIN_IDS_SUFFIX)
  np.testing.assert_array_equal(spec.val_source[0]["mask"], expected[entry.image])


@pytest.mark.parametrize("colour_masks", [False, True])
def test_folder_dataset_index_or_colour_masks(tmp_path, colour_masks):
  root = str(tmp_path / "folder")
  expected = fake_datasets.make_folder(root, colour_masks=colour_masks)
  spec = _build("folder", root, **{"data.labelled_fraction": 1.0})
  assert spec.class_names == tuple(fake_datasets.FOLDER_CLASSES)
  # 6 images with masks are labelled; the 4 without masks are the unlabelled set.
  assert len(spec.labelled_indices) == 6 and len(spec.unlabelled_indices) == 4
  assert not spec.unlabelled_has_masks
  for i in spec.labelled_indices:
    np.testing.assert_array_equal(
      spec.train_source[i]["mask"], expected[spec.train_source.entries[i].image]
    )
  assert "mask" not in spec.train_source[int(spec.unlabelled_indices[0])]
  np.testing.assert_array_equal(
    spec.val_source[0]["mask"], expected[spec.val_source.entries[0].image]
  )


def test_source_repr_is_stable_and_independent_of_root(trees, tmp_path):
  root = trees["voc"][0]
  moved = _copy(trees, "voc", tmp_path)
  first, second = _build("voc", root), _build("voc", moved)
  assert repr(first.train_source) == repr(second.train_source)
  assert root not in repr(first.train_source)
  other = _build("voc", root, **{"data.split_seed": 1})
  assert repr(other.train_source) != repr(first.train_source)


# ---- splits -----------------------------------------------------------------------------


def test_read_split_file_formats(tmp_path):
  path = tmp_path / "labeled.txt"
  path.write_text(
    "# a comment\nJPEGImages/a.jpg SegmentationClass/a.png\n\nJPEGImages/b.jpg\n2007_000003\n"
  )
  rows = splits.read_split_file(str(path))
  assert [r[:2] for r in rows] == [
    ("JPEGImages/a.jpg", "SegmentationClass/a.png"),
    ("JPEGImages/b.jpg", None),
    ("2007_000003", None),
  ]
  assert rows[0][2] == f"{path}:2"
  path.write_text("a b c\n")
  with pytest.raises(DataError, match=r"labeled.txt:1 has 3 columns"):
    splits.read_split_file(str(path))


def test_named_split_two_column_and_id_lists(trees, tmp_path):
  root = _copy(trees, "voc", tmp_path)
  split_dir = os.path.join(root, "splits", "92")
  os.makedirs(split_dir)
  # Published format: "JPEGImages/<id>.jpg SegmentationClass/<id>.png" pairs.
  splits.write_split_file(
    os.path.join(split_dir, "labeled.txt"),
    [
      ("JPEGImages/2007_000003.jpg", "SegmentationClass/2007_000003.png"),
      ("JPEGImages/2007_000005.jpg", "SegmentationClass/2007_000005.png"),
    ],
  )
  with open(os.path.join(split_dir, "unlabeled.txt"), "w") as f:
    f.write("2007_000000\n2007_000001\n2007_000002\n")  # bare ids
  spec = _build("voc", root, **{"data.split": "92"})
  entries = spec.train_source.entries
  assert [entries[i].image for i in spec.labelled_indices] == [
    "JPEGImages/2007_000003.jpg",
    "JPEGImages/2007_000005.jpg",
  ]
  assert [files.stem(entries[i].image) for i in spec.unlabelled_indices] == [
    "2007_000000",
    "2007_000001",
    "2007_000002",
  ]
  assert spec.unlabelled_has_masks  # the ids resolve to their aug masks
  # data.use_unlabelled_masks=False: the same images, their masks never read.
  off = _build("voc", root, **{"data.split": "92", "data.use_unlabelled_masks": False})
  assert not off.unlabelled_has_masks
  assert [off.train_source.entries[i].mask for i in off.unlabelled_indices] == [None] * 3
  assert all(off.train_source.entries[i].mask for i in off.labelled_indices)
  # A labelled list alone: the unlabelled set is the rest of the training set.
  alone = _build("voc", root, **{"data.labelled_list": os.path.join(split_dir, "labeled.txt")})
  assert len(alone.unlabelled_indices) == 10
  # An unlabelled line whose mask is missing keeps its image (masks there are diagnostics).
  os.remove(os.path.join(root, "SegmentationClassAug", "2007_000001.png"))
  os.remove(os.path.join(root, "SegmentationClass", "2007_000001.png"))
  without = _build("voc", root, **{"data.split": "92"})
  assert len(without.unlabelled_indices) == 3 and not without.unlabelled_has_masks
  # A missing named split says where the files come from.
  with pytest.raises(DataError, match=r"splits/1464/labeled.txt.*LiheYoung/UniMatch"):
    _build("voc", root, **{"data.split": "1464"})


def test_generate_split_is_deterministic_and_class_balanced():
  first = splits.generate_split(100, 10, seed=3)
  np.testing.assert_array_equal(first[0], splits.generate_split(100, 10, seed=3)[0])
  assert not np.array_equal(first[0], splits.generate_split(100, 10, seed=4)[0])
  assert len(first[0]) == 10 and len(first[1]) == 90
  assert sorted(np.concatenate(first).tolist()) == list(range(100))
  # Class 3 is in 2 of 100 images: a balanced split of 8 must label one of them, and every
  # class gets at least 2 labelled images.
  presence = np.zeros((100, 4), bool)
  presence[:, 0] = True
  presence[0:50, 1] = True
  presence[50:98, 2] = True
  presence[98:, 3] = True
  for seed in range(5):
    labelled, _ = splits.generate_split(100, 8, seed, class_presence=presence)
    counts = presence[labelled].sum(0)
    assert counts.min() >= 2, counts
    np.testing.assert_array_equal(
      labelled, splits.generate_split(100, 8, seed, class_presence=presence)[0]
    )


def test_split_command_writes_loadable_files(trees, tmp_path):
  root = trees["folder"][0]
  out = str(tmp_path / "split")
  splits.main(
    [
      "--dataset=folder",
      f"--root={root}",
      "--num_labelled=3",
      "--seed=1",
      "--class_balanced",
      f"--out={out}",
    ]
  )
  labelled = splits.read_split_file(os.path.join(out, "labeled.txt"))
  unlabelled = splits.read_split_file(os.path.join(out, "unlabeled.txt"))
  assert len(labelled) == 3 and len(unlabelled) == 7  # 6 masked + 4 unmasked images
  assert all(second is not None for _, second, _ in labelled)
  spec = _build(
    "folder",
    root,
    **{
      "data.labelled_list": os.path.join(out, "labeled.txt"),
      "data.unlabelled_list": os.path.join(out, "unlabeled.txt"),
    },
  )
  assert len(spec.labelled_indices) == 3 and len(spec.unlabelled_indices) == 7


# ---- TFDS -------------------------------------------------------------------------------


def test_tfds_round_trip_matches_the_files(trees, tmp_path):
  from s4jax.data import tfds_builders  # pylint: disable=import-outside-toplevel

  tfds_dir = str(tmp_path / "tfds")
  for name in ("voc", "cityscapes"):
    counts = tfds_builders.prepare(name, trees[name][0], tfds_dir)
    from_files = _build(name, trees[name][0])
    from_tfds = _build(name, "", **{"data.source": "tfds", "data.tfds_dir": tfds_dir})
    assert counts == {"train": len(from_files.train_source), "val": len(from_files.val_source)}
    np.testing.assert_array_equal(from_files.labelled_indices, from_tfds.labelled_indices)
    for a, b in (
      (from_files.train_source, from_tfds.train_source),
      (from_files.val_source, from_tfds.val_source),
    ):
      assert len(a) == len(b)
      for i in range(len(a)):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
        assert a.image_hw(i) == b.image_hw(i)
  # A wrong root fails before TFDS writes anything; not prepared: the message says how.
  from s4jax.data import prepare  # pylint: disable=import-outside-toplevel

  assert (
    prepare.main(["--dataset=voc", f"--root={tmp_path / 'nowhere'}", f"--out={tmp_path / 'other'}"])
    == 2
  )
  assert not os.path.exists(tmp_path / "other")
  with pytest.raises(DataError, match=r"python -m s4jax.data.prepare --dataset=voc"):
    _build("voc", "", **{"data.source": "tfds", "data.tfds_dir": str(tmp_path / "none")})


def test_no_tensorflow_in_the_environment():
  done = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True)
  assert done.returncode != 0  # the TFDS round trip above ran without it


# ---- evaluation batches and sliding window ----------------------------------------------


def test_eval_batches_hold_one_image_size_each_and_never_pad(trees):
  spec = _build("voc", trees["voc"][0])
  source = spec.val_source
  batches = pipeline.make_eval_batches(source, global_batch_size=2)
  sizes = [tuple(source[i]["image"].shape[:2]) for i in range(len(source))]
  assert batches.num_shapes == len(set(sizes)) > 1
  seen = 0
  for batch in batches:
    for image, mask in zip(batch["image"], batch["mask"]):
      if np.all(mask == 255):
        continue  # a dummy row filling the last batch of a size
      seen += 1
      # Every real row is a whole image of exactly the batch's size: no padding at all.
      assert tuple(image.shape[:2]) in sizes
  assert seen == len(source)


def test_sliding_window_covers_cityscapes_frames_with_801_534():
  assert evaluate._window_starts(1024, 801, 534) == [0, 223]  # pylint: disable=protected-access
  assert evaluate._window_starts(2048, 801, 534) == [0, 534, 1068, 1247]  # pylint: disable=protected-access
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1024, 2048, 3)), jnp.float32)
  pointwise = lambda x: x @ weights  # noqa: E731  (per-pixel: windows cannot change it)
  sliding = jax.jit(lambda x: evaluate.sliding_window_probabilities(pointwise, x, 4, 801, 534))
  np.testing.assert_allclose(
    np.asarray(sliding(images)), np.asarray(jax.nn.softmax(pointwise(images), axis=-1)), atol=1e-5
  )


# ---- OHEM -------------------------------------------------------------------------------


def _ohem_reference(logits, labels, threshold, min_kept):
  """NumPy transcription of UniMatch util/ohem.py (ProbOhemCrossEntropy2d)."""
  k = logits.shape[-1]
  logits = logits.reshape(-1, k).astype(np.float64)
  labels = labels.reshape(-1).astype(np.int64)
  valid = labels != 255
  target = np.where(valid, labels, 0)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  num_valid = valid.sum()
  if min_kept <= num_valid and num_valid > 0 and min_kept > 0:
    mask_prob = np.where(valid, probs[np.arange(len(target)), target], 1.0)
    bar = threshold
    kth = mask_prob[np.argsort(mask_prob, kind="stable")[min(len(mask_prob), min_kept) - 1]]
    if kth > threshold:
      bar = kth
    valid = valid & (mask_prob <= bar)
  losses = -np.log(probs[np.arange(len(target)), target])
  return losses[valid].mean() if valid.any() else 0.0


@pytest.mark.parametrize("min_kept", [0, 1, 30, 150, 200, 216, 217, 1000])
def test_ohem_matches_numpy_reference(min_kept):
  rng = np.random.default_rng(min_kept)
  logits = rng.normal(size=(2, 10, 12, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, (2, 10, 12))
  labels[0, :2] = 255  # 24 ignored pixels: 216 valid
  expected = _ohem_reference(logits, labels, 0.7, min_kept)
  got = jax.jit(lambda l, y: supervised.ohem_cross_entropy(l, y, 0.7, min_kept))(logits, labels)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_ohem_keeps_hard_pixels_only_and_labelled_loss_dispatches():
  # Two easy pixels (p ~ 1) and two hard ones: with min_kept 1 only the hard ones count.
  logits = jnp.asarray([[[10.0, 0.0], [10.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
  labels = jnp.asarray([[0, 0, 0, 1]])
  hard = supervised.pixel_cross_entropy(logits, labels)[0][0, 2:]
  np.testing.assert_allclose(
    float(supervised.ohem_cross_entropy(logits, labels, 0.7, 1)), float(hard.mean()), rtol=1e-6
  )
  loss_config = config_schema.default_config().losses
  assert float(supervised.labelled_loss(logits, labels, loss_config)) == pytest.approx(
    float(supervised.cross_entropy(logits, labels))
  )
  loss_config.unlock()
  loss_config.supervised, loss_config.ohem_min_kept = "ohem", 1
  assert float(supervised.labelled_loss(logits, labels, loss_config)) == pytest.approx(
    float(hard.mean())
  )


# ---- bad input --------------------------------------------------------------------------


def test_missing_root_and_wrong_layout_show_the_expected_tree(trees, tmp_path):
  with pytest.raises(DataError, match=r"does not exist(.|\n)*JPEGImages/<id>.jpg"):
    _build("voc", str(tmp_path / "nowhere"))
  nested = tmp_path / "VOCdevkit"
  shutil.copytree(trees["voc"][0], nested / "VOC2012")
  with pytest.raises(DataError, match=r"no JPEGImages/ folder \(did you mean .*VOC2012\?\)"):
    _build("voc", str(nested))
  with pytest.raises(DataError, match=r"leftImg8bit is not a directory(.|\n)*labelIds.png"):
    _build("cityscapes", trees["voc"][0])
  with pytest.raises(DataError, match=r"images is not a directory(.|\n)*classes.json"):
    _build("folder", trees["voc"][0])
  no_classes = tmp_path / "no_classes"
  shutil.copytree(trees["folder"][0], no_classes)
  os.remove(no_classes / "classes.json")
  with pytest.raises(DataError, match=r"classes.json does not exist"):
    _build("folder", str(no_classes))
  with pytest.raises(ConfigError, match=r"config.data.root=''"):
    config_schema.validate(tiny_config(**{"data.name": "voc"}))


def test_bad_files_name_the_file(trees, tmp_path):
  root = _copy(trees, "voc", tmp_path)
  spec = _build("voc", root, **{"data.labelled_fraction": 1.0})
  entries = spec.train_source.entries
  # corrupt image
  with open(os.path.join(root, entries[0].image), "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(DataError, match=rf"Cannot decode image .*{entries[0].image}"):
    spec.train_source[0]
  # mask of another size
  Image.fromarray(np.zeros((7, 9), np.uint8), mode="L").save(os.path.join(root, entries[1].mask))
  with pytest.raises(DataError, match=rf"Mask .*{entries[1].mask} is 7x9 but its image"):
    spec.train_source[1]
  # label out of range (30 on 21 classes); 255 is fine
  mask = np.asarray(Image.open(os.path.join(root, entries[2].mask))).copy()
  mask[5, 5] = 30
  Image.fromarray(mask, mode="L").save(os.path.join(root, entries[2].mask))
  with pytest.raises(
    DataError,
    match=rf"Mask .*{entries[2].mask} has label values \[30\] "
    r"outside the valid ones \(0..20; 255 = ignore\)",
  ):
    spec.train_source[2]
  # colour mask without a palette
  Image.fromarray(np.zeros(mask.shape + (3,), np.uint8)).save(os.path.join(root, entries[3].mask))
  with pytest.raises(DataError, match=rf"Mask .*{entries[3].mask} is a colour image"):
    spec.train_source[3]
  # a split line naming a missing file: file and line
  listing = tmp_path / "list.txt"
  listing.write_text(
    "JPEGImages/2007_000004.jpg SegmentationClass/2007_000004.png\n"
    "JPEGImages/missing.jpg SegmentationClass/missing.png\n"
  )
  with pytest.raises(DataError, match=rf"missing.jpg does not exist \(listed at {listing}:2\)"):
    _build("voc", root, **{"data.labelled_list": str(listing)})


def test_cityscapes_raw_id_out_of_range_and_bad_classes_json(trees, tmp_path):
  root = _copy(trees, "cityscapes", tmp_path)
  spec = _build("cityscapes", root)
  path = os.path.join(root, spec.val_source.entries[0].mask)
  raw = np.asarray(Image.open(path)).copy()
  raw[0, 0] = 40
  Image.fromarray(raw, mode="L").save(path)
  with pytest.raises(DataError, match=r"has label values \[40\] outside the valid ones \(0..33"):
    spec.val_source[0]
  folder_root = _copy(trees, "folder", tmp_path)
  with open(os.path.join(folder_root, "classes.json"), "w") as f:
    json.dump({"classes": ["a", "b"], "palette": [[0, 0, 0]]}, f)
  with pytest.raises(DataError, match=r"classes.json: \"palette\" has 1 colours for 2 classes"):
    _build("folder", folder_root)


def test_skip_counts_bad_examples_across_worker_processes(trees, tmp_path):
  root = _copy(trees, "voc", tmp_path)
  listing = tmp_path / "list.txt"
  good = [f"JPEGImages/2007_{i:06d}.jpg SegmentationClassAug/2007_{i:06d}.png" for i in range(6)]
  listing.write_text("\n".join(good + ["JPEGImages/gone.jpg SegmentationClassAug/gone.png"]))
  with open(os.path.join(root, "JPEGImages", "2007_000001.jpg"), "wb") as f:
    f.write(b"broken")
  spec = _build("voc", root, **{"data.on_bad_example": "skip", "data.labelled_list": str(listing)})
  assert len(spec.labelled_indices) == 6  # the missing line is left out (and counted)
  # The bad image is replaced by the next good one.
  np.testing.assert_array_equal(spec.train_source[1]["image"], spec.train_source[2]["image"])
  stream = pipeline.make_train_iterator(
    spec.train_source,
    spec.labelled_indices,
    batch_size=3,
    crop_size=16,
    seed=0,
    kind="labelled",
    num_workers=1,
  )
  for _ in range(4):  # two epochs: the bad image is met in the worker process
    assert next(stream)["image"].shape == (3, 16, 16, 3)
  summary = spec.skipped_summary()
  assert summary.startswith("Skipped 2 bad example file(s)")
  assert "gone.jpg (missing file)" in summary and "2007_000001.jpg (Cannot decode" in summary
  # "stop" raises through the grain pipeline with the file's name.
  stopping = _build("voc", root, **{"data.labelled_fraction": 1.0})
  bad = [e.image for e in stopping.train_source.entries].index("JPEGImages/2007_000001.jpg")
  stream = pipeline.make_train_iterator(
    stopping.train_source, [bad], batch_size=1, crop_size=16, seed=0, kind="labelled"
  )
  with pytest.raises(DataError, match=r"2007_000001.jpg"):
    next(stream)


def test_unlabelled_stream_reads_real_files(trees):
  spec = _build("folder", trees["folder"][0], **{"data.labelled_fraction": 1.0})
  stream = pipeline.make_train_iterator(
    spec.train_source,
    spec.unlabelled_indices,
    batch_size=2,
    crop_size=24,
    seed=0,
    kind="unlabelled",
  )
  batch = next(stream)
  assert set(batch) == {"image", "valid"} and batch["image"].shape == (2, 24, 24, 3)


# ---- the command line -------------------------------------------------------------------

TINY = [
  "--config.total_epochs=0",
  "--config.total_steps=2",
  "--config.log_every=1",
  "--config.eval_every=2",
  "--config.checkpoint_every=2",
  "--config.model.backbone=resnet18",
  "--config.model.width=8",
  "--config.model.aspp_channels=16",
  "--config.model.decoder_channels=16",
  "--config.data.crop_size=32",
  "--config.batch_size=2",
  "--config.unlabelled_batch_size=2",
  "--config.eval.batch_size=2",
  "--config.num_visualised=1",
]


def _cli(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device
  return subprocess.run(
    [sys.executable, "-m", "s4jax.main", *args],
    capture_output=True,
    text=True,
    timeout=400,
    cwd=REPO,
    env=env,
  )


@pytest.mark.parametrize(
  "name, config, extra",
  [
    # The flagship: UniMatch + class-wise MIM on VOC through its config (which starts from
    # voc_unimatch.py), whole-image eval at each image's size; 16-px patches on the 32-px crop.
    (
      "voc",
      "voc_cwmim.py",
      ["--config.data.labelled_fraction=0.5", "--config.losses.cwmim.patch_size=16"],
    ),
    # Cityscapes: sliding-window eval and the OHEM config (supervised: one compile fewer).
    (
      "cityscapes",
      "cityscapes_unimatch.py",
      [
        "--config.method=supervised",
        "--config.eval.window=32",
        "--config.eval.stride=21",
        "--config.data.labelled_fraction=0.5",
      ],
    ),
    ("folder", "folder_supervised.py", []),
  ],
)
def test_cli_trains_and_evaluates_each_dataset(trees, tmp_path, name, config, extra):
  workdir = str(tmp_path / "run")
  done = _cli(
    f"--config=configs/{config}",
    f"--workdir={workdir}",
    f"--config.data.root={trees[name][0]}",
    *TINY,
    *extra,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "final student mIoU" in done.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  evals = [r for r in records if "eval/teacher_miou" in r]
  assert len(evals) == 1
  class_names = datasets.LAYOUTS[name](trees[name][0]).class_names
  assert f"eval/teacher_iou/{class_names[-1]}" in evals[0]


def test_cli_bad_root_is_one_message_with_the_tree(tmp_path):
  done = _cli(
    "--config=configs/voc_supervised.py",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data.root={tmp_path / 'nowhere'}",
    *TINY,
  )
  assert done.returncode == 2
  assert "s4jax: error: The dataset directory" in done.stderr
  assert "SegmentationClassAug/<id>.png" in done.stderr
  assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
  "overrides, key",
  [
    ({"data.source": "hdfs"}, "data.source"),
    ({"data.on_bad_example": "ignore"}, "data.on_bad_example"),
    (
      {"data.name": "voc", "data.root": "/x", "data.split": "92", "data.labelled_list": "a.txt"},
      "data.split",
    ),
    ({"data.name": "voc", "data.source": "tfds"}, "data.tfds_dir"),
    ({"teacher.source": "ema_student"}, "teacher.source"),
    ({"method": "unimatch_v2", "teacher.source": "student"}, "teacher.source"),
    ({"losses.supervised": "focal"}, "losses.supervised"),
    ({"losses.ohem_threshold": 0.0}, "losses.ohem_threshold"),
    ({"data.shapes.objects": (2, 1)}, "data.shapes.objects"),
    ({"data.shapes.radius": (0.0, 0.2)}, "data.shapes.radius"),
    ({"data.shapes.max_rotation": -5.0}, "data.shapes.max_rotation"),
  ],
)
def test_new_config_keys_are_validated(overrides, key):
  with pytest.raises(ConfigError, match=rf"config\.{key}="):
    config_schema.validate(tiny_config(**overrides))
