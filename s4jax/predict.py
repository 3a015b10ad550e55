"""Segments your own images with a trained run or an exported model file.

  python -m s4jax.predict --workdir=runs/demo --input=photos/ --output=runs/demo/predicted
  python -m s4jax.predict --model_file=demo_model.npz --input='photos/**/*.jpg' --output=out

For each readable image it writes `<output>/masks/<name>.png`, an index PNG (one class index
per pixel, with the run's palette, so viewers show colours and `np.asarray(Image.open(f))`
gives the indices), and `<output>/overlays/<name>.jpg`, the mask blended over the image.
Sub-folders of the input are kept. Unreadable files are skipped and counted at the end.

The network takes any image size and each image is segmented at its own size, as the run's
evaluation does: padding an image changes what the network computes (border convolutions
and the ASPP image pooling see the padding). Every distinct image size compiles the network
once; `--pad_multiple=32` pads each image (bottom/right, with the mean colour) to a multiple
of 32 and crops the prediction back, so a folder of varied sizes compiles a few times only,
at the price of slightly different predictions near the padded borders. Images larger than
`--max_side` (or all images with `--window=N`) are segmented by sliding windows, as the run's
sliding-window evaluation does; `--window=0` always segments whole images.
"""

import dataclasses
import functools
import glob
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from s4jax import augment
from s4jax import config_schema
from s4jax import evaluate
from s4jax import export as export_lib
from s4jax import logs
from s4jax import step as step_lib
from s4jax import viz
from s4jax.data import files
from s4jax.errors import UserInputError

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"


@dataclasses.dataclass(frozen=True)
class Options:
  window: int | None = None  # None: the run's eval mode; 0: whole images; N: N-pixel windows
  stride: int | None = None  # sliding stride; None: the run's (2/3 of the window by default)
  max_side: int = 2048  # whole images up to this side, windows above (window=None)
  pad_multiple: int = 1  # whole images padded to a multiple of this (1: no padding)
  alpha: float = 0.5  # overlay: weight of the mask colours


