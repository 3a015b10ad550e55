"""The auxiliary-objective plug-in interface.

See docs/architecture.md, "Auxiliary objectives (the plug-in)".

The base method (`config.method`: supervised, FixMatch, UniMatch, UniMatch V2; see
`step.py`) owns the student's forward passes, because their BatchNorm grouping is part of
the method. It records what it computed in a `StepContext`. Every auxiliary objective is an
`Objective`: it declares the model heads it needs, reads the context (and may run extra
student forwards through it) and returns `(weighted loss, metrics, new aux state)`. It is
registered by name in `losses/registry.py` and switched on by its config block
`config.losses.<name>.enabled`. Adding one touches its own file, one line of the registry,
its config block and its tests; nothing in the loop or the step.

Extra forwards of objectives (`StepContext.student_apply`) run the student with BatchNorm in
inference mode (running statistics, no update) unless they ask for the statistics of their
own batch (`batch_statistics=True`, e.g. `losses.cwmim.batch_norm="batch"`), our choice:
(1) inputs such as class-wise masked images (docs/methods.md §2) would otherwise couple
through batch statistics, so one class's pixels would change another class's loss; (2) the
running statistics used at evaluation stay those of natural images; (3) objectives need not
thread BatchNorm state through each other. Gradients still reach every parameter the forward
touches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from s4jax.losses import supervised
from s4jax.methods import base
from s4jax.models import heads as heads_lib


# A strong view as the base method saw it (defined with the methods, re-exported here for
# objectives).
StrongView = base.StrongView
Targets = base.Targets
Features = base.Features


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What an objective may read inside the differentiated loss of one train step.

  Unlabelled fields are None for `config.method = "supervised"`.
  """

  config: ml_collections.ConfigDict
  model: Any  # the Segmenter (unbound)
  params: Any  # student parameters being differentiated
  batch_stats: Any  # student BatchNorm statistics at the start of the step
  rng: jax.Array  # a key for this objective alone
  step: jax.Array
  num_classes: int
  background_classes: tuple[int, ...]
  labelled_image: jax.Array  # normalised [n_l, H, W, 3]
  labelled_mask: jax.Array  # uint8 [n_l, H, W], 255 = ignore / padding
  labelled_features: jax.Array  # fused stride-4 decoder features of labelled_image
  weak_image: jax.Array | None = None  # normalised unlabelled weak view [n_u, H, W, 3]
  weak_valid: jax.Array | None = None  # float32 [n_u, H, W]
  pseudo: jax.Array | None = None  # training labels of the weak view, int32
  confidence: jax.Array | None = None  # their confidence
  strong_views: tuple[StrongView, ...] = ()
  # Named features of every pass group of the base method: "labelled", "weak" (methods
  # with a train-mode weak pass), "strong1", "strong2" -> Features(low, high, fused).
  features: dict = dataclasses.field(default_factory=dict)
  targets: Targets | None = None  # the weak view's targets (with logits, weight)
  teacher_variables: Any = None  # EMA teacher {"params", "batch_stats"}
  feature_widths: dict = dataclasses.field(default_factory=dict)  # low/high/fused channels
  # Heads applied in train mode record their new BatchNorm statistics here (the step merges
  # them into the student's); a plain dict, filled while the loss is traced.
  head_batch_stats: dict = dataclasses.field(default_factory=dict)

  @property
  def has_unlabelled(self) -> bool:
    return self.weak_image is not None

  @property
  def threshold(self) -> float:
    return float(self.config.semi.threshold)

  def labelled_valid(self) -> jax.Array:
    return (self.labelled_mask != supervised.IGNORE_INDEX).astype(jax.numpy.float32)

  def student_apply(self, images, *, method=None, batch_statistics=False, rng=None, **kwargs):
    """A student forward. BatchNorm runs on running statistics (see the module docstring),
    or with `batch_statistics=True` on the statistics of `images` themselves, as a train-mode
    pass does, without recording them (the running statistics stay those of the base
    passes). `rng`: the dropout key of such a pass (needed with `model.aspp_dropout > 0`)."""
    variables = {"params": self.params, "batch_stats": self.batch_stats}
    if not batch_statistics:
      return self.model.apply(variables, images, train=False, method=method, **kwargs)
    out, _ = self.model.apply(
      variables,
      images,
      train=True,
      method=method,
      mutable=["batch_stats"],
      rngs={} if rng is None else {"dropout": rng},
      **kwargs,
    )
    return out

  def teacher_apply(self, images, *, method=None, **kwargs):
    """A forward of the teacher, without gradient: the EMA teacher with `teacher.source =
    "ema"`, the current student (stop-gradient) with "student"; inference mode."""
    variables = self.teacher_variables
    if self.config.teacher.source != "ema" or variables is None:
      variables = {"params": self.params, "batch_stats": self.batch_stats}
    variables = jax.lax.stop_gradient(variables)
    out = self.model.apply(variables, images, train=False, method=method, **kwargs)
    return jax.lax.stop_gradient(out)

  def head(
    self,
    name: str,
    features,
    *,
    train: bool = False,
    teacher: bool = False,
    rng: jax.Array | None = None,
  ):
    """Auxiliary head `name` (declared by the objective) on `features`. `train=True` uses
    batch statistics for its BatchNorm (if any) and records the updated running statistics;
    `teacher=True` runs the teacher's copy of the head, without gradient. `rng` is the
    "dropout" key of a head with dropout applied with `train=True`."""
    rngs = {} if rng is None else {"dropout": rng}
    size = self.labelled_image.shape[1:3]
    if teacher:
      params = jax.lax.stop_gradient((self.teacher_variables or {"params": self.params})["params"])
      stats = jax.lax.stop_gradient(
        (self.teacher_variables or {"batch_stats": self.batch_stats})["batch_stats"]
      )
      return jax.lax.stop_gradient(
        self.model.apply(
          {"params": params, "batch_stats": stats}, name, features, size, method="head"
        )
      )
    variables = {"params": self.params, "batch_stats": self.batch_stats}
    if not train:
      return self.model.apply(variables, name, features, size, method="head", rngs=rngs)
    out, mutated = self.model.apply(
      variables, name, features, size, True, method="head", mutable=["batch_stats"], rngs=rngs
    )
    # `mutated` holds the whole batch_stats collection: the network's entries as they were
    # before this step's passes. Keep the head's own; merging the rest would undo the base
    # passes' running-statistics update of the backbone and decoder.
    own = heads_lib.module_name(name)
    if own in mutated.get("batch_stats", {}):
      self.head_batch_stats[own] = mutated["batch_stats"][own]
    return out

  def reconstruct(self, features, head: str) -> jax.Array:
    """RGB head `head` on stride-4 features -> RGB at the crop size."""
    return self.head(head, features)


