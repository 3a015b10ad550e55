"""Fidelity to the reference recipes (UniMatch's unimatch.py / fixmatch.py / evaluation):
per-pass dropout keys, the global CutMix partner, FixMatch's BatchNorm grouping, pseudo-labels
from the student's own train-mode pass, and exact whole-image evaluation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4jax import augment
from s4jax import config_schema
from s4jax import errors
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import methods
from s4jax import step as step_lib
from s4jax.methods import base as method_base
from s4jax import optim
from s4jax.data import pipeline
from s4jax.losses import consistency
from s4jax.losses import supervised as supervised_losses
from s4jax.models import segmenter
from tiny import tiny_config

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def tiny_model_and_variables():
  config = tiny_config()
  model = segmenter.build_segmenter(config.model, NUM_CLASSES)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  return config, model, variables


def test_two_passes_of_a_step_draw_independent_dropout_masks():
  config = tiny_config(**{"model.aspp_dropout": 0.5})
  model = segmenter.build_segmenter(config.model, NUM_CLASSES)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  passes = method_base.StudentPasses(
    model, variables["params"], variables["batch_stats"], jax.random.key(2)
  )
  first = passes(images)["logits"]
  passes.batch_stats = variables["batch_stats"]  # same statistics: only dropout differs
  second = passes(images)["logits"]
  assert not np.allclose(first, second)
  # Without dropout the same two passes agree: the difference above is the masks.
  plain = segmenter.build_segmenter(tiny_config().model, NUM_CLASSES)
  passes = method_base.StudentPasses(
    plain, variables["params"], variables["batch_stats"], jax.random.key(2)
  )
  a = passes(images)["logits"]
  passes.batch_stats = variables["batch_stats"]
  np.testing.assert_allclose(a, passes(images)["logits"], rtol=1e-6)


def _strong_views_on(devices, config, images, valid, pseudo, conf):
  mesh = sharding.make_mesh(devices)
  put = lambda x: jax.device_put(x, sharding.batch_sharded(mesh))  # noqa: E731

  @jax.jit
  def fn(key, images, valid, pseudo, conf):
    view = method_base.strong_views(key, images, valid, config)
    return method_base.with_targets(
      view,
      method_base.Targets(pseudo=pseudo, confidence=conf, weight=jnp.ones_like(conf), logits=None),
    )

  return jax.device_get(fn(jax.random.key(0), put(images), put(valid), put(pseudo), put(conf)))


def test_cutmix_partner_is_global_with_one_unlabelled_image_per_device():
  config = tiny_config(
    **{
      "augment.jitter_p": 0.0,
      "augment.grayscale_p": 0.0,
      "augment.blur_p": 0.0,
      "augment.cutmix_p": 1.0,
    }
  )
  n, h, w = 8, 16, 16  # one image per device on 8 devices
  rng = np.random.default_rng(1)
  images = rng.random((n, h, w, 3)).astype(np.float32)
  pseudo = rng.integers(0, 5, (n, h, w)).astype(np.int32)
  conf = rng.random((n, h, w)).astype(np.float32)
  valid = (rng.random((n, h, w)) > 0.2).astype(np.float32)
  eight = _strong_views_on(jax.devices(), config, images, valid, pseudo, conf)
  one = _strong_views_on(jax.devices()[:1], config, images, valid, pseudo, conf)
  for field in ("image", "clean", "pseudo", "confidence", "valid", "box"):
    np.testing.assert_array_equal(getattr(one, field), getattr(eight, field), err_msg=field)
  partner = augment.cutmix_partners(n)
  unit_view = np.asarray(augment.denormalize_to_uint8(eight.image)).astype(np.float32) / 255
  for i in range(n):
    box = eight.box[i]
    assert box.any(), "cutmix_p=1 pastes a box into every view"
    # Inside the box everything comes from the partner, never from the image itself.
    assert partner[i] != i
    np.testing.assert_allclose(unit_view[i][box], images[partner[i]][box], atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(eight.pseudo[i][box], pseudo[partner[i]][box])
    np.testing.assert_array_equal(eight.confidence[i][box], conf[partner[i]][box])
    np.testing.assert_array_equal(eight.valid[i][box], valid[partner[i]][box])
    np.testing.assert_array_equal(eight.pseudo[i][~box], pseudo[i][~box])
    # The pixels and labels really changed (distinct random images).
    assert np.abs(unit_view[i][box] - images[i][box]).max() > 0.05
    assert (eight.pseudo[i][box] != pseudo[i][box]).any()


class _RecordingPasses:
  """A stand-in for the student's passes that records each pass's batch and returns
  deterministic logits/features derived from the images."""

  def __init__(self, num_classes):
    self.batches, self.outputs, self.k = [], [], num_classes

  def __call__(self, images, fn=None):
    del fn
    self.batches.append(images)
    weights = jnp.linspace(-2.0, 2.0, 3 * self.k).reshape(3, self.k)
    logits = jnp.einsum("nhwc,ck->nhwk", images, weights)
    out = {"logits": logits, "features": images, "low": images, "high": images}
    self.outputs.append(out)
    return out


def _unlabelled(config, x_w, source):
  n, h, w = x_w.shape[:3]
  views = (
    method_base.strong_views(jax.random.key(3), jnp.clip(x_w, 0, 1), jnp.ones((n, h, w)), config),
  )
  teacher = None
  if source == "ema":  # a teacher whose labels are all class 2
    teacher = jnp.zeros((n, h, w, NUM_CLASSES)).at[..., 2].set(5.0)
  return method_base.Unlabelled(
    weak=x_w, valid=jnp.ones((n, h, w)), views=views, teacher_logits=teacher
  )


@pytest.mark.parametrize("source", ["ema", "student"])
def test_fixmatch_passes_are_labelled_with_weak_then_the_strong_view(source):
  config = tiny_config(method="fixmatch", **{"teacher.source": source})
  rng = np.random.default_rng(0)
  x_l = jnp.asarray(rng.random((2, 8, 8, 3)), jnp.float32)
  y_l = jnp.asarray(rng.integers(0, NUM_CLASSES, (2, 8, 8)), jnp.uint8)
  x_w = jnp.asarray(rng.random((3, 8, 8, 3)), jnp.float32)
  u = _unlabelled(config, x_w, source)
  passes = _RecordingPasses(NUM_CLASSES)
  result = methods.get("fixmatch").run(passes, x_l, y_l, u, {}, config)
  # BatchNorm grouping of the reference: [labelled; weak] in one pass, the strong view alone.
  assert [b.shape[0] for b in passes.batches] == [5, 3]
  np.testing.assert_array_equal(passes.batches[0], jnp.concatenate([x_l, x_w]))
  if source == "student":
    # Pseudo-labels are the clean weak half of pass 1 (train mode), stop-gradient.
    expected = consistency.pseudo_labels(passes.outputs[0]["logits"][2:])
    np.testing.assert_array_equal(result.targets.pseudo, expected[0])
    np.testing.assert_allclose(result.targets.confidence, expected[1])
  else:
    np.testing.assert_array_equal(result.targets.pseudo, np.full((3, 8, 8), 2))


def _count_model_calls(config):
  """Forwards (`model.apply` calls) that one traced train step makes."""
  model = segmenter.build_segmenter(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state = jax.eval_shape(
    functools.partial(state_lib.init_state, model, tx, image_shape=(1, 32, 32, 3)),
    jax.random.key(0),
  )
  calls = []

  class Counting:
    num_classes = model.num_classes

    def apply(self, *args, **kwargs):
      calls.append(kwargs.get("train"))
      return model.apply(*args, **kwargs)

    def clone(self, **kwargs):  # segmenter.feature_widths: shapes only, not a forward
      return model.clone(**kwargs)

  batch = {
    "image": jnp.zeros((2, 32, 32, 3), jnp.uint8),
    "mask": jnp.zeros((2, 32, 32), jnp.uint8),
    "u_image": jnp.zeros((2, 32, 32, 3), jnp.uint8),
    "u_valid": jnp.ones((2, 32, 32)),
  }
  jax.eval_shape(
    functools.partial(step_lib.train_step, model=Counting(), tx=tx, config=config, mesh=None),
    state,
    batch,
  )
  return calls


@pytest.mark.parametrize("method", ["fixmatch", "unimatch"])
def test_student_pseudo_labels_skip_the_teacher_forward(method):
  ema = _count_model_calls(tiny_config(method=method, **{"teacher.source": "ema"}))
  student = _count_model_calls(tiny_config(method=method, **{"teacher.source": "student"}))
  # "ema": an inference-mode teacher forward plus the student's two train-mode passes.
  assert ema == [False, True, True]
  # "student": only the two passes; the labels come from pass 1's weak half.
  assert student == [True, True]


class _SizedSource:
  """Validation images of mixed sizes that are not multiples of the network's stride."""

  def __init__(self, sizes, seed=0):
    rng = np.random.default_rng(seed)
    self.examples = [
      {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "mask": rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8),
      }
      for h, w in sizes
    ]

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, index):
    return self.examples[index]

  def __repr__(self):
    return f"_SizedSource({len(self)})"


