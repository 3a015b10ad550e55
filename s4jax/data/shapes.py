"""An embedded, procedurally drawn segmentation dataset ("shapes").

Each example is an RGB image with one to four objects on a cluttered
background, and an index mask that labels every pixel with the class of the
object that is visible there (0 = background). The class of an object is its
*shape*; its colour and texture are drawn independently of the class, so a model
has to look at outlines rather than at colours. Backgrounds mix gradients,
stripes or checkers, smooth blotches, unlabelled distractor strokes and blobs,
and pixel noise; objects vary in scale, aspect and rotation and occlude each
other (later objects are drawn on top, and the mask follows the occlusion).

Examples are generated on the fly and are a pure function of
`(seed, split, index, style)`, so the dataset needs no files, and the train and
val splits are disjoint random streams.

`Style` sets how hard the task is (objects per image, object size, rotation,
background clutter, textured fills). Its defaults are the dataset every number
in README.md before the `data.shapes` config block was measured on; the default
style draws exactly the same images as before the knobs existed.
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np
from PIL import Image
from PIL import ImageDraw

CLASS_NAMES: tuple[str, ...] = (
  "background",
  "ellipse",
  "rectangle",
  "triangle",
  "star",
  "ring",
)
NUM_CLASSES = len(CLASS_NAMES)

# Fixed stream ids, so that a split's images never depend on which other splits
# exist.
_SPLIT_IDS = {"train": 0, "val": 1}

# Vertices used to approximate ellipse outlines; PIL has no rotated ellipse.
_ELLIPSE_VERTICES = 40


@dataclasses.dataclass(frozen=True)
class Style:
  """How hard the drawn task is. The defaults are the original dataset.

  Attributes:
    objects: (min, max) number of objects per image; later ones occlude earlier
      ones, so more objects also means more occlusion.
    radius: (min, max) object radius as a fraction of the image side. The
      default is small enough that four objects fit and large enough that a
      star's points stay visible at 96 px.
    max_rotation: objects are rotated by a uniform angle in
      [-max_rotation, max_rotation] degrees; 180 = any orientation, 0 = upright.
    clutter: background patterns, blotches and unlabelled distractor shapes;
      False leaves a plain two-colour gradient.
    textures: striped and speckled object fills; False paints every object in
      a shaded flat colour.
  """

  objects: tuple[int, int] = (1, 4)
  radius: tuple[float, float] = (0.09, 0.26)
  max_rotation: float = 180.0
  clutter: bool = True
  textures: bool = True

  def __post_init__(self):
    low, high = self.objects
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
      raise ValueError(
        f"Style.objects must be (min, max) integers with 1 <= min <= max, got {self.objects}."
      )
    low, high = self.radius
    if not 0.0 < low <= high <= 0.5:
      raise ValueError(
        f"Style.radius must be (min, max) fractions of the image side with "
        f"0 < min <= max <= 0.5, got {self.radius}."
      )
    if not 0.0 <= self.max_rotation <= 180.0:
      raise ValueError(f"Style.max_rotation must be in [0, 180] degrees, got {self.max_rotation}.")


class _IndexOutOfRangeError(IndexError, ValueError):
  """Out-of-range index.

  An IndexError so that legacy sequence iteration (`for x in source`) stops,
  and a ValueError because every argument error of this module is one.
  """


def _random_colour(rng: np.random.Generator) -> np.ndarray:
  """A saturated, fairly bright colour of any hue: the palette objects are painted from.

  Hue is uniform and independent of the class, so colour never identifies a shape; the
  saturation gap to the background only makes "is this an object" learnable in a few
  hundred CPU steps, leaving "which shape" as the hard part.
  """
  hue = rng.uniform(0.0, 6.0)
  saturation = rng.uniform(0.55, 1.0)
  value = rng.uniform(150.0, 255.0)
  # HSV -> RGB for one colour.
  sector, frac = int(hue) % 6, hue - int(hue)
  p = value * (1.0 - saturation)
  q = value * (1.0 - saturation * frac)
  t = value * (1.0 - saturation * (1.0 - frac))
  rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][
    sector
  ]
  return np.asarray(rgb, dtype=np.float64)


def _background_colour(rng: np.random.Generator) -> np.ndarray:
  """A greyish colour (grey level plus a weak tint): backgrounds and clutter."""
  return np.clip(rng.uniform(40.0, 200.0) + rng.uniform(-30.0, 30.0, size=3), 0.0, 255.0)


def _smooth_noise(rng: np.random.Generator, size: int, grid: int, channels: int) -> np.ndarray:
  """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
  coarse = rng.integers(0, 256, size=(grid, grid, channels), dtype=np.uint8)
  mode = "RGB" if channels == 3 else "L"
  if channels == 1:
    coarse = coarse[..., 0]
  upsampled = Image.fromarray(coarse, mode=mode).resize((size, size), Image.BILINEAR)
  out = np.asarray(upsampled, dtype=np.float32) / 255.0
  return out if channels == 3 else out[..., None]


