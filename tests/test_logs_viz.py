"""Tests for s4jax.logs (metric writers, progress) and s4jax.viz (palettes, grids)."""

import json
import math
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from s4jax import logs
from s4jax import viz


# ----------------------------------------------------------------------------- logs


def test_jsonl_round_trip_converts_scalars_and_nan(tmp_path):
  workdir = str(tmp_path / "run")
  writer = logs.MetricWriter(workdir)
  writer.write_scalars(
    1,
    {
      "train/loss": np.float32(0.5),
      "train/acc": jnp.asarray(0.25, dtype=jnp.float32),
      "train/count": np.int64(7),
      "train/nan": float("nan"),
      "train/inf": np.float64(np.inf),
      "eval/miou": 0.75,
    },
  )
  writer.write_scalars(np.int32(2), {"train/loss": jnp.float32(0.125)})
  writer.close()

  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = f.read().splitlines()
  assert len(lines) == 2
  # Every line is strict JSON (no NaN/Infinity tokens).
  strict = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in lines]
  records = logs.read_metrics(path)
  assert records == strict
  first = records[0]
  assert list(first) == [
    "step",
    "train/loss",
    "train/acc",
    "train/count",
    "train/nan",
    "train/inf",
    "eval/miou",
  ]
  assert first["step"] == 1 and type(first["step"]) is int
  assert first["train/loss"] == 0.5 and type(first["train/loss"]) is float
  assert first["train/acc"] == 0.25
  assert first["train/count"] == 7 and type(first["train/count"]) is int
  assert first["train/nan"] is None
  assert first["train/inf"] is None
  assert records[1] == {"step": 2, "train/loss": 0.125}


def test_jsonl_appends_on_reopen_and_survives_truncated_line(tmp_path):
  workdir = str(tmp_path)
  with logs.MetricWriter(workdir) as writer:
    writer.write_scalars(1, {"a": 1.0})
  # Simulate a run killed mid-write: a partial line without newline.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 2, "a"')
  with logs.MetricWriter(workdir) as writer:
    writer.write_scalars(3, {"a": 3.0})
  records = logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert records == [{"step": 1, "a": 1.0}, {"step": 3, "a": 3.0}]


def test_step_key_is_reserved(tmp_path):
  with logs.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError):
      writer.write_scalars(1, {"step": 3})


def test_tensorboard_event_file_created_without_tensorflow(tmp_path):
  writer = logs.MetricWriter(str(tmp_path))
  writer.write_scalars(1, {"train/loss": 1.0, "train/nan": float("nan")})
  writer.write_text(0, "config", "lr: 0.01")
  writer.flush()
  writer.close()
  writer.close()  # Idempotent.
  names = os.listdir(tmp_path / "tensorboard")
  events = [n for n in names if n.startswith("events.out.tfevents")]
  assert events
  assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
  assert "tensorflow" not in sys.modules


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "not_here"
  writer = logs.MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  assert writer.write_images(1, {"x": np.zeros((4, 4, 3), np.uint8)}) == []
  writer.write_text(1, "t", "text")
  writer.flush()
  writer.close()
  assert not workdir.exists()


def test_write_images_png(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  with logs.MetricWriter(str(tmp_path)) as writer:
    paths = writer.write_images(42, {"val/predictions": image, "gray": image[..., 0]})
  assert paths == [
    str(tmp_path / "images" / "val_predictions_0000042.png"),
    str(tmp_path / "images" / "gray_0000042.png"),
  ]
  with Image.open(paths[0]) as png:
    assert png.size == (7, 5)  # PIL reports (width, height).
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), image)


def test_write_images_rejects_float(tmp_path):
  with logs.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(TypeError):
      writer.write_images(0, {"x": np.zeros((4, 4, 3), np.float32)})