def test_whole_image_evaluation_equals_each_image_alone_at_its_own_size(tiny_model_and_variables):
  config, model, variables = tiny_model_and_variables
  sizes = [(37, 45), (40, 40), (37, 45), (29, 51), (40, 40), (37, 45)]
  source = _SizedSource(sizes)
  mesh8 = sharding.make_mesh()
  eval8 = step_lib.make_eval_step(model, config, NUM_CLASSES, mesh8)
  total = 0
  for local in pipeline.make_eval_batches(source, global_batch_size=8):
    batch = sharding.host_to_global(local, mesh8)
    total = total + np.asarray(eval8(variables, batch["image"], batch["mask"]))
  # The reference protocol: every image alone, batch of one, at its own size.
  mesh1 = sharding.make_mesh(jax.devices()[:1])
  eval1 = step_lib.make_eval_step(model, config, NUM_CLASSES, mesh1)
  alone = 0
  for example in source.examples:
    alone = alone + np.asarray(eval1(variables, example["image"][None], example["mask"][None]))
  np.testing.assert_array_equal(total, alone)
  assert total.sum() == sum(h * w for h, w in sizes)


def test_unimatch_v2_complementary_dropout():
  a = jnp.ones((8, 2, 2, 16))
  b = 3.0 * jnp.ones((8, 2, 2, 16))
  out_a, out_b = method_base.complementary_dropout(jax.random.key(0), a, b)
  out_a, out_b = np.asarray(out_a), np.asarray(out_b) / 3.0
  kept = np.all(out_a == 1.0, axis=(1, 2, 3)) & np.all(out_b == 1.0, axis=(1, 2, 3))
  assert kept.sum() == 4  # a random half of the pairs keep both views unchanged
  for i in np.nonzero(~kept)[0]:
    m = out_a[i, 0, 0]
    assert set(np.unique(m)) <= {0.0, 2.0}
    np.testing.assert_array_equal(out_b[i], 2.0 - out_a[i])  # the complementary mask
    assert 0 < (m == 0).sum() < 16  # channels split between the two views


