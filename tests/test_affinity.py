"""The `affinity` objective (AuxSegNet, docs/methods.md §4): affinities and fusion against
NumPy, the losses against NumPy, where each loss's gradient goes, the pseudo-label and eval
hooks, the HW x HW memory XLA reports, bad config values, one real train step and the
evaluation pictures.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4jax import augment
from s4jax import config_schema
from s4jax import errors
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.losses import affinity
from s4jax.losses import objective as objective_lib
from s4jax.losses import registry
from s4jax.methods import base as method_base
from s4jax.models import heads
from s4jax.models import segmenter
from tiny import run_steps, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 6  # shapes


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _np_affinity(theta, phi):
  n, c = theta.shape[0], theta.shape[-1]
  t, p = theta.reshape(n, -1, c).astype(np.float64), phi.reshape(n, -1, c).astype(np.float64)
  return _np_softmax(np.einsum("nic,njc->nij", t, p))


def _fusion():
  module = heads.AffinityFusionHead(2)
  params = module.init(jax.random.key(3), jnp.zeros((1, 5, 5, 2)))
  # Random weights, not the init's: the test must see a fusion that prefers some pairs.
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  return lambda name, x: module.apply(params, x)


# ---- the pieces against NumPy ------------------------------------------------------------


def test_task_affinity_rows_sum_to_one_and_match_numpy():
  rng = np.random.default_rng(0)
  theta, phi = (rng.normal(size=(2, 3, 4, 5)).astype(np.float32) for _ in range(2))
  got = np.asarray(affinity.task_affinity(theta, phi))
  assert got.shape == (2, 12, 12)
  np.testing.assert_allclose(got, _np_affinity(theta, phi), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  # Rows, not columns: softmax over j of theta_i . phi_j.
  assert not np.allclose(got.sum(-2), 1.0, atol=1e-3)


def test_cross_task_fusion_is_row_stochastic_and_matches_numpy():
  rng = np.random.default_rng(1)
  seg = {k: rng.normal(size=(2, 3, 3, 4)).astype(np.float32) for k in ("theta", "phi")}
  sal = {k: rng.normal(size=(2, 3, 3, 4)).astype(np.float32) for k in ("theta", "phi")}
  head = _fusion()
  fused, share = affinity.cross_task_affinity(head, seg, sal, normalize_rows=True)
  fused = np.asarray(fused)
  np.testing.assert_allclose(fused.sum(-1), 1.0, rtol=1e-5)
  assert np.all(fused > 0)
  stacked = np.stack(
    [_np_affinity(seg["theta"], seg["phi"]), _np_affinity(sal["theta"], sal["phi"])], -1
  )
  weights = np.asarray(head("affinity_fusion", jnp.asarray(stacked, jnp.float32)))
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)  # softmax over the 2 tasks
  assert weights[..., 1].std() > 0.01  # per-pair, not constant
  paper = (stacked * weights).sum(-1)  # AuxSegNet's code
  np.testing.assert_allclose(fused, paper / paper.sum(-1, keepdims=True), rtol=1e-4)
  np.testing.assert_allclose(share, weights[..., 1].mean(), rtol=1e-5)
  # Without the renormalisation the rows of the paper's mix do not sum to 1.
  raw, _ = affinity.cross_task_affinity(head, seg, sal, normalize_rows=False)
  np.testing.assert_allclose(raw, paper, rtol=1e-4)
  assert np.abs(np.asarray(raw).sum(-1) - 1.0).max() > 1e-3


def test_refinement_and_pseudo_label_propagation_match_numpy():
  rng = np.random.default_rng(2)
  a = _np_softmax(rng.normal(size=(2, 6, 6)) * 3).astype(np.float32)
  maps = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  want = np.einsum("nij,njc->nic", a, maps.reshape(2, 6, 4)).reshape(2, 2, 3, 4)
  np.testing.assert_allclose(affinity.refine(a, maps), want, rtol=1e-5, atol=1e-6)
  # The hook's propagation: on a grid equal to the crop it is A p, renormalised; a
  # distribution per pixel either way.
  probs = _np_softmax(rng.normal(size=(2, 2, 3, 4))).astype(np.float32)
  got = np.asarray(affinity.propagate_probabilities(a, probs, (2, 3)))
  want = np.einsum("nij,njc->nic", a, probs.reshape(2, 6, 4)).reshape(2, 2, 3, 4)
  np.testing.assert_allclose(got, want / want.sum(-1, keepdims=True), rtol=1e-5)
  up = np.asarray(
    affinity.propagate_probabilities(
      jnp.asarray(a), jnp.asarray(np.repeat(np.repeat(probs, 4, 1), 4, 2)), (2, 3)
    )
  )
  assert up.shape == (2, 8, 12, 4) and np.all(up >= 0)
  np.testing.assert_allclose(up.sum(-1), 1.0, rtol=1e-5)


def test_grid_and_resizing():
  assert affinity.grid_shape(321, 321, 16) == (21, 21)
  assert affinity.grid_shape(321, 500, 8) == (41, 63)
  assert affinity.affinity_map_bytes(321, 321, 16) == 4 * 441**2
  # An antialiased linear filter: constants stay constant, distributions over the classes
  # stay distributions (the hook resizes probabilities), a checkerboard averages out.
  rng = np.random.default_rng(5)
  probs = _np_softmax(rng.normal(size=(2, 81, 81, 3))).astype(np.float32)
  grid = np.asarray(affinity.to_grid(probs, (21, 21)))
  assert grid.shape == (2, 21, 21, 3)
  np.testing.assert_allclose(grid.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(affinity.to_grid(np.full((1, 8, 8, 1), 3.0), (4, 4)), 3.0, rtol=1e-6)
  board = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)[None, :, :, None]
  np.testing.assert_allclose(affinity.to_grid(board, (4, 4))[0, 1:3, 1:3], 0.5, rtol=1e-5)
  np.testing.assert_array_equal(affinity.to_grid(board, (8, 8)), board)  # same size


def _np_bce(x, t):
  x = x.astype(np.float64)
  return -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))


def test_multilabel_soft_margin_and_bce_match_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 5)).astype(np.float32) * 3
  targets = (rng.random((3, 5)) > 0.5).astype(np.float32)
  np.testing.assert_allclose(
    affinity.bce_with_logits(logits, targets), _np_bce(logits, targets), rtol=1e-5
  )
  # torch.nn.functional.multilabel_soft_margin_loss: mean over classes, then over images.
  all_classes = np.ones(5, np.float32)
  np.testing.assert_allclose(
    affinity.multilabel_soft_margin_loss(logits, targets, all_classes, np.ones(3)),
    _np_bce(logits, targets).mean(),
    rtol=1e-5,
  )
  # Background class 0 not scored, image 1 skipped (no target pixel).
  mask = np.array([0, 1, 1, 1, 1], np.float32)
  got = affinity.multilabel_soft_margin_loss(logits, targets, mask, np.array([1, 0, 1]))
  want = _np_bce(logits, targets)[[0, 2]][:, 1:].mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_targets_saliency_and_classes_present():
  labels = jnp.array([[[0, 1, 255], [2, 2, 0]]])
  np.testing.assert_array_equal(affinity.is_object(labels, (0,)), [[[0, 1, 0], [1, 1, 0]]])
  np.testing.assert_array_equal(affinity.is_object(labels, (0, 2)), [[[0, 1, 0], [0, 0, 0]]])
  weight = jnp.array([[[1, 0, 0], [1, 1, 1]]], jnp.float32)  # the class-1 pixel unconfident
  np.testing.assert_array_equal(affinity.present_classes(labels, weight, 4), [[1, 0, 1, 0]])


# ---- through a tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stepped():
  """One real train step (FixMatch + affinity with both hooks on, hidden masks in the batch)
  on one device: its metrics, and its state as the tiny model the other tests use (the step's
  init is the only initialiser compile of this file)."""
  config = tiny_config(
    method="fixmatch",
    **{
      "semi.threshold": 0.3,
      "losses.affinity.enabled": True,
      "losses.affinity.stride": 8,
      "losses.affinity.dilations": (1, 2),
      "losses.affinity.refine_pseudo_labels": True,
      "losses.affinity.refine_eval": True,
    },
  )
  spec = datasets.build(config.data)
  streams = [
    pipeline.make_train_iterator(
      spec.train_source, indices, batch_size=8, crop_size=32, seed=0, kind=kind
    )
    for indices, kind in (
      (spec.labelled_indices, "labelled"),
      (spec.unlabelled_indices, "unlabelled"),
    )
  ]
  labelled, unlabelled = (next(s) for s in streams)
  batch = {
    **labelled,
    "u_image": unlabelled["image"],
    "u_valid": unlabelled["valid"],
    "u_mask": unlabelled["mask"],
  }  # the hidden masks: diagnostics only
  state, (metrics,), _ = run_steps(config, jax.devices()[:1], [batch], num_classes=NUM_CLASSES)
  model = segmenter.build_segmenter(
    config.model, NUM_CLASSES, aux_heads=registry.required_heads(config)
  )
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  _FORWARDS[id(model)] = jax.jit(
    lambda params, images: model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, images, train=False
    )
  )
  return config, model, variables, metrics


@pytest.fixture(scope="module")
def tiny_model(stepped):
  return stepped[:3]


_FORWARDS = {}  # id(model) -> its compiled inference forward (params, images)


def _context(config, model, variables, params=None, pseudo=None, confidence=None, fused=None, n=4):
  """A StepContext of 4 random 32 x 32 images (the same on every call) as labelled images and
  as one strong view; `fused` replaces the network's fused features (then the network runs
  with the fixed `variables`, so only the heads are differentiated through `params`)."""
  rng = np.random.default_rng(4)
  params = variables["params"] if params is None else params
  images = jnp.asarray(rng.normal(size=(n, 32, 32, 3)).astype(np.float32))
  blocks = lambda: np.kron(rng.integers(0, NUM_CLASSES, (n, 2, 2)), np.ones((1, 16, 16), int))
  labels = jnp.asarray(blocks().astype(np.uint8))
  pseudo = jnp.asarray(blocks().astype(np.int32)) if pseudo is None else pseudo
  if confidence is None:
    confidence = jnp.asarray(rng.random((n, 32, 32)).astype(np.float32))
  valid = jnp.ones((n, 32, 32), jnp.float32)
  out = dict(_FORWARDS[id(model)](variables["params"] if fused is not None else params, images))
  if fused is not None:
    out["features"] = fused
  features = method_base.Features(low=out["low"], high=out["high"], fused=out["features"])
  view = objective_lib.StrongView(
    image=images,
    clean=images,
    valid=valid,
    box=None,
    pseudo=pseudo,
    confidence=confidence,
    weight=jnp.ones_like(confidence),
    features=out["features"],
  )
  return objective_lib.StepContext(
    config=config,
    model=model,
    params=params,
    batch_stats=variables["batch_stats"],
    rng=jax.random.key(1),
    step=jnp.zeros((), jnp.int32),
    num_classes=NUM_CLASSES,
    background_classes=(0,),
    labelled_image=images,
    labelled_mask=labels,
    labelled_features=out["features"],
    weak_image=images,
    weak_valid=valid,
    pseudo=pseudo,
    confidence=confidence,
    strong_views=(view,),
    features={"labelled": features, "strong1": features},
  )


TERMS = ("loss_cls", "loss_sal", "loss_seg_refined", "loss_sal_refined")


def test_decoder_logits_are_the_networks_logits(tiny_model):
  config, model, variables = tiny_model
  ctx = _context(config, model, variables)
  want = _FORWARDS[id(model)](variables["params"], ctx.labelled_image)["logits"]
  got = segmenter.upsample_logits(
    affinity.decoder_logits(variables["params"]["decoder"], ctx.labelled_features), (32, 32)
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_each_loss_reaches_its_intended_heads(tiny_model):
  config, model, variables = tiny_model
  cfg = config.losses.affinity

  fused = _context(config, model, variables).labelled_features

  def terms(params, fused):  # the heads' parameters and the features they read (source)
    ctx = _context(config, model, variables, params, fused=fused)
    _, metrics, _ = affinity.OBJECTIVE.loss(ctx, cfg, {})
    return jnp.stack([metrics[f"{t}_labelled"] + metrics[f"{t}_unlabelled"] for t in TERMS])

  grads, feature_grads = jax.jit(jax.jacrev(terms, argnums=(0, 1)))(variables["params"], fused)
  feature_grads = np.abs(np.asarray(feature_grads)).reshape(len(TERMS), -1).sum(-1)
  norms = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    norms[jax.tree_util.keystr(path)] = np.abs(np.asarray(leaf)).reshape(len(TERMS), -1).sum(-1)

  def reached(term, *fragments):
    i = TERMS.index(term)
    return any(v[i] > 0 for k, v in norms.items() if all(f in k for f in fragments))

  expected = {  # head (or part) -> does the term's gradient reach it
    "loss_cls": {
      "head_affinity_classifier": True,
      "head_affinity_sal_branch": False,
      "head_affinity_saliency": False,
      "head_affinity_seg_branch": False,
      "head_affinity_fusion": False,
      "'decoder']['classifier": False,
    },
    "loss_sal": {
      "head_affinity_classifier": False,
      "head_affinity_sal_branch": True,
      "head_affinity_saliency": True,
      "head_affinity_seg_branch": False,
      "head_affinity_fusion": False,
      "'decoder']['classifier": False,
    },
    "loss_seg_refined": {
      "head_affinity_classifier": False,
      "head_affinity_sal_branch": True,
      "head_affinity_saliency": False,
      "head_affinity_seg_branch": True,
      "head_affinity_fusion": True,
      "'decoder']['classifier": True,
    },
    "loss_sal_refined": {
      "head_affinity_classifier": False,
      "head_affinity_sal_branch": True,
      "head_affinity_saliency": True,
      "head_affinity_seg_branch": True,
      "head_affinity_fusion": True,
      "'decoder']['classifier": False,
    },
  }
  for term, parts in expected.items():
    assert feature_grads[TERMS.index(term)] > 0, term  # every term trains the features
    assert not reached(term, "backbone"), term  # (held fixed here: the features are inputs)
    for part, want in parts.items():
      assert reached(term, part) == want, (term, part)
  # The projections theta/phi learn only through the refined predictions (the affinity).
  assert not reached("loss_sal", "head_affinity_sal_branch", "theta")
  assert reached("loss_sal_refined", "head_affinity_sal_branch", "theta")


def test_refined_losses_can_train_the_affinity_alone(tiny_model):
  config, model, variables = tiny_model
  cfg = config.losses.affinity.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.refined_trains_predictions = False
  fused = _context(config, model, variables).labelled_features

  def refined(params):
    _, metrics, _ = affinity.OBJECTIVE.loss(
      _context(config, model, variables, params, fused=fused), cfg, {}
    )
    return metrics["loss_seg_refined_labelled"] + metrics["loss_sal_refined_labelled"]

  grads = jax.jit(jax.grad(refined))(variables["params"])
  norm = lambda tree: sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(tree))
  assert norm(grads["decoder"]["classifier"]) == 0 and norm(grads["head_affinity_saliency"]) == 0
  assert norm(grads["head_affinity_fusion"]) > 0 and norm(grads["head_affinity_seg_branch"]) > 0


def _target_context(config, model, variables, hidden=None):
  ctx = _context(config, model, variables)
  logits = _FORWARDS[id(model)](variables["params"], ctx.weak_image)["logits"]
  pseudo, confidence = jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.softmax(logits).max(-1)
  targets = method_base.Targets(
    pseudo=pseudo, confidence=confidence, weight=jnp.full_like(confidence, 0.5), logits=logits
  )
  return objective_lib.TargetContext(
    config=config,
    model=model,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    teacher_variables=variables,
    weak_image=ctx.weak_image,
    weak_valid=ctx.weak_valid,
    targets=targets,
    rng=jax.random.key(2),
    step=jnp.zeros((), jnp.int32),
    num_classes=NUM_CLASSES,
    hidden_mask=hidden,
  ), ctx


def test_refine_pseudo_labels_changes_only_the_unlabelled_targets(tiny_model):
  config, model, variables = tiny_model
  cfg = config.losses.affinity
  tctx, ctx = _target_context(config, model, variables, hidden=jnp.zeros((4, 32, 32), jnp.uint8))
  before = tctx.targets
  after, metrics = jax.jit(lambda: affinity.OBJECTIVE.targets(tctx, cfg, {}))()
  changed = np.asarray(after.pseudo != before.pseudo)
  assert changed.any()
  np.testing.assert_allclose(metrics["changed"], changed.mean(), rtol=1e-6)
  np.testing.assert_array_equal(after.weight, before.weight)  # weights are not its business
  # The confidences are those of the propagated distributions: the max of softmax(logits).
  np.testing.assert_allclose(after.confidence, jax.nn.softmax(after.logits).max(-1), rtol=1e-4)
  np.testing.assert_array_equal(after.pseudo, jnp.argmax(after.logits, -1))
  # By hand: the teacher's A of the weak view, p on the 4 x 4 grid, A p renormalised, back up.
  apply_head = lambda name, x: model.apply(variables, name, x, method="head")
  fused = _FORWARDS[id(model)](variables["params"], ctx.weak_image)["features"]
  a = np.asarray(
    affinity.branch_outputs(apply_head, affinity.to_grid(fused, (4, 4)), cfg)["affinity"]
  )
  p = np.asarray(affinity.to_grid(jax.nn.softmax(before.logits), (4, 4))).reshape(4, 16, -1)
  grid = np.einsum("nij,njc->nic", a, p)
  grid = (grid / grid.sum(-1, keepdims=True)).reshape(4, 4, 4, NUM_CLASSES)
  want = np.clip(np.asarray(affinity.upsample(grid, (32, 32))), 0, 1)
  np.testing.assert_allclose(
    np.exp(after.logits), want / want.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6
  )
  # Against the hidden masks (all class 0 here): accuracy is the share of label-0 pixels.
  np.testing.assert_allclose(metrics["accuracy_before"], np.mean(before.pseudo == 0), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy_after"], np.mean(after.pseudo == 0), rtol=1e-6)
  # Off: the hook returns the targets it got.
  off = config.losses.affinity.copy_and_resolve_references()
  with off.unlocked():
    off.refine_pseudo_labels = False
  same, _ = affinity.OBJECTIVE.targets(tctx, off, {})
  assert same is before
  # The objective's labelled losses do not see the refined labels; its unlabelled ones do.
  metrics_of = jax.jit(
    lambda pseudo, confidence: affinity.OBJECTIVE.loss(
      _context(config, model, variables, pseudo=pseudo, confidence=confidence), cfg, {}
    )[1]
  )
  plain = metrics_of(before.pseudo, before.confidence)
  refined = metrics_of(after.pseudo, after.confidence)
  for term in TERMS:
    np.testing.assert_allclose(plain[f"{term}_labelled"], refined[f"{term}_labelled"])
  assert any(
    abs(float(plain[f"{t}_unlabelled"]) - float(refined[f"{t}_unlabelled"])) > 1e-6 for t in TERMS
  )


def test_eval_hook_scores_the_refined_segmentation(tiny_model):
  config, model, variables = tiny_model
  cfg = config.losses.affinity
  images = _context(config, model, variables).labelled_image
  out = _FORWARDS[id(model)](variables["params"], images)
  got = jax.jit(lambda x: affinity.OBJECTIVE.refine_eval(model, variables, x, out["logits"], cfg))(
    images
  )
  # By hand: A from the heads, P_seg on the 4 x 4 grid, A . P upsampled to the image.
  grid = (4, 4)
  apply_head = lambda name, x: model.apply(variables, name, x, method="head")
  pieces = affinity.branch_outputs(apply_head, affinity.to_grid(out["features"], grid), cfg)
  seg = affinity.to_grid(
    affinity.decoder_logits(variables["params"]["decoder"], out["features"]), grid
  )
  a, p = np.asarray(pieces["affinity"]), np.asarray(seg).reshape(4, 16, NUM_CLASSES)
  want = affinity.upsample(np.einsum("nij,njc->nic", a, p).reshape(4, 4, 4, NUM_CLASSES), (32, 32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  off = cfg.copy_and_resolve_references()
  with off.unlocked():
    off.refine_eval = False
  assert (
    affinity.OBJECTIVE.refine_eval(model, variables, images, out["logits"], off) is out["logits"]
  )


# ---- memory of the HW x HW part (XLA's analysis) ------------------------------------------


def affinity_temp_bytes(n, crop, stride, channels=128, num_classes=21):
  """XLA's temp bytes of the affinity, fusion and both refinements, forward + backward, for
  `n` crop x crop images (the only HW x HW part of the objective)."""
  gh, gw = affinity.grid_shape(crop, crop, stride)
  module = heads.AffinityFusionHead(2)
  fusion_params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))

  def loss(branches, seg, sal, fusion_params):
    a, _ = affinity.cross_task_affinity(
      lambda name, x: module.apply(fusion_params, x), *branches, normalize_rows=True
    )
    return (affinity.refine(a, seg) ** 2).sum() + (affinity.refine(a, sal) ** 2).sum()

  shape = lambda c: jax.ShapeDtypeStruct((n, gh, gw, c), jnp.float32)
  branch = {"theta": shape(channels), "phi": shape(channels)}
  compiled = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    .lower((branch, branch), shape(num_classes), shape(1), fusion_params)
    .compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("crop, stride, mib", [(64, 8, 1.6), (321, 16, 124.7)])
def test_affinity_memory_is_what_the_note_says(crop, stride, mib):
  """docs/methods.md §4: 8 images, forward + backward, XLA:CPU's memory analysis —
  shapes_affinity.py (64 crop, stride 8) 1.6 MiB; voc_affinity.py (321, 16) 124.7 MiB, about
  21 HW x HW float32 maps per image."""
  got = affinity_temp_bytes(8, crop, stride) / 2**20
  assert 0.75 * mib <= got <= 1.25 * mib, got
  if crop == 321:
    maps = got * 2**20 / (8 * affinity.affinity_map_bytes(crop, crop, stride))
    assert 15 <= maps <= 30, maps


# ---- configs and validation --------------------------------------------------------------


@pytest.mark.parametrize("name", ["shapes_affinity.py", "shapes_affinity_imagenet.py"])
def test_affinity_configs_validate_and_declare_the_heads(name):
  config = config_schema.sibling_config(os.path.join(REPO, "configs", "x.py"), name)
  config_schema.validate(config)
  names = {spec.name for spec in registry.required_heads(config)}
  assert {
    "affinity_classifier",
    "affinity_sal_branch",
    "affinity_saliency",
    "affinity_seg_branch",
    "affinity_fusion",
  } <= names
  heads_only = config.copy_and_resolve_references()
  heads_only.losses.affinity.refine_predictions = False
  names = {spec.name for spec in registry.required_heads(heads_only)}
  assert "affinity_fusion" not in names and "affinity_seg_branch" not in names


@pytest.mark.parametrize(
  "key, value, overrides",
  [
    ("losses.affinity.stride", 4, {}),
    ("losses.affinity.stride", 32, {}),
    ("losses.affinity.source", "low", {}),
    ("losses.affinity.branch_channels", 0, {}),
    ("losses.affinity.dilations", (1, 0), {}),
    ("losses.affinity.dilations", (), {}),
    ("losses.affinity.classifier_dropout", 1.0, {}),
    ("losses.affinity.sal_weight", -1.0, {}),
    ("losses.affinity.background_classes", (-1,), {}),
    ("losses.affinity.refine_pseudo_labels", True, {"losses.affinity.refine_predictions": False}),
    ("losses.affinity.refine_eval", True, {"losses.affinity.refine_predictions": False}),
    ("losses.affinity.refine_pseudo_labels", True, {"method": "supervised"}),
    ("losses.affinity.on_labelled", False, {"method": "supervised"}),
    (
      "losses.affinity.cls_weight",
      0.0,
      {"losses.affinity.sal_weight": 0.0, "losses.affinity.refine_predictions": False},
    ),
  ],
)
def test_bad_affinity_values_name_the_key(key, value, overrides):
  config = tiny_config(
    **{"method": "fixmatch", "losses.affinity.enabled": True, **overrides, key: value}
  )
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}="):
    config_schema.validate(config)


# ---- the train step and the evaluation pictures ------------------------------------------


def test_train_step_trains_on_the_refined_pseudo_labels(stepped):
  """Every term of the real step is finite, and the step's pseudo-label diagnostics are the
  hook's "after" figures, i.e. the unlabelled losses train on the refined labels."""
  metrics = stepped[3]
  assert np.isfinite(metrics["train/loss"])
  for term in TERMS:
    for group in ("labelled", "unlabelled"):
      assert np.isfinite(metrics[f"train/affinity/{term}_{group}"]), (term, group)
  assert metrics["train/pseudo_accuracy"] == pytest.approx(
    float(metrics["train/affinity/accuracy_after"]), abs=1e-6
  )
  assert metrics["train/confident_fraction"] == pytest.approx(
    float(metrics["train/affinity/confident_after"]), abs=1e-6
  )
  assert 0 <= metrics["train/affinity/changed"] <= 1
  assert 0 < metrics["train/affinity/sal_share_labelled"] < 1


def test_visualise_shows_saliency_and_an_affinity_row(tiny_model):
  config, model, variables = tiny_model
  images = _context(config, model, variables).labelled_image
  panels = jax.jit(
    lambda x: affinity.OBJECTIVE.visualise(model, variables, x, None, None, config.losses.affinity)
  )(images)["affinity"]
  assert panels.shape == (4, 3, 32, 32, 3)  # input | saliency | affinity row
  np.testing.assert_array_equal(panels[:, 0], images)
  assert np.all(np.isfinite(np.asarray(panels)))
  # The saliency panel is gray (equal RGB before normalisation).
  unit = np.asarray(panels[:, 1]) * np.array(augment.IMAGENET_STD) + np.array(augment.IMAGENET_MEAN)
  np.testing.assert_allclose(unit[..., 0], unit[..., 1], atol=1e-5)