def _linear_ramp(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """A ramp from 0 to 1 across the image along a random direction."""
  angle = rng.uniform(0.0, 2.0 * np.pi)
  ramp = np.cos(angle) * xs + np.sin(angle) * ys
  ramp = ramp - ramp.min()
  return ramp / max(float(ramp.max()), 1e-6)


def _periodic_pattern(
  rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int
) -> np.ndarray:
  """Stripes or a (rotated) checkerboard, as a {0, 1} float map."""
  angle = rng.uniform(0.0, np.pi)
  period = rng.uniform(0.06, 0.25) * size
  u = np.cos(angle) * xs + np.sin(angle) * ys
  stripes = np.floor(u / period) % 2
  if rng.random() < 0.5:
    return stripes
  v = -np.sin(angle) * xs + np.cos(angle) * ys
  return (stripes + np.floor(v / period)) % 2


def _draw_background(
  rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray, clutter: bool
) -> np.ndarray:
  """Float RGB background: gradient, and with clutter pattern, blotches, distractors."""
  colour_a = _background_colour(rng)
  colour_b = _background_colour(rng)
  ramp = _linear_ramp(rng, ys, xs)[..., None]
  image = colour_a * (1.0 - ramp) + colour_b * ramp
  if not clutter:
    return image.astype(np.float32)

  if rng.random() < 0.6:
    # Low-contrast pattern: visible clutter that should not look like objects.
    pattern = _periodic_pattern(rng, ys, xs, size)[..., None]
    strength = rng.uniform(0.1, 0.45)
    image = image + strength * (_background_colour(rng) - image) * pattern

  if rng.random() < 0.7:
    blotches = _smooth_noise(rng, size, grid=int(rng.integers(3, 7)), channels=3)
    image = image + rng.uniform(20.0, 60.0) * (blotches - 0.5)

  image = np.clip(image, 0.0, 255.0).astype(np.uint8)
  return _draw_distractors(rng, image, size).astype(np.float32)


def _draw_distractors(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
  """Unlabelled strokes and irregular blobs on the background."""
  canvas = Image.fromarray(image)
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(0, 4))):
    points = rng.uniform(0.0, size, size=(int(rng.integers(2, 5)), 2))
    draw.line(
      [tuple(p) for p in points],
      fill=tuple(int(c) for c in _background_colour(rng)),
      width=int(rng.integers(1, 3)),
    )
  for _ in range(int(rng.integers(0, 3))):
    # A jagged polygon with random radii per vertex does not resemble any of
    # the five classes, so it teaches the model to ignore colour blobs.
    num_vertices = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, size=num_vertices))
    radii = rng.uniform(0.03, 0.12, size=num_vertices) * size
    centre = rng.uniform(0.0, size, size=2)
    points = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # Mostly background-like clutter; one blob in four is as vivid as an object.
    colour = _random_colour(rng) if rng.random() < 0.25 else _background_colour(rng)
    draw.polygon([tuple(p) for p in points], fill=tuple(int(c) for c in colour))
  return np.asarray(canvas)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
  cos, sin = np.cos(angle), np.sin(angle)
  return points @ np.array([[cos, sin], [-sin, cos]])


