"""Predicting on a folder of images (any size, a corrupt file) and exporting a model file."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from s4jax import augment
from s4jax import export
from s4jax import predict
from s4jax import train
from s4jax import viz
from s4jax.models import segmenter
from s4jax.errors import UserInputError
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"a.png": (40, 56), "b.jpg": (64, 64), os.path.join("sub", "c.png"): (97, 33)}


def _config():
  return tiny_config(
    **{
      "total_steps": 2,
      "eval_every": 2,
      "checkpoint_every": 2,
      "log_every": 1,
      "num_visualised": 0,
      "data.num_train": 32,
      "data.num_val": 8,
    }
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step tiny run (best = latest = step 2), a folder of images plus a corrupt one, the
  best teacher as restored for export, and what predict wrote from the workdir."""
  root = tmp_path_factory.mktemp("predict")
  workdir = str(root / "run")
  train.train_and_evaluate(_config(), workdir)
  images = root / "images"
  rng = np.random.default_rng(0)
  for name, (h, w) in SIZES.items():
    os.makedirs(os.path.dirname(images / name), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
  out = str(root / "out")
  result = predict.predict(input_pattern=str(images), output_dir=out, workdir=workdir)
  return {
    "workdir": workdir,
    "images": str(images),
    "out": out,
    "result": result,
    "bundle": export.from_workdir(workdir),
  }


def _forward(bundle):
  """A jitted forward pass of the network, built here, not by predict."""
  model = segmenter.build_segmenter(_config().model, 6)
  return jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"][0])


def _assert_is_argmax(mask, logits):
  """mask == argmax(logits) wherever the top two classes are not within float noise."""
  logits = np.asarray(logits)
  top2 = np.sort(logits, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-4
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(mask[clear], np.argmax(logits, axis=-1)[clear])


def _cli_env():
  """One CPU device, as a user gets; the tests' compilation cache (conftest.py), if any."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  return env


def _mask(out, name):
  return os.path.join(out, predict.MASKS_DIR, os.path.splitext(name)[0] + ".png")


def test_masks_have_each_size_and_equal_the_models_argmax(trained):
  out, images, result = trained["out"], trained["images"], trained["result"]
  assert result["written"] == 3
  assert list(result["skipped"]) == [os.path.join(images, "broken.png")]
  assert result["shapes"] == 3  # one compile per distinct size: no padding by default
  forward = _forward(trained["bundle"])
  variables = trained["bundle"].variables
  palette = viz.make_palette(6)
  for name, (h, w) in SIZES.items():
    with Image.open(_mask(out, name)) as m:
      assert m.mode == "P"
      np.testing.assert_array_equal(
        np.asarray(m.getpalette(), np.uint8).reshape(-1, 3)[:6], palette[:6]
      )
      mask = np.asarray(m)
    assert mask.shape == (h, w) and mask.max() < 6
    with Image.open(
      os.path.join(out, predict.OVERLAYS_DIR, os.path.splitext(name)[0] + ".jpg")
    ) as o:
      assert o.size == (w, h)
    image = np.asarray(Image.open(os.path.join(images, name)).convert("RGB"))
    _assert_is_argmax(mask, forward(variables, augment.normalize_uint8(image[None])))
  lines = predict.summary_lines(result, out)
  assert lines[1].startswith("skipped 1 unreadable file(s): ") and "broken.png" in lines[1]


def test_padding_is_cropped_back_and_windows_keep_the_size(trained):
  bundle = trained["bundle"]
  image = np.asarray(Image.open(os.path.join(trained["images"], "sub", "c.png")).convert("RGB"))
  padded = predict.Predictor(bundle, predict.Options(pad_multiple=32))(image)
  assert padded.shape == (97, 33)
  # The reference: the image at the top-left of a 128x64 canvas that is 0 (the mean colour)
  # after normalisation, prediction cropped back.
  canvas = jnp.zeros((1, 128, 64, 3)).at[:, :97, :33].set(augment.normalize_uint8(image[None]))
  _assert_is_argmax(padded, _forward(bundle)(bundle.variables, canvas)[:97, :33])
  sliding = predict.Predictor(bundle, predict.Options(window=32))(image)
  assert sliding.shape == (97, 33) and sliding.dtype == np.uint8 and sliding.max() < 6


def test_exported_file_predicts_the_same_masks(trained, tmp_path):
  model_file = str(tmp_path / "model.npz")
  export.save(trained["bundle"], model_file)
  with pytest.raises(UserInputError, match="exists; it is not replaced"):
    export.export(trained["workdir"], model_file)
  loaded = export.load(model_file)
  assert loaded.class_names[0] == "background" and loaded.num_classes == 6
  assert loaded.info["step"] == 2 and loaded.info["model"] == "teacher"
  # The command line, from the file alone (a glob this time).
  from_file = str(tmp_path / "file")
  env = _cli_env()
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "s4jax.predict",
      f"--model_file={model_file}",
      f"--input={os.path.join(trained['images'], '**', '*.png')}",
      f"--output={from_file}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=env,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote 2 masks" in done.stdout and "skipped 1 unreadable file(s)" in done.stdout
  assert "2/3 images" in done.stderr  # the progress bar (one line per tenth off a terminal)
  for name in ("a.png", os.path.join("sub", "c.png")):
    np.testing.assert_array_equal(
      np.asarray(Image.open(_mask(trained["out"], name))),
      np.asarray(Image.open(_mask(from_file, name))),
    )


def test_export_backbone_command_prints_one_line_without_library_records(trained, tmp_path):
  # Restoring a checkpoint makes orbax log a dozen INFO records (and jax one about the TPU
  # backend); the command-line tools filter them as main does, so the user sees the result.
  out = str(tmp_path / "backbone.npz")
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "s4jax.export_backbone",
      f"--workdir={trained['workdir']}",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=_cli_env(),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith(f"wrote {out}: the teacher backbone") and os.path.exists(out)
  for noise in ("orbax", "checkpoint_manager", "Unable to initialize backend"):
    assert noise not in done.stderr, done.stderr[-3000:]


def test_bad_inputs_are_one_clear_message(trained, tmp_path):
  workdir, images = trained["workdir"], trained["images"]
  out = str(tmp_path / "out")
  cases = [
    (dict(workdir=str(tmp_path / "nope")), "does not exist"),
    (dict(workdir=workdir, input_pattern=str(tmp_path / "none" / "*.png")), "matches no files"),
    (dict(workdir=workdir, output_dir=os.path.join(images, "a.png")), "is an existing file"),
    (dict(), "either --workdir=RUN"),
    (dict(workdir=workdir, model_file="m.npz"), "not both or neither"),
    (dict(model_file=os.path.join(images, "broken.png")), "is not a model file of s4jax"),
  ]
  for kwargs, message in cases:
    kwargs = {"input_pattern": images, "output_dir": out, **kwargs}
    with pytest.raises(UserInputError, match=message):
      predict.predict(**kwargs)
  # A run's directory without checkpoints.
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  with pytest.raises(UserInputError, match="(?i)no (best )?checkpoint"):
    predict.predict(input_pattern=images, output_dir=out, workdir=str(empty))
  # On the command line: one line, no traceback.
  env = _cli_env()
  for args, start in [
    ([f"--workdir={tmp_path / 'nope'}"], "s4jax: error: --workdir="),
    (["--model_file=m.npz", "--which=latest"], "s4jax: error: --which "),
  ]:
    done = subprocess.run(
      [sys.executable, "-m", "s4jax.predict", *args, f"--input={images}", f"--output={out}"],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=REPO,
      env=env,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith(start), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
