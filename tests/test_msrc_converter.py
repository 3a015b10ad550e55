"""benchmarks/datasets/msrc.py: MSRC-v2 annotations -> the folder layout, on generated files."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import io as scipy_io

from s4jax import config_schema
from s4jax.data import datasets

_PATH = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "datasets", "msrc.py"
)
_spec = importlib.util.spec_from_file_location("msrc", _PATH)
msrc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(msrc)


def _raw_example(root, name, segments, labels, rng):
  os.makedirs(os.path.join(root, "Images"), exist_ok=True)
  os.makedirs(os.path.join(root, "newsegmentations_mats"), exist_ok=True)
  h, w = segments.shape
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
    os.path.join(root, "Images", name + ".bmp")
  )
  scipy_io.savemat(
    os.path.join(root, "newsegmentations_mats", name + "_GT.mat"),
    {"newseg": segments.astype(np.uint8), "newlabels": np.asarray([labels], np.uint8)},
  )


def test_class_mask_maps_segments_drops_horse_and_mountain_and_voids_the_last():
  segments = np.array([[1, 2, 3, 4]])
  # 1-based: 4 = cow, 5 = horse, 8 = mountain; three labels for four segments -> 4 is void.
  mask = msrc.class_mask(segments, [4, 5, 8], "x")
  cow = msrc.CLASSES.index("cow")
  np.testing.assert_array_equal(mask, [[cow, 255, 255, 255]])
  # Every kept class lands on its own index, in the annotations' order.
  all_segments = np.arange(1, 24)[None]
  mapped = msrc.class_mask(all_segments, np.arange(1, 24), "x")[0]
  expected = [msrc.CLASSES.index(c) if c in msrc.CLASSES else 255 for c in msrc.MSRC_CLASSES]
  np.testing.assert_array_equal(mapped, expected)
  with pytest.raises(ValueError, match="5 segments but 3 labels"):
    msrc.class_mask(np.array([[1, 5]]), [1, 2, 3], "bad.mat")


def test_convert_writes_a_folder_dataset_the_loader_reads(tmp_path):
  rng = np.random.default_rng(0)
  raw = str(tmp_path / "raw")
  for i in range(10):
    segments = np.ones((12, 16), np.int64)
    segments[:, 8:] = 2
    _raw_example(raw, f"{i}_1_s", segments, [1 + i % 4, 19] if i % 2 else [4], rng)
  out = str(tmp_path / "msrc")
  counts = msrc.convert(raw, out, val_fraction=0.3, seed=1)
  assert counts == {"train": 7, "val": 3}
  spec = json.load(open(os.path.join(out, "classes.json")))
  assert spec["classes"] == list(msrc.CLASSES) and len(spec["classes"]) == 21
  assert [spec["classes"][i] for i in spec["background_classes"]] == list(msrc.STUFF)
  # Odd examples: left = class 1 + i % 4 (1-based), right = road; even: the right half void.
  for split in ("train", "val"):
    for name in os.listdir(os.path.join(out, "masks", split)):
      i = int(name.split("_")[0])
      mask = np.asarray(Image.open(os.path.join(out, "masks", split, name)))
      left = msrc.label_lookup()[1 + i % 4] if i % 2 else msrc.CLASSES.index("cow")
      right = msrc.CLASSES.index("road") if i % 2 else 255
      assert (mask[:, :8] == left).all() and (mask[:, 8:] == right).all()
  # The same seed gives the same validation set; an existing output is refused.
  again = str(tmp_path / "again")
  msrc.convert(raw, again, val_fraction=0.3, seed=1)
  assert sorted(os.listdir(os.path.join(out, "images", "val"))) == sorted(
    os.listdir(os.path.join(again, "images", "val"))
  )
  with pytest.raises(FileExistsError):
    msrc.convert(raw, out)
  # The folder dataset loads it.
  config = config_schema.default_config()
  config.data.name = "folder"
  config.data.root = out
  data = datasets.build(config.data)
  assert data.num_classes == 21 and len(data.val_source) == 3
  assert tuple(data.background_classes) == tuple(spec["background_classes"])
