"""CSS's collaborative logit/representation supervision (`losses.contrastive`, docs/methods.md
§5): prototypes, representation-space labels, sampling and InfoNCE against NumPy, the target
hook, 1 vs 8 devices, checkpointed prototypes, config errors."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4jax import augment
from s4jax import checkpointing
from s4jax import config_schema
from s4jax import errors
from s4jax import sharding
from s4jax import viz
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.losses import consistency
from s4jax.losses import contrastive
from s4jax.losses import contrastive_config
from s4jax.losses import objective as objective_lib
from s4jax.losses import registry
from s4jax.methods import base as method_base
from s4jax.models import segmenter
from tiny import run_steps, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_normalise(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_bilinear(x, size):
  """Half-pixel-centre bilinear upsampling of [n, h, w, c] with edge clamping."""

  def axis_weights(n_in, n_out):
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    lo = np.floor(pos).astype(int)
    frac = pos - lo
    return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), frac

  y0, y1, fy = axis_weights(x.shape[1], size[0])
  x0, x1, fx = axis_weights(x.shape[2], size[1])
  rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
  return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


# ---- prototypes and representation-space labels ------------------------------------------


def test_prototype_initialisation_and_update_match_numpy():
  rng = np.random.default_rng(0)
  k, d, p, m = 5, 4, 60, 0.9
  prototypes = rng.normal(size=(k, d)).astype(np.float32)
  initialised = np.array([True, True, False, False, True])
  reps = rng.normal(size=(p, d)).astype(np.float32)
  labels = rng.integers(0, 4, p)  # class 4 never present
  labels[rng.random(p) < 0.2] = 255  # not counted
  labels[labels == 3] = 255  # class 3: uninitialised and absent
  labels[:3] = 2  # class 2: uninitialised, present
  new, new_init, present = jax.device_get(
    contrastive.update_prototypes(
      jnp.asarray(prototypes), jnp.asarray(initialised), jnp.asarray(reps), jnp.asarray(labels), m
    )
  )
  want = prototypes.copy()
  for c in range(k):
    pixels = reps[labels == c]
    if len(pixels) == 0:
      continue  # absent: unchanged
    mean = pixels.mean(0)
    want[c] = m * prototypes[c] + (1 - m) * mean if initialised[c] else mean
  np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(present, [True, True, True, False, False])
  np.testing.assert_array_equal(new_init, [True, True, True, False, True])
  np.testing.assert_array_equal(new[3], prototypes[3])
  np.testing.assert_array_equal(new[4], prototypes[4])


def test_representation_labels_and_image_weights_match_numpy():
  rng = np.random.default_rng(1)
  n, h, w, d, k, t = 2, 3, 4, 6, 5, 0.1
  reps = rng.normal(size=(n, h, w, d)).astype(np.float32)
  prototypes = rng.normal(size=(k, d)).astype(np.float32)
  prototypes[1] = 0.0  # a class not seen yet: cosine 0
  cosine = contrastive.cosine_to_prototypes(jnp.asarray(reps), jnp.asarray(prototypes))
  np_cos = _np_normalise(reps) @ _np_normalise(prototypes).T
  np.testing.assert_allclose(cosine, np_cos, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(cosine)[..., 1] == 0)
  size = (12, 16)
  labels, confidence = contrastive.representation_labels(cosine, t, size)
  probs = _np_softmax(_np_bilinear(np_cos, size) / t)
  np.testing.assert_array_equal(labels, probs.argmax(-1))
  np.testing.assert_allclose(confidence, probs.max(-1), rtol=1e-4, atol=1e-6)
  valid = (rng.random((n, *size)) > 0.3).astype(np.float32)
  got = contrastive.image_weights(confidence, valid, 0.6)
  want = [((probs.max(-1)[i] >= 0.6) & (valid[i] > 0)).sum() / valid[i].sum() for i in range(n)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_highest_reachable_representation_confidence():
  for k, t in ((21, 0.5), (6, 0.5), (19, 0.1)):
    cos = np.full(k, -1.0)
    cos[0] = 1.0
    want = _np_softmax(cos / t)[0]
    assert contrastive_config.max_representation_confidence(k, t) == pytest.approx(want)
  # CSS's values (T 0.5, threshold 0.97) cannot be met on VOC: the reason for the warning.
  assert contrastive_config.max_representation_confidence(21, 0.5) < 0.97


def test_rampdown_matches_exp_minus_five_e_squared():
  for step in (0, 250, 1000):
    want = np.exp(-5.0 * (step / 1000) ** 2)
    assert float(contrastive.rampdown(step, 1000, 5.0)) == pytest.approx(want, rel=1e-6)
  assert float(contrastive.rampdown(700, 1000, 0.0)) == 1.0


# ---- InfoNCE and sampling ----------------------------------------------------------------


def _np_info_nce(anchors, positive, negatives, t):
  a = _np_normalise(anchors.astype(np.float64))
  logits = (
    np.concatenate(
      [
        (a @ _np_normalise(positive.astype(np.float64)))[:, None],
        np.einsum("ad,and->an", a, _np_normalise(negatives)),
      ],
      -1,
    )
    / t
  )
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return np.mean(lse - logits[:, 0])


def test_info_nce_matches_numpy_on_fixed_samples():
  rng = np.random.default_rng(2)
  anchors, positive = rng.normal(size=(7, 5)), rng.normal(size=5)
  negatives = rng.normal(size=(7, 9, 5))
  got = contrastive.info_nce(
    *(jnp.asarray(x, jnp.float32) for x in (anchors, positive, negatives)), 0.5
  )
  np.testing.assert_allclose(got, _np_info_nce(anchors, positive, negatives, 0.5), rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_class_losses_on_fixed_indices_match_numpy_and_only_anchors_get_gradient(chunk):
  rng = np.random.default_rng(3)
  p, d, k, a, n = 40, 6, 3, 4, 5
  reps = rng.normal(size=(p, d)).astype(np.float32)
  prototypes = rng.normal(size=(k, d)).astype(np.float32)
  anchor_index = rng.integers(0, p, (k, a))
  negative_index = rng.integers(0, p, (k, a, n))
  use = np.array([True, False, True])

  @jax.jit
  def loss(r):
    return contrastive.class_losses(
      r,
      jnp.asarray(anchor_index),
      jnp.asarray(negative_index),
      jnp.asarray(prototypes),
      jnp.asarray(use),
      0.5,
      chunk,
    )

  got = loss(jnp.asarray(reps))
  want = [
    _np_info_nce(reps[anchor_index[c]], prototypes[c], reps[negative_index[c]], 0.5)
    if use[c]
    else 0.0
    for c in range(k)
  ]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  grad = np.asarray(jax.jit(jax.grad(lambda r: loss(r).sum()))(jnp.asarray(reps)))
  touched = np.abs(grad).sum(-1) > 0
  anchors_used = np.zeros(p, bool)
  anchors_used[anchor_index[use].ravel()] = True
  np.testing.assert_array_equal(touched, anchors_used)  # negatives carry no gradient


# Jitted once per shape: far fewer dispatches than running the samplers op by op.
_sample_pairs = jax.jit(contrastive.sample_pairs, static_argnums=(6, 7, 8))
_contrastive_loss = jax.jit(
  functools.partial(contrastive.contrastive_loss, num_anchors=16, num_negatives=8, temperature=0.5)
)


def _pixels(seed=4, p=400, k=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, p)
  labels[labels == 3] = 0  # class 3 absent
  valid = rng.random(p) > 0.25
  hard = valid & (rng.random(p) > 0.5)
  hard &= labels != 4  # class 4 present, no hard pixel
  prototypes = rng.normal(size=(k, 8)).astype(np.float32)
  present = np.array([np.any(valid & (labels == c)) for c in range(k)])
  return labels, valid, hard, prototypes, present


def test_sampling_respects_the_masks():
  labels, valid, hard, prototypes, present = _pixels()
  k, a, n = len(present), 64, 96
  anchor_index, negative_index, negative_class, has_anchors = jax.device_get(
    _sample_pairs(
      jax.random.key(0),
      jnp.asarray(labels),
      jnp.asarray(valid),
      jnp.asarray(hard),
      jnp.asarray(prototypes),
      jnp.asarray(present),
      a,
      n,
      0.5,
    )
  )
  np.testing.assert_array_equal(has_anchors, [True, True, True, False, False])
  for c in np.flatnonzero(has_anchors):
    assert np.all(hard[anchor_index[c]]) and np.all(labels[anchor_index[c]] == c)
    negatives = negative_index[c].ravel()
    assert np.all(valid[negatives])  # only counted pixels
    assert np.all(labels[negatives] != c)  # never the anchor's class
    assert np.all(labels[negatives] == negative_class[c].ravel())
    assert set(np.unique(labels[negatives])) <= set(np.flatnonzero(present))
    # The class of each negative follows softmax_j(cos(P_c, P_j) / T) over the others.
    others = present & (np.arange(k) != c)
    cos = _np_normalise(prototypes) @ _np_normalise(prototypes[c])
    probs = np.where(others, np.exp(cos / 0.5), 0.0)
    probs /= probs.sum()
    freq = np.bincount(labels[negatives], minlength=k) / negatives.size
    np.testing.assert_allclose(freq, probs, atol=0.02)
  # Anchors are drawn uniformly over the class's hard pixels (with replacement).
  many = jax.jit(
    lambda key, labels, hard: contrastive.draw_pixels(
      key, contrastive.class_slots(labels, hard, k), jnp.zeros((20000,), jnp.int32)
    )
  )(jax.random.key(1), jnp.asarray(labels), jnp.asarray(hard))
  pool = np.flatnonzero(hard & (labels == 0))
  counts = np.bincount(np.asarray(many), minlength=len(labels))[pool]
  assert counts.sum() == 20000
  np.testing.assert_allclose(counts / 20000, 1 / len(pool), atol=0.3 / len(pool))


def test_class_draws_never_pick_a_class_of_zero_probability():
  probs = jnp.array(
    [
      [0.0, 0.5, 0.0, 0.5, 0.0],
      [0.0, 0.0, 0.0, 0.0, 0.0],
      [1.0, 0.0, 0.0, 0.0, 0.0],
      [0.0, 0.0, 0.0, 1e-8, 1.0 - 1e-8],
      [0.2, 0.2, 0.2, 0.2, 0.2],
    ]
  )
  drawn = np.asarray(
    jax.jit(contrastive.draw_classes, static_argnums=2)(jax.random.key(2), probs, (200, 100))
  )
  for c in (0, 2, 3, 4):
    assert np.all(np.asarray(probs)[c][drawn[c]] > 0), c
  assert set(np.unique(drawn[0])) == {1, 3}


def test_contrastive_loss_averages_over_present_classes_and_needs_two():
  labels, valid, hard, prototypes, present = _pixels()
  reps = np.random.default_rng(5).normal(size=(len(labels), 8)).astype(np.float32)
  loss, with_anchors = _contrastive_loss(
    jax.random.key(3),
    jnp.asarray(reps),
    jnp.asarray(labels),
    jnp.asarray(valid),
    jnp.asarray(hard),
    jnp.asarray(prototypes),
    jnp.asarray(present),
  )
  anchor_index, negative_index, _, has_anchors = _sample_pairs(
    jax.random.key(3),
    jnp.asarray(labels),
    jnp.asarray(valid),
    jnp.asarray(hard),
    jnp.asarray(prototypes),
    jnp.asarray(present),
    16,
    8,
    0.5,
  )
  anchor_index, negative_index = np.asarray(anchor_index), np.asarray(negative_index)
  terms = [
    _np_info_nce(reps[anchor_index[c]], prototypes[c], reps[negative_index[c]], 0.5)
    for c in np.flatnonzero(np.asarray(has_anchors))
  ]
  # Class 4 is present without hard anchors: it counts in the denominator (as in CSS).
  np.testing.assert_allclose(loss, np.sum(terms) / present.sum(), rtol=1e-5)
  assert int(with_anchors) == 3 and present.sum() == 4
  only_one = np.where(valid, 0, labels)
  loss, with_anchors = _contrastive_loss(
    jax.random.key(3),
    jnp.asarray(reps),
    jnp.asarray(only_one),
    jnp.asarray(valid),
    jnp.asarray(hard),
    jnp.asarray(prototypes),
    jnp.asarray(np.eye(5, dtype=bool)[0]),
  )
  assert float(loss) == 0.0 and int(with_anchors) == 0


# ---- the target hook ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(device_runs):
  """The step tests' model and its trained (1-device) variables: no extra initialiser."""
  (state, _, _), _ = device_runs
  config = step_config()
  model = segmenter.build_segmenter(config.model, 6, aux_heads=registry.required_heads(config))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return config, model, variables