class Predictor:
  """image uint8 [H, W, 3] -> class indices uint8 [H, W] with one model; compiled per shape."""

  def __init__(self, bundle: export_lib.ModelBundle, options: Options = Options()):
    if options.pad_multiple < 1:
      raise UserInputError(f"--pad_multiple={options.pad_multiple}: give 1 (no padding) or more.")
    if options.window is not None and options.window < 0:
      raise UserInputError(f"--window={options.window}: give 0 (whole images) or a window side.")
    if options.stride is not None and options.stride <= 0:
      raise UserInputError(f"--stride={options.stride}: give a positive number of pixels.")
    self.bundle = bundle
    self.options = options
    self.model = export_lib.build_model(bundle)
    self._prediction_logits = step_lib.prediction_logits_fn(self.model, bundle.config)
    self.num_classes = bundle.num_classes
    config = bundle.config
    run_window, run_stride = config_schema.eval_window(config)
    if options.window is None:
      self.always_sliding = config.eval.mode == "sliding"
      self.window = run_window
    else:
      self.always_sliding = options.window > 0
      self.window = options.window or run_window
    if options.stride is not None:
      self.stride = options.stride
    elif options.window:
      self.stride = max(1, (2 * self.window) // 3)
    else:
      self.stride = run_stride
    # One copy on one device: images come one at a time, of any size.
    self.variables = jax.device_put(bundle.variables, jax.devices()[0])
    self.shapes = set()  # (mode, padded height, width) compiled so far
    self._whole = jax.jit(self._whole_fn)
    self._sliding = jax.jit(self._sliding_fn)

  def _logits(self, variables, images):
    # What evaluation scores: the network's logits after the run's objectives' eval hooks.
    return self._prediction_logits(variables, images)

  def _whole_fn(self, variables, canvas_uint8, height, width):
    """Class indices of the [Hp, Wp] canvas whose top-left [height, width] is the image.

    `height`/`width` are traced, so one compile serves every image padded to this canvas;
    the padding is set to 0 after normalisation (the mean colour, and the value the
    convolutions' own zero padding has).
    """
    x = augment.normalize_uint8(canvas_uint8[None])
    rows = jnp.arange(canvas_uint8.shape[0])[:, None] < height
    cols = jnp.arange(canvas_uint8.shape[1])[None, :] < width
    x = jnp.where((rows & cols)[None, :, :, None], x, 0.0)
    return jnp.argmax(self._logits(variables, x)[0], axis=-1).astype(jnp.uint8)

  def _sliding_fn(self, variables, image_uint8):
    probs = evaluate.sliding_window_probabilities(
      functools.partial(self._logits, variables),
      augment.normalize_uint8(image_uint8[None]),
      self.num_classes,
      self.window,
      self.stride,
    )
    return jnp.argmax(probs[0], axis=-1).astype(jnp.uint8)

  def uses_windows(self, height: int, width: int) -> bool:
    return self.always_sliding or max(height, width) > self.options.max_side

  def __call__(self, image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    if self.uses_windows(height, width):
      self.shapes.add(("sliding", height, width))
      return np.asarray(self._sliding(self.variables, image))
    m = self.options.pad_multiple
    padded_h, padded_w = -(-height // m) * m, -(-width // m) * m
    self.shapes.add(("whole", padded_h, padded_w))
    canvas = image
    if (padded_h, padded_w) != (height, width):
      canvas = np.zeros((padded_h, padded_w, 3), np.uint8)
      canvas[:height, :width] = image
    mask = self._whole(self.variables, canvas, np.int32(height), np.int32(width))
    return np.asarray(mask)[:height, :width]


# ---- inputs and outputs ---------------------------------------------------------------------


def find_inputs(pattern: str, output_dir: str | None = None) -> list[tuple[str, str]]:
  """(path, name relative to the input root) of every input; directories are searched
  recursively for image files, globs (`**` allowed) give every file they match."""
  if os.path.isdir(pattern):
    root = pattern
    paths = [os.path.join(root, rel) for rel in files.list_images(root)]
  elif os.path.isfile(pattern):
    root = os.path.dirname(pattern) or "."
    paths = [pattern]
  else:
    parts = os.path.normpath(pattern).split(os.sep)
    fixed = []
    for part in parts:
      if glob.has_magic(part):
        break
      fixed.append(part)
    if len(fixed) == len(parts):
      raise UserInputError(
        f"--input={pattern!r} does not exist (give a directory, an image "
        "file or a glob such as 'photos/**/*.jpg')."
      )
    root = os.sep.join(fixed) or ("/" if pattern.startswith("/") else ".")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if output_dir is not None:
    # An output folder inside the input folder must not be read back as input on a rerun.
    out = os.path.abspath(output_dir) + os.sep
    paths = [p for p in paths if not os.path.abspath(p).startswith(out)]
  if not paths:
    raise UserInputError(
      f"--input={pattern!r} matches no files"
      + (
        f" (a directory is searched for {', '.join(files.IMAGE_EXTENSIONS)} files)"
        if os.path.isdir(pattern)
        else ""
      )
      + ". Give a directory, an image file or a glob such as 'photos/**/*.jpg'."
    )
  return [(p, os.path.relpath(p, root)) for p in paths]


def output_names(relative: list[str]) -> list[str]:
  """Output stems: the input name without its extension, unless two inputs would then
  share one (a.jpg and a.png), which keep theirs (a_jpg, a_png)."""
  stems = [os.path.splitext(r)[0] for r in relative]
  counts = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [s if counts[s] == 1 else r.replace(".", "_") for s, r in zip(stems, relative)]


def check_output_dir(output_dir: str) -> None:
  if not output_dir:
    raise UserInputError("--output is required: the directory to write masks and overlays to.")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserInputError(
      f"--output={output_dir!r} is an existing file; give a directory (it is created if missing)."
    )


def read_image(path: str) -> tuple[np.ndarray | None, str | None]:
  """(uint8 [H, W, 3] RGB, None), or (None, why it cannot be read)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB")), None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return None, f"{type(e).__name__}: {e}"


def write_mask(path: str, mask: np.ndarray, palette: np.ndarray) -> None:
  image = Image.fromarray(np.asarray(mask, np.uint8), mode="L")
  image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())  # L -> P
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def write_overlay(
  path: str, image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float
) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(viz.overlay(image, mask, palette, alpha)).save(path, quality=92)


class _Progress:
  """A one-line bar on stderr when it is a terminal; a line per tenth otherwise (CI logs)."""

  def __init__(self, total: int, stream=None, width: int = 30):
    self.total, self.width = total, width
    self.stream = sys.stderr if stream is None else stream
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.every = max(1, total // 10)
    self.start = time.monotonic()

  def update(self, done: int) -> None:
    if not self.tty and done % self.every and done != self.total:
      return
    filled = self.width * done // self.total
    rate = done / max(time.monotonic() - self.start, 1e-9)
    line = (
      f"predict [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
      f"images, {rate:.1f}/s"
    )
    self.stream.write(("\r" + line) if self.tty else (line + "\n"))
    if self.tty and done == self.total:
      self.stream.write("\n")
    self.stream.flush()


def predict_files(
  predictor: Predictor, inputs: list[tuple[str, str]], output_dir: str, *, progress: bool = True
) -> dict:
  """Segments every input; returns {"written": n, "skipped": {path: reason}, "shapes": k}."""
  check_output_dir(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  palette = predictor.bundle.palette
  names = output_names([rel for _, rel in inputs])
  bar = _Progress(len(inputs)) if progress else None
  written, skipped = 0, {}
  for i, ((path, _), name) in enumerate(zip(inputs, names)):
    image, problem = read_image(path)
    if problem is not None:
      skipped[path] = problem
    else:
      mask = predictor(image)
      write_mask(os.path.join(output_dir, MASKS_DIR, name + ".png"), mask, palette)
      write_overlay(
        os.path.join(output_dir, OVERLAYS_DIR, name + ".jpg"),
        image,
        mask,
        palette,
        predictor.options.alpha,
      )
      written += 1
    if bar is not None:
      bar.update(i + 1)
  return {"written": written, "skipped": skipped, "shapes": len(predictor.shapes)}


def load_bundle(
  *,
  workdir: str | None,
  model_file: str | None,
  which: str = "best",
  model: str = "teacher",
  data_root: str | None = None,
) -> export_lib.ModelBundle:
  if bool(workdir) == bool(model_file):
    raise UserInputError(
      "give either --workdir=RUN (a training run) or --model_file=FILE.npz "
      "(from `python -m s4jax.export`), not both or neither."
    )
  if model_file:
    return export_lib.load(model_file)
  return export_lib.from_workdir(workdir, which=which, model=model, data_root=data_root)


def predict(
  *,
  input_pattern: str,
  output_dir: str,
  workdir: str | None = None,
  model_file: str | None = None,
  which: str = "best",
  model: str = "teacher",
  data_root: str | None = None,
  options: Options = Options(),
  progress: bool = True,
) -> dict:
  """The whole command: checks the arguments (cheap ones first), loads, segments."""
  check_output_dir(output_dir)
  inputs = find_inputs(input_pattern, output_dir)
  bundle = load_bundle(
    workdir=workdir, model_file=model_file, which=which, model=model, data_root=data_root
  )
  return predict_files(Predictor(bundle, options), inputs, output_dir, progress=progress)


def summary_lines(result: dict, output_dir: str) -> list[str]:
  lines = [
    f"wrote {result['written']} masks to {os.path.join(output_dir, MASKS_DIR)} and "
    f"overlays to {os.path.join(output_dir, OVERLAYS_DIR)} ({result['shapes']} "
    "compiled image sizes)"
  ]
  skipped = result["skipped"]
  if skipped:
    shown = "; ".join(f"{p}: {r}" for p, r in list(skipped.items())[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    lines.append(f"skipped {len(skipped)} unreadable file(s): {shown}{more}")
  return lines


# ---- command line -----------------------------------------------------------------------------


def _define_flags():
  # Defined only when run as a program (other modules imported beside it define --workdir).
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags
  return {
    "workdir": f.DEFINE_string("workdir", None, "A training run's directory."),
    "model_file": f.DEFINE_string(
      "model_file", None, "A model file from `python -m s4jax.export` instead."
    ),
    "input": f.DEFINE_string(
      "input", None, "A directory (searched recursively), an image or a glob."
    ),
    "output": f.DEFINE_string("output", None, "Directory for masks/ and overlays/."),
    "which": f.DEFINE_enum(
      "which", "best", ["best", "latest"], "The run's best or latest checkpoint (--workdir only)."
    ),
    "model": f.DEFINE_enum(
      "model", "teacher", ["teacher", "student"], "The EMA teacher or the student (--workdir only)."
    ),
    "window": f.DEFINE_integer(
      "window",
      None,
      "Sliding-window side in pixels; 0 = whole images always. Default: "
      "the run's eval mode, and windows for images larger than --max_side.",
    ),
    "stride": f.DEFINE_integer("stride", None, "Sliding-window stride (default 2/3 of it)."),
    "max_side": f.DEFINE_integer("max_side", 2048, "Longer sides above this use sliding windows."),
    "pad_multiple": f.DEFINE_integer(
      "pad_multiple",
      1,
      "Pad whole images to a multiple of this (fewer compiles, "
      "slightly different borders); 1 = each image at its own size.",
    ),
    "alpha": f.DEFINE_float("alpha", 0.5, "Overlay opacity of the mask colours."),
    "data_root": f.DEFINE_string(
      "data_root",
      None,
      "Where the run's dataset is on this machine, if not at the "
      "recorded config.data.root (--workdir only; read for the class names).",
    ),
  }


def _fail(message: str) -> None:
  print(f"s4jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def run():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  values = _define_flags()

  def main(argv):
    logs.set_up_console()
    if len(argv) > 1:
      _fail(f"unexpected arguments {argv[1:]}; use --flag=value.")
    if not values["input"].value:
      _fail("--input is required: a directory, an image file or a glob such as 'photos/**/*.jpg'.")
    if values["model_file"].value:
      for name in ("which", "model", "data_root"):
        if flags.FLAGS[name].present:
          _fail(
            f"--{name} chooses within a --workdir; a model file holds one network "
            "(pick it when exporting: python -m s4jax.export --which=... --model=...)."
          )
    options = Options(
      window=values["window"].value,
      stride=values["stride"].value,
      max_side=values["max_side"].value,
      pad_multiple=values["pad_multiple"].value,
      alpha=values["alpha"].value,
    )
    if not 0.0 <= options.alpha <= 1.0:
      _fail(f"--alpha={options.alpha}: give an opacity in [0, 1].")
    output = values["output"].value
    try:
      result = predict(
        input_pattern=values["input"].value,
        output_dir=output,
        workdir=values["workdir"].value,
        model_file=values["model_file"].value,
        which=values["which"].value,
        model=values["model"].value,
        data_root=values["data_root"].value,
        options=options,
      )
    except UserInputError as e:
      _fail(str(e))
    for line in summary_lines(result, output):
      print(line)

  app.run(main)


if __name__ == "__main__":
  run()
