"""Auxiliary objectives: recon and cwmim losses against NumPy, masking statistics, class-wise
independence, where gradients go, and the configs through the loop."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4jax import config_schema
from s4jax import errors
from s4jax import logs
from s4jax import train
from s4jax.losses import cwmim
from s4jax.losses import objective as objective_lib
from s4jax.losses import recon
from s4jax.losses import registry
from s4jax.models import segmenter
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_error(pred, target, norm):
  d = pred.astype(np.float64) - target
  return (np.abs(d) if norm == "l1" else d * d).mean(-1)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_reconstruction_losses_match_numpy(norm):
  rng = np.random.default_rng(0)
  pred, pred_bg, target = (rng.normal(size=(3, 5, 6, 3)).astype(np.float32) for _ in range(3))
  valid = rng.random((3, 5, 6)) > 0.3
  objects = rng.random((3, 5, 6)) > 0.6
  err = _np_error(pred, target, norm)
  np.testing.assert_allclose(
    recon.reconstruction_loss(pred, target, valid, norm), err[valid].mean(), rtol=1e-5
  )
  # Split: prediction from the fg head on objects, bg head elsewhere; each region normalised
  # by its own count.
  mixed = np.where(objects[..., None], pred, pred_bg)
  err = _np_error(mixed, target, norm)
  fg, bg = err[valid & objects].mean(), err[valid & ~objects].mean()
  total, got_fg, got_bg = recon.split_reconstruction_loss(
    pred, pred_bg, target, objects, valid, norm
  )
  np.testing.assert_allclose([got_fg, got_bg, total], [fg, bg, fg + bg], rtol=1e-5)


def test_object_mask_excludes_background_ignore_and_unconfident():
  labels = jnp.array([[0, 1, 2, 255, 3]])
  np.testing.assert_array_equal(recon.object_mask(labels, (0, 3)), [[0, 1, 1, 0, 0]])
  confident = jnp.array([[1, 1, 0, 1, 1]], bool)
  np.testing.assert_array_equal(recon.object_mask(labels, (0,), confident), [[0, 1, 0, 0, 1]])


@pytest.mark.parametrize("h, w, patch, ratio", [(64, 64, 16, 0.5), (50, 37, 8, 0.3)])
def test_patch_mask_ratio_and_alignment(h, w, patch, ratio):
  mask = np.asarray(cwmim.patch_mask(jax.random.key(3), 6, h, w, patch, ratio))
  gh, gw = -(-h // patch), -(-w // patch)
  expected = round(ratio * gh * gw)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  for image in mask:
    # Every patch of the aligned grid is entirely masked or entirely visible.
    blocks = [
      image[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
      for i in range(gh)
      for j in range(gw)
    ]
    assert all(b.min() == b.max() for b in blocks)
    assert sum(b.max() for b in blocks) == expected
  # Different images get different masks.
  assert any(not np.array_equal(mask[0], m) for m in mask[1:])


def test_select_classes_largest_area_first():
  class_map = np.full((2, 4, 4), 255, np.int32)
  class_map[0, :2] = 3  # 8 pixels
  class_map[0, 2, :3] = 1  # 3 pixels
  class_map[0, 3, 0] = 0  # 1 pixel
  class_map[1, 0, 0] = 2  # image 1: only one class
  classes, present = cwmim.select_classes(jnp.asarray(class_map), 5, 2)
  np.testing.assert_array_equal(classes[0], [3, 1])
  np.testing.assert_array_equal(present, [[True, True], [True, False]])
  assert int(classes[1, 0]) == 2


def _np_classwise(recons, target, mask, class_map, classes, present, norm):
  losses = []
  for i in range(classes.shape[0]):
    for k in range(classes.shape[1]):
      region = (mask[i] > 0) & (class_map[i] == classes[i, k])
      if present[i, k] and region.any():
        losses.append(_np_error(recons[i, k], target[i], norm)[region].mean())
  return np.mean(losses), len(losses)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_classwise_reconstruction_loss_matches_numpy(norm):
  rng = np.random.default_rng(1)
  n, p, h, w = 3, 2, 8, 8
  class_map = rng.integers(0, 4, (n, h, w)).astype(np.int32)
  class_map[2] = 255
  mask = np.asarray(cwmim.patch_mask(jax.random.key(0), n, h, w, 4, 0.5))
  classes, present = cwmim.select_classes(jnp.asarray(class_map), 4, p)
  recons = rng.normal(size=(n, p, h, w, 3)).astype(np.float32)
  target = rng.normal(size=(n, h, w, 3)).astype(np.float32)
  regions = cwmim.class_regions(jnp.asarray(class_map), classes)
  loss, count = cwmim.classwise_reconstruction_loss(recons, target, mask, regions, present, norm)
  want, want_count = _np_classwise(
    recons, target, mask, class_map, np.asarray(classes), np.asarray(present), norm
  )
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert int(count) == want_count == 4  # image 2 has no class at all


def test_classwise_loss_counts_exactly_the_masked_class_pixels():
  rng = np.random.default_rng(2)
  n, p, h, w = 2, 2, 8, 8
  class_map = jnp.asarray(rng.integers(0, 3, (n, h, w)).astype(np.int32))
  mask = cwmim.patch_mask(jax.random.key(1), n, h, w, 2, 0.5)
  classes, present = cwmim.select_classes(class_map, 3, p)
  regions = cwmim.class_regions(class_map, classes)
  target = jnp.asarray(rng.normal(size=(n, h, w, 3)).astype(np.float32))
  recons = jnp.asarray(rng.normal(size=(n, p, h, w, 3)).astype(np.float32))
  grad = jax.grad(
    lambda r: cwmim.classwise_reconstruction_loss(r, target, mask, regions, present)[0]
  )(recons)
  touched = np.abs(np.asarray(grad)).sum(-1) > 0
  expected = (
    np.asarray(mask)[:, None] * np.asarray(regions) * np.asarray(present)[:, :, None, None] > 0
  )
  np.testing.assert_array_equal(touched, expected)


def test_class_inputs_blank_masked_and_other_class_pixels():
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(1, 4, 4, 3)).astype(np.float32))
  class_map = jnp.asarray(np.array([[[0, 0, 1, 1]] * 4], np.int32))
  mask = jnp.zeros((1, 4, 4)).at[0, 0].set(1.0)
  classes = jnp.array([[1, 0]])
  inputs = np.asarray(cwmim.class_inputs(images, mask, cwmim.class_regions(class_map, classes)))
  keep = np.zeros((4, 4), bool)
  keep[1:, 2:] = True  # class 1, not masked
  np.testing.assert_array_equal(inputs[0, 0][keep], np.asarray(images)[0][keep])
  assert np.all(inputs[0, 0][~keep] == 0)


def test_feature_aggregation_loss_matches_numpy():
  rng = np.random.default_rng(4)
  n, p, h, w, c = 2, 2, 8, 8, 5
  feats = rng.normal(size=(n, p, h, w, c)).astype(np.float32)
  class_map = rng.integers(0, 3, (n, h, w)).astype(np.int32)
  mask = np.asarray(cwmim.patch_mask(jax.random.key(5), n, h, w, 2, 0.5))
  classes, present = cwmim.select_classes(jnp.asarray(class_map), 3, p)
  regions = cwmim.class_regions(jnp.asarray(class_map), classes)
  # Features at pixel resolution: the grid resize is the identity.
  loss = cwmim.feature_aggregation_loss(feats, mask, regions, present)
  terms = []
  for i in range(n):
    for k in range(p):
      region = np.asarray(regions)[i, k] > 0.5
      visible, masked = region & (mask[i] < 0.5), region & (mask[i] > 0.5)
      if not present[i, k] or not visible.any():
        continue
      v = feats[i, k][visible].mean(0)
      z = feats[i, k][masked]
      cos = z @ v / (np.linalg.norm(z, axis=-1) * np.linalg.norm(v))
      terms.extend(1 - cos)
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-4)


# ---- through a real (tiny) model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
  config = tiny_config(
    method="fixmatch",
    **{
      "losses.cwmim.enabled": True,
      "losses.recon.enabled": True,
      "losses.recon.split_foreground": True,
    },
  )
  model = segmenter.build_segmenter(config.model, 4, aux_heads=registry.required_heads(config))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  return config, model, variables


def test_classwise_reconstruction_is_independent_across_classes(tiny_model):
  """Changing the pixels of class j leaves the class-k reconstruction loss unchanged."""
  _, model, variables = tiny_model
  rng = np.random.default_rng(6)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  class_map = np.zeros((2, 32, 32), np.int32)
  class_map[:, 8:24, 4:20] = 1
  class_map[:, 20:30, 18:30] = 2
  mask = cwmim.patch_mask(jax.random.key(2), 2, 32, 32, 8, 0.5)
  classes = jnp.array([[1, 2], [1, 2]])
  regions = cwmim.class_regions(jnp.asarray(class_map), classes)

  @jax.jit
  def per_class_losses(images):
    inputs = cwmim.class_inputs(images, mask, regions).reshape(4, 32, 32, 3)
    _, decoded = model.apply(variables, inputs, train=False, method=cwmim._encode_and_decode)
    rec = model.apply(
      {"params": variables["params"]}, decoded, (32, 32), "recon", method="reconstruct"
    ).reshape(2, 2, 32, 32, 3)
    return [
      cwmim.classwise_reconstruction_loss(
        rec, images, mask, regions, jnp.array([[k == 0, k == 1]] * 2)
      )[0]
      for k in (0, 1)
    ]

  before = per_class_losses(jnp.asarray(images))
  changed = images.copy()
  changed[class_map == 2] += 3.0  # repaint class 2 (slot 1)
  after = per_class_losses(jnp.asarray(changed))
  np.testing.assert_allclose(after[0], before[0], rtol=1e-6)  # class 1: unchanged
  assert abs(float(after[1]) - float(before[1])) > 1e-3  # class 2: changed


def _context(config, model, variables, rng_seed=0, n=4):
  rng = np.random.default_rng(rng_seed)
  h = w = 32
  images = jnp.asarray(rng.normal(size=(n, h, w, 3)).astype(np.float32))
  # Class regions of 16x16 blocks: whole cells of the stride-16 feature grid.
  blocks = lambda: np.kron(rng.integers(0, 4, (n, 2, 2)), np.ones((1, 16, 16), np.int64))
  labels = jnp.asarray(blocks().astype(np.uint8))
  pseudo = jnp.asarray(blocks().astype(np.int32))
  confidence = jnp.asarray(rng.random((n, h, w)).astype(np.float32))
  valid = jnp.ones((n, h, w), jnp.float32)

  def build(params):
    out = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, images, train=False
    )
    view = objective_lib.StrongView(
      image=images,
      clean=images[::-1],
      pseudo=pseudo,
      confidence=confidence,
      valid=valid,
      box=None,
      features=out["features"],
    )
    return objective_lib.StepContext(
      config=config,
      model=model,
      params=params,
      batch_stats=variables["batch_stats"],
      rng=jax.random.key(1),
      step=jnp.zeros((), jnp.int32),
      num_classes=4,
      background_classes=(0,),
      labelled_image=images,
      labelled_mask=labels,
      labelled_features=out["features"],
      weak_image=images,
      weak_valid=valid,
      pseudo=pseudo,
      confidence=confidence,
      strong_views=(view,),
    )

  return build


def _grad_norms(objective, cfg, config, model, variables):
  build = _context(config, model, variables)
  grads = jax.grad(lambda p: objective.loss(build(p), cfg, {})[0])(variables["params"])
  return {
    path: float(jnp.abs(leaf).sum()) for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
  }


def _has_grad(norms, *fragments):
  return any(
    v > 0 for k, v in norms.items() if all(f in jax.tree_util.keystr(k) for f in fragments)
  )


def test_recon_gradients_reach_backbone_decoder_and_its_heads_only(tiny_model):
  config, model, variables = tiny_model
  norms = _grad_norms(recon.OBJECTIVE, config.losses.recon, config, model, variables)
  assert _has_grad(norms, "backbone")
  assert _has_grad(norms, "head_recon_fg") and _has_grad(norms, "head_recon_bg")
  assert _has_grad(norms, "decoder", "fuse")
  assert not _has_grad(norms, "classifier")  # reconstruction never sees the logits
  assert not _has_grad(norms, "'head_recon'")  # the plain head is not used by the split


def test_cwmim_parts_reach_the_intended_parameters(tiny_model):
  config, model, variables = tiny_model
  cfg = config.losses.cwmim
  only = functools.partial(_with, cfg)
  rec = _grad_norms(cwmim.OBJECTIVE, only(fa_weight=0.0, smim_weight=0.0), config, model, variables)
  assert _has_grad(rec, "'head_recon'") and _has_grad(rec, "backbone")
  assert not _has_grad(rec, "classifier")
  fa = _grad_norms(cwmim.OBJECTIVE, only(rec_weight=0.0, smim_weight=0.0), config, model, variables)
  assert _has_grad(fa, "backbone")
  assert not _has_grad(fa, "decoder") and not _has_grad(fa, "head_recon")  # encoder only
  smim = _grad_norms(cwmim.OBJECTIVE, only(rec_weight=0.0, fa_weight=0.0), config, model, variables)
  assert _has_grad(smim, "classifier") and _has_grad(smim, "backbone")
  assert not _has_grad(smim, "head_recon")


def test_student_apply_with_batch_statistics_is_a_train_mode_pass(tiny_model):
  """batch_statistics=True normalises with the images' own statistics; the default uses the
  running statistics."""
  config, model, variables = tiny_model
  ctx = _context(config, model, variables)(variables["params"])
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3)) * 3.0 + 1.0
  train_mode, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  inference = model.apply(variables, images, train=False)
  got = ctx.student_apply(images, batch_statistics=True)
  np.testing.assert_allclose(got["logits"], train_mode["logits"], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got["logits"] - inference["logits"]).max()) > 1e-2
  np.testing.assert_allclose(ctx.student_apply(images)["logits"], inference["logits"], rtol=1e-6)


def test_cwmim_batch_norm_modes_differ_and_both_train(tiny_model):
  config, model, variables = tiny_model
  build = _context(config, model, variables)
  losses = {}
  for mode in ("running", "batch"):
    cfg = _with(config.losses.cwmim, batch_norm=mode)
    loss, grads = jax.value_and_grad(lambda p: cwmim.OBJECTIVE.loss(build(p), cfg, {})[0])(
      variables["params"]
    )
    assert np.isfinite(float(loss))
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0
    losses[mode] = float(loss)
  assert abs(losses["running"] - losses["batch"]) > 1e-4


def _with(cfg, **overrides):
  new = cfg.copy_and_resolve_references()
  with new.unlocked():
    for k, v in overrides.items():
      new[k] = v
  return new


# ---- configs and the loop ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["shapes_recon.py", "shapes_cwmim.py"])
def test_shapes_objective_configs_validate(name):
  config = config_schema.sibling_config(os.path.join(REPO, "configs", "x.py"), name)
  config_schema.validate(config)
  assert registry.enabled(config)


def test_objectives_train_two_steps_through_the_loop(tmp_path):
  config = tiny_config(
    method="fixmatch",
    total_steps=2,
    log_every=1,
    eval_every=2,
    checkpoint_every=2,
    **{
      "semi.threshold": 0.3,
      "losses.recon.enabled": True,
      "losses.recon.split_foreground": True,
      "losses.cwmim.enabled": True,
      "losses.cwmim.patch_size": 8,
    },
  )
  results = train.train_and_evaluate(config, str(tmp_path))
  assert int(results["state"].step) == 2
  records = [r for r in logs.read_metrics(str(tmp_path / "metrics.jsonl")) if "train/loss" in r]
  assert len(records) == 2
  for key in (
    "train/recon/loss",
    "train/recon/loss_fg_labelled",
    "train/recon/loss_strong",
    "train/cwmim/loss_rec",
    "train/cwmim/loss_fa",
    "train/cwmim/loss_smim",
  ):
    assert np.isfinite(records[0][key]), key
  assert records[0]["train/cwmim/masked_fraction"] == pytest.approx(0.5)
  images = os.listdir(tmp_path / "images")
  assert any(f.startswith("reconstruction") for f in images)
  assert any(f.startswith("cwmim") for f in images)


@pytest.mark.parametrize(
  "key, value",
  [
    ("losses.cwmim.mask_ratio", 1.0),
    ("losses.cwmim.patch_size", 0),
    ("losses.recon.norm", "l3"),
    ("losses.cwmim.classes_per_image", 0),
    ("losses.cwmim.batch_norm", "train"),
  ],
)
def test_bad_objective_values_name_the_key(key, value):
  config = tiny_config(
    method="fixmatch", **{"losses.cwmim.enabled": True, "losses.recon.enabled": True, key: value}
  )
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}="):
    config_schema.validate(config)


def test_smim_needs_a_semi_supervised_method():
  config = tiny_config(**{"losses.cwmim.enabled": True})
  with pytest.raises(errors.ConfigError, match=r"config\.losses\.cwmim\.smim_weight="):
    config_schema.validate(config)