VARIANTS = ((True, False), (True, True), (False, False))  # (cross_supervision, thresholded)


@pytest.fixture(scope="module")
def hook_outputs(tiny_model):
  """The target hook's output for each variant, from one compiled function, and the
  teacher's representation it saw."""
  config, model, variables = tiny_model
  rng = np.random.default_rng(6)
  n = 3
  images = jnp.asarray(rng.normal(size=(n, 32, 32, 3)).astype(np.float32))
  valid = jnp.asarray((rng.random((n, 32, 32)) > 0.2).astype(np.float32))
  logits = jnp.asarray(rng.normal(size=(n, 32, 32, 6)).astype(np.float32) * 3)
  pseudo, confidence = consistency.pseudo_labels(logits)
  before = method_base.Targets(
    pseudo=pseudo, confidence=confidence, weight=jnp.full_like(confidence, 0.5), logits=logits
  )
  cfgs = []
  for cross, thresholded in VARIANTS:
    cfg = config.losses.contrastive.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.cross_supervision, cfg.threshold_rep_labels = cross, thresholded
    cfgs.append(cfg)

  @jax.jit
  def hooks(variables, images, valid, targets):
    reps = model.apply(variables, images, train=False, method=contrastive._teacher_representation)
    # Prototypes near some of the teacher's own representations: confident labels exist.
    prototypes = jax.lax.stop_gradient(reps[:, ::3, ::3].reshape(-1, 8)[:6] * 2.0)
    aux = {"prototypes": prototypes, "initialised": jnp.ones((6,), bool)}
    ctx = objective_lib.TargetContext(
      config=config,
      model=model,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      teacher_variables=variables,
      weak_image=images,
      weak_valid=valid,
      targets=targets,
      rng=jax.random.key(0),
      step=jnp.zeros((), jnp.int32),
      num_classes=6,
    )
    outputs = [contrastive._targets(ctx, cfg, aux) for cfg in cfgs]
    # CSS's warm-up: logit-space labels first, then the representation's.
    warm = config.losses.contrastive.copy_and_resolve_references()
    with warm.unlocked():
      warm.warmup = 0.5
    for step in (0, config.total_steps - 1):
      outputs.append(
        contrastive._targets(dataclasses.replace(ctx, step=jnp.asarray(step, jnp.int32)), warm, aux)
      )
    return reps, prototypes, outputs

  reps, prototypes, outputs = jax.device_get(hooks(variables, images, valid, before))
  return (
    jax.device_get(before),
    np.asarray(valid),
    reps,
    prototypes,
    dict(zip(list(VARIANTS) + ["warm", "after_warm"], outputs)),
  )