class FakeClock:
  def __init__(self, times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


def test_progress_rate_and_eta_exclude_first_interval():
  # First update at t=100 (after a long compile) only sets the reference.
  progress = logs.Progress(total_steps=1000, clock=FakeClock([100.0, 110.0, 112.0, 112.0]))
  assert progress.update(10) == {"steps_per_sec": None, "eta_seconds": None}
  assert progress.update(60) == {"steps_per_sec": 5.0, "eta_seconds": 188.0}
  # Rate over the last interval only: 40 steps in 2 s.
  assert progress.update(100) == {"steps_per_sec": 20.0, "eta_seconds": 45.0}
  # No elapsed time: keep the previous measurement rather than divide by zero.
  assert progress.update(100) == {"steps_per_sec": 20.0, "eta_seconds": 45.0}


def test_progress_format_line():
  progress = logs.Progress(total_steps=1000, start_step=0, clock=FakeClock([0.0, 10.0]))
  scalars = {"train/loss_sup": np.float32(0.812345), "train/acc": 0.5, "eval/miou": 0.123456}
  line = progress.format_line(5, scalars)
  assert line == "step    5/1000 | acc 0.5 | eval/miou 0.1235 | loss_sup 0.8123"
  progress.update(0)
  progress.update(32)  # 3.2 steps/s -> 968 steps in 302.5 s.
  line = progress.format_line(120, {"train/loss_sup": 0.812345, "train/lr": 1.0}, lr=9.1e-3)
  assert line == "step  120/1000 | loss_sup 0.8123 | lr 9.1e-03 | 3.20 steps/s | ETA 5m02s"


@pytest.mark.parametrize(
  "seconds, expected",
  [
    (0, "0s"),
    (12, "12s"),
    (12.4, "12s"),
    (59.6, "1m00s"),
    (273, "4m33s"),
    (3720, "1h02m"),
    (3599.9, "1h00m"),
    (2 * 86400 + 3 * 3600, "2d03h"),
    (-5, "0s"),
    (math.inf, "?"),
    (math.nan, "?"),
  ],
)
def test_format_duration(seconds, expected):
  assert logs.format_duration(seconds) == expected


# ------------------------------------------------------------------------------ viz


def test_palette_voc_colours_and_ignore():
  palette = viz.make_palette(21)
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  assert [tuple(c) for c in palette[:4]] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
  # A few more standard VOC entries: bus (6), person (15), tvmonitor (20).
  assert tuple(palette[6]) == (0, 128, 128)
  assert tuple(palette[15]) == (192, 128, 128)
  assert tuple(palette[20]) == (0, 64, 128)
  assert tuple(palette[255]) == (255, 255, 255)
  # Distinct colours for every non-ignore index.
  assert len({tuple(c) for c in palette[:255]}) == 255
  with pytest.raises(ValueError):
    viz.make_palette(256)


def test_colorize_maps_and_treats_out_of_range_as_ignore():
  palette = viz.make_palette(21)
  mask = np.array([[0, 1], [255, -1]], dtype=np.int32)
  out = viz.colorize(mask, palette)
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], (0, 0, 0))
  np.testing.assert_array_equal(out[0, 1], (128, 0, 0))
  np.testing.assert_array_equal(out[1, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[1, 1], (255, 255, 255))


def test_prediction_grid_layout_and_panel_colours():
  rng = np.random.default_rng(1)
  n, h, w, sep = 3, 6, 5, 2
  palette = viz.make_palette(21)
  images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
  labels = rng.integers(0, 21, size=(n, h, w)).astype(np.int32)
  labels[:, 0, 0] = 255
  predictions = jnp.asarray(rng.integers(0, 21, size=(n, h, w)), dtype=jnp.int32)
  teacher = (predictions + 1) % 21
  grid = viz.prediction_grid(images, labels, [predictions, teacher], palette, separator=sep)
  assert grid.shape == (n * h + (n - 1) * sep, 4 * w + 3 * sep, 3)
  assert grid.dtype == np.uint8
  for i in range(n):
    top = i * (h + sep)
    np.testing.assert_array_equal(grid[top : top + h, 0:w], images[i])
    np.testing.assert_array_equal(
      grid[top : top + h, w + sep : 2 * w + sep], viz.colorize(labels[i], palette)
    )
    np.testing.assert_array_equal(
      grid[top : top + h, 2 * (w + sep) : 3 * w + 2 * sep],
      viz.colorize(np.asarray(predictions[i]), palette),
    )
    np.testing.assert_array_equal(
      grid[top : top + h, 3 * (w + sep) :], viz.colorize(np.asarray(teacher[i]), palette)
    )
  # Separators are drawn between rows and panels.
  sep_colour = np.asarray(viz.SEPARATOR_COLOR, np.uint8)
  assert (grid[h : h + sep, :] == sep_colour).all()
  assert (grid[:, w : w + sep] == sep_colour).all()
  # max_rows caps the number of rows.
  capped = viz.prediction_grid(images, labels, [predictions], palette, max_rows=2, separator=sep)
  assert capped.shape == (2 * h + sep, 3 * w + 2 * sep, 3)
  # Rows stop at the dummy padding of a short batch (labels all 255).
  labels[1] = 255
  assert viz.prediction_grid(images, labels, [predictions], palette).shape[0] == h
  labels[0] = 255
  assert viz.prediction_grid(images, labels, [predictions], palette) is None


def test_image_grid_pads_to_largest_cell_with_black():
  big = np.full((4, 6, 3), 10, np.uint8)
  small = np.full((2, 3, 3), 20, np.uint8)
  gray = np.full((3, 2), 30, np.uint8)
  grid = viz.image_grid([[big, small], [gray]], separator=1)
  assert grid.shape == (2 * 4 + 1, 2 * 6 + 1, 3)
  np.testing.assert_array_equal(grid[0:4, 0:6], big)
  # Small cell at the top-left of its slot, black padding after.
  np.testing.assert_array_equal(grid[0:2, 7:10], small)
  assert not grid[2:4, 7:13].any() and not grid[0:2, 10:13].any()
  # Grayscale expanded to RGB; padding black; missing cell in row 2 black.
  np.testing.assert_array_equal(grid[5:8, 0:2], np.full((3, 2, 3), 30, np.uint8))
  assert not grid[8:9, 0:6].any() and not grid[5:9, 2:6].any()
  assert not grid[5:9, 7:13].any()
  # Separator column and row.
  np.testing.assert_array_equal(grid[:, 6], np.broadcast_to(viz.SEPARATOR_COLOR, (9, 3)))
  np.testing.assert_array_equal(grid[4, :], np.broadcast_to(viz.SEPARATOR_COLOR, (13, 3)))


def test_image_grid_no_separator_and_errors():
  a = np.zeros((2, 2, 3), np.uint8)
  assert viz.image_grid([[a, a], [a, a]], separator=0).shape == (4, 4, 3)
  with pytest.raises(ValueError):
    viz.image_grid([])
  with pytest.raises(TypeError):
    viz.image_grid([[a.astype(np.float32)]])


def test_overlay_blends_and_keeps_ignore_pixels():
  palette = viz.make_palette(21)
  image = np.full((1, 3, 3), 100, np.uint8)
  mask = np.array([[1, 0, 255]])
  out = viz.overlay(image, mask, palette, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], (114, 50, 50))  # (100 + 128) / 2 = 114.
  np.testing.assert_array_equal(out[0, 1], (50, 50, 50))
  np.testing.assert_array_equal(out[0, 2], (100, 100, 100))
