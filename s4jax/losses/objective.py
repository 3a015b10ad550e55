"""The auxiliary-objective plug-in interface (ARCHITECTURE.md, "The objective plug-in").

The base method (`config.method`: supervised, FixMatch, UniMatch, UniMatch V2; see
`step.py`) owns the student's forward passes, because their BatchNorm grouping is part of
the method. It records what it computed in a `StepContext`. Every auxiliary objective is an
`Objective`: it declares the model heads it needs, reads the context (and may run extra
student forwards through it) and returns `(weighted loss, metrics, new aux state)`. It is
registered by name in `losses/registry.py` and switched on by its config block
`config.losses.<name>.enabled`. Adding one touches its own file, one line of the registry,
its config block and its tests; nothing in the loop or the step.

Extra forwards of objectives (`StepContext.student_apply`) run the student with BatchNorm in
inference mode (running statistics, no update), our choice: (1) inputs such as class-wise
masked images (METHODS.md §2) would otherwise couple through batch statistics, so one
class's pixels would change another class's loss; (2) the running statistics used at
evaluation stay those of natural images; (3) objectives need not thread BatchNorm state
through each other. Gradients still reach every parameter the forward touches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections

from s4jax.losses import supervised


@flax.struct.dataclass
class StrongView:
  """One strong view of the unlabelled batch as the base method saw it (a pytree)."""

  image: jax.Array       # normalised student input [n, H, W, 3]
  clean: jax.Array       # the clean weak image under the same CutMix, normalised
  pseudo: jax.Array      # teacher labels int32 [n, H, W], CutMixed with the view
  confidence: jax.Array  # teacher confidence float32 [n, H, W]
  valid: jax.Array       # float32 [n, H, W]: 0 where the crop was padded
  features: jax.Array | None  # student's fused stride-4 decoder features of `image`


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What an objective may read inside the differentiated loss of one train step.

  Unlabelled fields are None for `config.method = "supervised"`.
  """

  config: ml_collections.ConfigDict
  model: Any                     # the Segmenter (unbound)
  params: Any                    # student parameters being differentiated
  batch_stats: Any               # student BatchNorm statistics at the start of the step
  rng: jax.Array                 # a key for this objective alone
  step: jax.Array
  num_classes: int
  background_classes: tuple[int, ...]
  labelled_image: jax.Array      # normalised [n_l, H, W, 3]
  labelled_mask: jax.Array       # uint8 [n_l, H, W], 255 = ignore / padding
  labelled_features: jax.Array   # fused stride-4 decoder features of labelled_image
  weak_image: jax.Array | None = None    # normalised unlabelled weak view [n_u, H, W, 3]
  weak_valid: jax.Array | None = None    # float32 [n_u, H, W]
  pseudo: jax.Array | None = None        # teacher labels of the weak view, int32
  confidence: jax.Array | None = None    # teacher confidence of the weak view
  strong_views: tuple[StrongView, ...] = ()

  @property
  def has_unlabelled(self) -> bool:
    return self.weak_image is not None

  @property
  def threshold(self) -> float:
    return float(self.config.semi.threshold)

  def labelled_valid(self) -> jax.Array:
    return (self.labelled_mask != supervised.IGNORE_INDEX).astype(jax.numpy.float32)

  def student_apply(self, images, *, method=None, **kwargs):
    """A student forward with BatchNorm on running statistics (see the module docstring)."""
    return self.model.apply({"params": self.params, "batch_stats": self.batch_stats}, images,
                            train=False, method=method, **kwargs)

  def reconstruct(self, features, head: str) -> jax.Array:
    """Auxiliary reconstruction head `head` on stride-4 features -> RGB at the crop size."""
    size = self.labelled_image.shape[1:3]
    return self.model.apply({"params": self.params}, features, size, head,
                            method="reconstruct")


LossFn = Callable[[StepContext, ml_collections.ConfigDict, Any],
                  tuple[jax.Array, dict, Any]]


def _no_aux(cfg, num_classes):
  del cfg, num_classes
  return {}


def _no_check(config):
  del config


@dataclasses.dataclass(frozen=True)
class Objective:
  """An auxiliary objective. `cfg` below is its own block, `config.losses.<name>`.

  Attributes:
    name: registry name and config block name.
    heads: cfg -> names of the auxiliary model heads it needs (`segmenter.HEAD_TYPES`).
    loss: (context, cfg, aux state) -> (weighted loss, metrics, new aux state). Metric
      names are relative ("loss_rec"); the step prefixes "train/<name>/".
    validate: full config -> None; raises ConfigError naming the key at fault.
    init_aux: (cfg, num_classes) -> initial aux state (non-trainable, kept in the state).
    visualise: optional (model, variables, images normalised [n, H, W, 3], masks uint8
      [n, H, W], rng, cfg) -> {name: float images [n, R, H, W, 3] in normalised space};
      the loop shows them as rows of R panels beside the prediction grids.
  """

  name: str
  heads: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
  loss: LossFn
  validate: Callable[[ml_collections.ConfigDict], None] = _no_check
  init_aux: Callable[[ml_collections.ConfigDict, int], Any] = _no_aux
  visualise: Callable[..., dict] | None = None