@pytest.mark.parametrize("cross, thresholded", VARIANTS)
def test_target_hook_changes_exactly_the_unlabelled_targets_and_weights(
  hook_outputs, cross, thresholded
):
  before, v, reps, prototypes, outputs = hook_outputs
  after, metrics = outputs[(cross, thresholded)]
  n = v.shape[0]
  probs = _np_softmax(
    _np_bilinear(_np_normalise(reps) @ _np_normalise(prototypes).T, (32, 32)) / 0.1
  )
  rep_labels, rep_conf = probs.argmax(-1), probs.max(-1)
  threshold = step_config().losses.contrastive.rep_threshold
  share = [((rep_conf[i] >= threshold) & (v[i] > 0)).sum() / v[i].sum() for i in range(n)]
  assert 0 < min(share) and max(share) < 1  # the weights are live in this set-up
  np.testing.assert_allclose(
    metrics["agreement"], ((rep_labels == before.pseudo) * v).sum() / v.sum(), rtol=1e-5
  )
  np.testing.assert_array_equal(after.logits, before.logits)  # never touched
  if not cross:
    for field in ("pseudo", "confidence", "weight"):
      np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
    return
  np.testing.assert_array_equal(after.pseudo, rep_labels)
  np.testing.assert_allclose(
    after.weight, 0.5 * np.asarray(share)[:, None, None] * np.ones((n, 32, 32)), rtol=1e-5
  )
  if thresholded:
    np.testing.assert_allclose(after.confidence, rep_conf, rtol=1e-4, atol=1e-6)
  else:
    np.testing.assert_array_equal(after.confidence, 1.0)
  # The unlabelled CE then trains on the representation-space labels with those weights.
  student = np.random.default_rng(8).normal(size=(n, 32, 32, 6)).astype(np.float32)
  got = consistency.pseudo_label_loss(
    student, after.pseudo, after.confidence, v, 0.3, weight=after.weight
  )
  log_p = student - np.log(np.exp(student).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_p, rep_labels[..., None], -1)[..., 0]
  kept = (after.confidence >= 0.3) * v * after.weight
  np.testing.assert_allclose(got, (ce * kept).sum() / v.sum(), rtol=1e-5)