def _ellipse_outline(radius_x: float, radius_y: float) -> np.ndarray:
  t = np.linspace(0.0, 2.0 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
  return np.stack([radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)


def _shape_outlines(
  class_name: str, radius: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
  """Outer outline (and hole outline, for rings) centred at the origin."""
  hole = None
  if class_name == "ellipse":
    outline = _ellipse_outline(radius, radius * rng.uniform(0.55, 1.0))
  elif class_name == "rectangle":
    half_w, half_h = radius * 0.85, radius * 0.85 * rng.uniform(0.45, 1.0)
    outline = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
  elif class_name == "triangle":
    # Jittered vertex angles give non-equilateral triangles.
    angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3.0
    angles = angles + rng.uniform(-0.35, 0.35, size=3)
    radii = radius * rng.uniform(0.85, 1.1, size=3)
    outline = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
  elif class_name == "star":
    num_points = int(rng.integers(5, 7))
    angles = np.arange(2 * num_points) * np.pi / num_points
    radii = np.where(
      np.arange(2 * num_points) % 2 == 0,
      radius * 1.1,
      radius * 1.1 * rng.uniform(0.38, 0.55),
    )
    outline = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
  elif class_name == "ring":
    aspect = rng.uniform(0.7, 1.0)
    outline = _ellipse_outline(radius, radius * aspect)
    hole_ratio = rng.uniform(0.4, 0.65)
    hole = _ellipse_outline(radius * hole_ratio, radius * aspect * hole_ratio)
  else:
    raise ValueError(f"Unknown class_name {class_name!r}.")
  return outline, hole


def _rasterise(outline: np.ndarray, hole: np.ndarray | None, size: int) -> np.ndarray:
  """Boolean HxW mask of a polygon (minus an optional hole)."""
  canvas = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  draw.polygon([tuple(p) for p in outline], fill=1)
  if hole is not None:
    draw.polygon([tuple(p) for p in hole], fill=0)
  return np.asarray(canvas, dtype=bool)


def _object_appearance(
  rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int, textures: bool
) -> np.ndarray:
  """Float RGB fill for one object: shaded flat colour, or (textures) stripes or speckles."""
  colour = _random_colour(rng)
  shading = _linear_ramp(rng, ys, xs)[..., None] - 0.5
  fill = colour + rng.uniform(0.0, 70.0) * shading
  if not textures:
    return fill
  style = rng.random()
  if style < 0.25:
    pattern = _periodic_pattern(rng, ys, xs, size)[..., None]
    fill = fill + rng.uniform(0.3, 0.7) * (_random_colour(rng) - fill) * pattern
  elif style < 0.45:
    speckle = _smooth_noise(rng, size, grid=int(rng.integers(6, 16)), channels=1)
    fill = fill + rng.uniform(30.0, 90.0) * (speckle - 0.5)
  return fill


def draw_example(
  rng: np.random.Generator, image_size: int, style: Style = Style()
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one (image uint8[H, W, 3], mask uint8[H, W]) pair from `rng`."""
  ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
  image = _draw_background(rng, image_size, ys, xs, style.clutter)
  mask = np.zeros((image_size, image_size), dtype=np.uint8)

  num_objects = int(rng.integers(style.objects[0], style.objects[1] + 1))
  for _ in range(num_objects):
    class_id = int(rng.integers(1, NUM_CLASSES))
    radius = rng.uniform(*style.radius) * image_size
    outline, hole = _shape_outlines(CLASS_NAMES[class_id], radius, rng)
    # One uniform draw in [0, 2 pi) whatever the style, mapped linearly onto
    # [-max_rotation, max_rotation]: the default keeps the original angles.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    if style.max_rotation < 180.0:
      angle = (angle - np.pi) * (style.max_rotation / 180.0)
    # Centres may sit partly outside the frame: truncated objects are common in
    # real data, but keep most of the object inside.
    centre = rng.uniform(0.15 * image_size, 0.85 * image_size, size=2)
    outline = _rotate(outline, angle) + centre
    if hole is not None:
      hole = _rotate(hole, angle) + centre
    region = _rasterise(outline, hole, image_size)
    fill = _object_appearance(rng, ys, xs, image_size, style.textures)
    image[region] = fill[region]
    mask[region] = class_id

  # Sensor-like noise over everything, objects included.
  image = image + rng.normal(0.0, rng.uniform(2.0, 14.0), size=image.shape)
  return np.clip(image, 0.0, 255.0).astype(np.uint8), mask


class ShapesSource:
  """Random-access data source of shapes examples (a grain data source).

  Example `i` of a split is generated from
  `np.random.default_rng([seed, split_id, i])`, so it is identical wherever and
  whenever it is read (any worker process, any host, after a restart).
  """

  def __init__(
    self,
    split: str,
    num_examples: int,
    image_size: int = 96,
    seed: int = 0,
    style: Style = Style(),
  ):
    if split not in _SPLIT_IDS:
      raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}.")
    if int(num_examples) <= 0:
      raise ValueError(f"num_examples must be positive, got {num_examples}.")
    if int(image_size) <= 0:
      raise ValueError(f"image_size must be positive, got {image_size}.")
    if int(seed) < 0:
      raise ValueError(f"seed must be non-negative, got {seed}.")
    self._split = split
    self._num_examples = int(num_examples)
    self._image_size = int(image_size)
    self._seed = int(seed)
    self._style = style

  @property
  def split(self) -> str:
    return self._split

  @property
  def image_size(self) -> int:
    return self._image_size

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def style(self) -> Style:
    return self._style

  def __len__(self) -> int:
    return self._num_examples

  def image_hw(self, index: int) -> tuple[int, int]:
    """(height, width) of an example without drawing it (used for batching)."""
    self._check_index(index)
    return self._image_size, self._image_size

  def _check_index(self, index) -> int:
    index = operator.index(index)
    if not 0 <= index < self._num_examples:
      raise _IndexOutOfRangeError(f"index must be in [0, {self._num_examples}), got {index}.")
    return index

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._check_index(index)
    rng = np.random.default_rng([self._seed, _SPLIT_IDS[self._split], index])
    image, mask = draw_example(rng, self._image_size, self._style)
    return {"image": image, "mask": mask}

  def __repr__(self) -> str:
    return (
      f"ShapesSource(split={self._split!r}, num_examples={self._num_examples},"
      f" image_size={self._image_size}, seed={self._seed}, style={self._style})"
    )