@pytest.mark.parametrize(
  "fp_batch_norm, fp_on_labelled", [("joint", True), ("separate", True), ("separate", False)]
)
def test_unimatch_fp_batch_norm_groups_the_perturbed_copies(
  tiny_model_and_variables, fp_batch_norm, fp_on_labelled
):
  """`semi.fp_batch_norm`: "joint" (the reference) decodes clean and perturbed rows in one
  BatchNorm batch; "separate" decodes the clean pass alone and the perturbed copies on their
  own statistics, without recording them. Checked against the passes written out by hand."""
  config = tiny_config(
    method="unimatch",
    **{
      "teacher.source": "student",
      "semi.threshold": 0.0,
      "semi.fp_batch_norm": fp_batch_norm,
      "semi.fp_on_labelled": fp_on_labelled,
    },
  )
  _, model, variables = tiny_model_and_variables
  rng = np.random.default_rng(1)
  x_l = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  y_l = jnp.asarray(rng.integers(0, NUM_CLASSES, (2, 32, 32)), jnp.uint8)
  x_w = jnp.asarray(rng.random((3, 32, 32, 3)), jnp.float32)
  valid = jnp.ones((3, 32, 32))
  u = method_base.Unlabelled(
    weak=x_w,
    valid=valid,
    views=tuple(
      method_base.strong_views(k, x_w, valid, config) for k in jax.random.split(jax.random.key(3))
    ),
    teacher_logits=None,
  )
  fp_key = jax.random.key(7)
  passes = method_base.StudentPasses(
    model, variables["params"], variables["batch_stats"], jax.random.key(1)
  )
  result = methods.get("unimatch").run(passes, x_l, y_l, u, {"fp": fp_key}, config)

  def train_apply(stats, *args, **kwargs):
    out, mutated = model.apply(
      {"params": variables["params"], "batch_stats": stats},
      *args,
      train=True,
      mutable=["batch_stats"],
      **kwargs,
    )
    return out, mutated["batch_stats"]

  clean, stats = train_apply(variables["batch_stats"], jnp.concatenate([x_l, x_w]))
  fp_from = 0 if fp_on_labelled else 2
  k_low, k_high = jax.random.split(fp_key)
  low_fp = method_base.channel_dropout(k_low, clean["low"][fp_from:], 0.5)
  high_fp = method_base.channel_dropout(k_high, clean["high"][fp_from:], 0.5)
  fp, _ = train_apply(stats, low_fp, high_fp, method=model.decode)
  fp_logits = segmenter.upsample_logits(fp["logits"], (32, 32))[2 - fp_from :]
  views = jnp.concatenate([v.image for v in result.views])
  _, stats = train_apply(stats, views)

  separate_sup = supervised_losses.labelled_loss(clean["logits"][:2], y_l, config.losses)
  separate_fp = consistency.pseudo_label_loss(
    fp_logits, result.targets.pseudo, result.targets.confidence, u.valid, 0.0
  )
  leaves = jax.tree_util.tree_leaves
  if fp_batch_norm == "separate":
    pseudo, _ = consistency.pseudo_labels(clean["logits"][2:])
    np.testing.assert_array_equal(result.targets.pseudo, pseudo)
    np.testing.assert_allclose(result.losses["loss_sup"], separate_sup, rtol=1e-5)
    np.testing.assert_allclose(result.losses["loss_fp"], separate_fp, rtol=1e-5)
    for got, want in zip(leaves(passes.batch_stats), leaves(stats)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  else:  # the perturbed rows shift the clean rows' normalisation and the running statistics
    assert abs(float(result.losses["loss_sup"]) - float(separate_sup)) > 1e-4
    assert any(
      not np.allclose(got, want, rtol=1e-5, atol=1e-6)
      for got, want in zip(leaves(passes.batch_stats), leaves(stats))
    )


def test_bad_fp_batch_norm_names_the_key():
  config = tiny_config(**{"semi.fp_batch_norm": "shared"})
  with pytest.raises(errors.ConfigError, match=r"config\.semi\.fp_batch_norm='shared'"):
    config_schema.validate(config)