# ---- through the step: 1 vs 8 devices ------------------------------------------------------
# The step runs `method = "supervised"` (the labelled images alone): its one pass compiles in
# a fraction of a semi-supervised step's time, and the prototypes, the per-class means and
# the sampling are the same code whatever the pixels' source. The hook is checked above.


def _labelled_batches(count):
  config = tiny_config()
  spec = datasets.build(config.data)
  lab = pipeline.make_train_iterator(
    spec.train_source, spec.labelled_indices, batch_size=8, crop_size=32, seed=0, kind="labelled"
  )
  return [next(lab) for _ in range(count)]


STEP_OVERRIDES = {
  "losses.contrastive.enabled": True,
  "losses.contrastive.dim": 8,
  "losses.contrastive.num_anchors": 16,
  "losses.contrastive.num_negatives": 32,
  # Reachable confidences on 6 classes (the hook test's weights are live).
  "losses.contrastive.label_temperature": 0.1,
  "losses.contrastive.rep_threshold": 0.4,
}


def step_config():
  return tiny_config(total_steps=2, **STEP_OVERRIDES)


@pytest.fixture(scope="module")
def device_runs():
  # One labelled image per device on 8 devices: the per-class means and the sampling must be
  # over the global batch to agree.
  batches = _labelled_batches(2)
  return (
    run_steps(step_config(), jax.devices()[:1], batches),
    run_steps(step_config(), jax.devices(), batches),
  )