LossFn = Callable[[StepContext, ml_collections.ConfigDict, Any], tuple[jax.Array, dict, Any]]


@dataclasses.dataclass(frozen=True)
class TargetContext:
  """What a target hook may read: the weak view and its current targets (before the base
  losses), the teacher, the objective's aux state, its own key."""

  config: ml_collections.ConfigDict
  model: Any
  params: Any  # student parameters (a hook's outputs carry no gradient)
  batch_stats: Any
  teacher_variables: Any
  weak_image: jax.Array
  weak_valid: jax.Array
  targets: Targets
  rng: jax.Array
  step: jax.Array
  num_classes: int
  # The unlabelled images' hidden masks (uint8, 255 = none) where the dataset has them
  # (shapes): for diagnostics only, never a training target.
  hidden_mask: jax.Array | None = None

  def teacher_apply(self, images, *, method=None, **kwargs):
    ctx = StepContext(
      config=self.config,
      model=self.model,
      params=self.params,
      batch_stats=self.batch_stats,
      rng=self.rng,
      step=self.step,
      num_classes=self.num_classes,
      background_classes=(),
      labelled_image=self.weak_image,
      labelled_mask=None,
      labelled_features=None,
      teacher_variables=self.teacher_variables,
    )
    return ctx.teacher_apply(images, method=method, **kwargs)


def _no_aux(cfg, num_classes, feature_widths):
  del cfg, num_classes, feature_widths
  return {}


def _no_check(config):
  del config


@dataclasses.dataclass(frozen=True)
class Objective:
  """An auxiliary objective. `cfg` below is its own block, `config.losses.<name>`.

  Attributes:
    name: registry name and config block name.
    heads: cfg -> the `heads.HeadSpec`s of the auxiliary model heads it needs.
    loss: (context, cfg, aux state) -> (weighted loss, metrics, new aux state). Metric
      names are relative ("loss_rec"); the step prefixes "train/<name>/".
    validate: full config -> None; raises ConfigError naming the key at fault.
    init_aux: (cfg, num_classes, feature_widths {"low", "high", "fused": channels}) ->
      initial aux state (non-trainable, kept in the state and checkpointed).
    targets: optional target hook (TargetContext, cfg, aux) -> (Targets, metrics): runs
      before the base losses and may replace the weak view's pseudo-labels, confidences and
      per-pixel weights (AuxSegNet's refined pseudo-labels, CSS's representation-space
      labels); hooks compose in registry order. Metrics are logged as
      "train/<name>/<metric>".
    refine_eval: optional (model, variables, images normalised, logits [n, H, W, K], cfg) ->
      logits: the prediction evaluation scores (AuxSegNet's refined segmentation).
    visualise: optional (model, variables, images normalised [n, H, W, 3], masks uint8
      [n, H, W], rng, cfg) -> {name: float images [n, R, H, W, 3] in normalised space};
      the loop shows them as rows of R panels beside the prediction grids. `variables`
      (the student's) also holds "aux": every objective's aux state by name.
    replaces_base: optional cfg -> bool; True makes the enabled objectives' losses the
      whole training loss (a tuning stage, e.g. Mix-and-Match's): the base method still
      runs its passes (objectives read their features) and its losses are logged, but its
      total is not trained on.
  """

  name: str
  heads: Callable[[ml_collections.ConfigDict], tuple]
  loss: LossFn
  validate: Callable[[ml_collections.ConfigDict], None] = _no_check
  init_aux: Callable[[ml_collections.ConfigDict, int, dict], Any] = _no_aux
  targets: Callable[..., tuple] | None = None
  refine_eval: Callable[..., jax.Array] | None = None
  visualise: Callable[..., dict] | None = None
  replaces_base: Callable[[ml_collections.ConfigDict], bool] | None = None