def test_prototypes_and_losses_same_on_one_and_eight_devices(device_runs):
  (s1, h1, _), (s8, h8, _) = device_runs
  a1, a8 = s1.aux["contrastive"], s8.aux["contrastive"]
  np.testing.assert_array_equal(a1["initialised"], a8["initialised"])
  np.testing.assert_allclose(a1["prototypes"], a8["prototypes"], rtol=1e-4, atol=1e-5)
  for m1, m8 in zip(h1, h8):
    for key in (
      "train/loss",
      "train/contrastive/loss_contrast",
      "train/contrastive/present_classes",
      "train/contrastive/anchor_classes",
      "train/contrastive/hard_fraction",
      "train/contrastive/prototype_norm",
    ):
      np.testing.assert_allclose(m1[key], m8[key], rtol=2e-4, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_step_trains_the_head_and_moves_the_prototypes(device_runs):
  (state, history, _), _ = device_runs
  aux = state.aux["contrastive"]
  assert aux["prototypes"].shape == (6, 8) and aux["initialised"].dtype == bool
  assert np.all(np.linalg.norm(aux["prototypes"][aux["initialised"]], axis=-1) > 0)
  assert "head_contrastive" in state.params and "head_contrastive" in state.batch_stats
  bn = state.batch_stats["head_contrastive"]["bn0"]["mean"]
  assert np.abs(bn).max() > 0  # the head ran in train mode
  first, second = history
  assert first["train/contrastive/loss_contrast"] > 0
  assert first["train/contrastive/present_classes"] >= 2
  # lambda(e) = exp(-5 (e/E)^2): 1 at step 0, exp(-5/4) at step 1 of 2.
  assert first["train/contrastive/ramp"] == 1.0
  assert second["train/contrastive/ramp"] == pytest.approx(np.exp(-1.25), rel=1e-6)
  np.testing.assert_allclose(
    second["train/contrastive/loss"],
    np.exp(-1.25) * second["train/contrastive/loss_contrast"],
    rtol=1e-5,
  )


# ---- checkpoints and pictures ---------------------------------------------------------------


def test_checkpoints_restore_prototypes_bit_exactly(device_runs, tmp_path):
  _, (state, _, _) = device_runs
  mesh = sharding.make_mesh(jax.devices())
  state = jax.device_put(state, sharding.replicated(mesh))
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1, iterator_names=())
  checkpointer.save(2, state, {})
  checkpointer.save_best(2, state, "eval/teacher_miou", 0.5)
  checkpointer.wait()
  # A template whose prototypes are a fresh run's (zeros, nothing initialised).
  template = state.replace(aux=jax.tree.map(jnp.zeros_like, state.aux))
  trained = jax.device_get(state.aux["contrastive"])
  assert np.abs(trained["prototypes"]).max() > 0 and trained["initialised"].any()
  for restored in (
    checkpointer.restore_latest(template, {}),
    checkpointer.restore_best(template),
  ):  # best/ keeps the objective state
    back = jax.device_get(restored.aux["contrastive"])
    for key in ("prototypes", "initialised"):
      assert back[key].dtype == trained[key].dtype
      np.testing.assert_array_equal(back[key], trained[key])
  checkpointer.close()


def test_pictures_show_the_representation_prediction_beside_the_logits(tiny_model):
  config, model, variables = tiny_model
  cfg = config.losses.contrastive
  rng = np.random.default_rng(7)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)).astype(np.float32))
  masks = jnp.asarray(rng.integers(0, 6, (2, 32, 32)).astype(np.uint8))
  prototypes = jnp.asarray(rng.normal(size=(6, 8)).astype(np.float32))
  with_aux = {**variables, "aux": {"contrastive": {"prototypes": prototypes}}}

  @jax.jit
  def panels_and_predictions(with_aux, images, masks):
    panels = contrastive._visualise(model, with_aux, images, masks, None, cfg)["contrastive"]
    logits, reps = model.apply(
      variables, images, train=False, method=contrastive._logits_and_representation
    )
    rep_labels, _ = contrastive.representation_labels(
      contrastive.cosine_to_prototypes(reps, prototypes), cfg.label_temperature, (32, 32)
    )
    return augment.denormalize_to_uint8(panels), jnp.argmax(logits, -1), rep_labels

  shown, logit_labels, rep_labels = jax.device_get(panels_and_predictions(with_aux, images, masks))
  assert shown.shape == (2, 4, 32, 32, 3)
  palette = viz.make_palette(6)
  np.testing.assert_array_equal(shown[:, 1], palette[np.asarray(masks)])
  np.testing.assert_array_equal(shown[:, 2], palette[logit_labels])
  np.testing.assert_array_equal(shown[:, 3], palette[rep_labels])
  assert not np.array_equal(logit_labels, rep_labels)  # two different predictions


# ---- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name",
  [
    "shapes_contrastive.py",
    "shapes_contrastive_imagenet.py",
    "voc_contrastive.py",
    "cityscapes_contrastive.py",
  ],
)
def test_contrastive_configs_validate(name):
  config = config_schema.sibling_config(os.path.join(REPO, "configs", "x.py"), name)
  with config.unlocked():
    config.data.root = config.data.root or "/data"  # VOC / Cityscapes need one
  config_schema.validate(config)
  assert [o.name for o, _ in registry.enabled(config)] == ["contrastive"]


@pytest.mark.parametrize(
  "key, value",
  [
    ("weight", -1.0),
    ("rampdown", -0.5),
    ("dim", 0),
    ("num_anchors", 0),
    ("num_negatives", -3),
    ("class_chunk", 0),
    ("strong_views", 3),
    ("rep_threshold", 1.5),
    ("weak_threshold", -0.1),
    ("anchor_threshold", 2.0),
    ("label_temperature", 0.0),
    ("temperature", -1.0),
    ("prototype_momentum", 1.0),
  ],
)
def test_bad_contrastive_values_name_the_key(key, value):
  config = tiny_config(method="fixmatch", **{"losses.contrastive.enabled": True})
  with config.unlocked():
    config.losses.contrastive[key] = value
  with pytest.raises(errors.ConfigError, match=rf"config\.losses\.contrastive\.{key}="):
    config_schema.validate(config)


def test_warmup_trains_on_logit_labels_first_then_on_the_representations(hook_outputs):
  before, v, _, _, outputs = hook_outputs
  (warm, warm_metrics), (after, after_metrics) = outputs["warm"], outputs["after_warm"]
  threshold = step_config().losses.contrastive.rep_threshold
  share = ((before.confidence >= threshold) * v).sum((1, 2)) / v.sum((1, 2))
  np.testing.assert_array_equal(warm.pseudo, before.pseudo)
  np.testing.assert_allclose(warm.weight, 0.5 * share[:, None, None] * np.ones_like(v), rtol=1e-5)
  assert warm_metrics["warmup"] == 1 and after_metrics["warmup"] == 0
  # After the warm-up: exactly the cross-supervised targets.
  plain, _ = outputs[(True, False)]
  for field in ("pseudo", "confidence", "weight"):
    np.testing.assert_array_equal(getattr(after, field), getattr(plain, field))
