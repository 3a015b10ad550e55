"""Mix-and-Match patch triplets (docs/methods.md §3): the patch sampler's statistics, the
graph, the loss and box pooling against NumPy, one graph over 1 vs 8 devices, the tuning
mode's step (where gradients go) and backbone file, the picture, and config checks."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from s4jax import augment
from s4jax import config_schema
from s4jax import errors
from s4jax import optim
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax import viz
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.losses import objective as objective_lib
from s4jax.losses import registry
from s4jax.losses import triplet
from s4jax.models import convert
from s4jax.models import segmenter
from tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  cfg = config_schema.default_config().losses.triplet.copy_and_resolve_references()
  with cfg.unlocked():
    for key, value in overrides.items():
      cfg[key] = value
  return cfg


def _sample(key, labels, cfg=None, background=(0,)):
  """The sampler, compiled (eager vmap-of-scan is slow)."""
  cfg = cfg or _cfg()
  return jax.device_get(
    jax.jit(lambda k, y: triplet.sample_patches(k, y, cfg, background))(key, jnp.asarray(labels))
  )


def _scene(size=64):
  """Background 0, two objects (classes 1, 2) and an ignore band along the bottom."""
  labels = np.zeros((size, size), np.int32)
  labels[8:30, 6:40] = 1
  labels[28:52, 30:60] = 2
  labels[size - 6 :] = 255
  return labels


# ---- the sampler ---------------------------------------------------------------------------


def _np_overlap_rule(candidates, height, width, max_covered):
  union = np.zeros((height, width), bool)
  passed = []
  for y0, x0, y1, x1 in candidates:
    area = max((y1 - y0) * (x1 - x0), 1)
    ok = np.float32(union[y0:y1, x0:x1].sum()) / np.float32(area) <= np.float32(max_covered)
    if ok:
      union[y0:y1, x0:x1] = True
    passed.append(ok)
  return np.array(passed)


@pytest.fixture(scope="module")
def many_draws():
  draws = 256
  labels = np.broadcast_to(_scene(), (draws, 64, 64))
  cfg = _cfg()
  return labels, cfg, _sample(jax.random.key(0), labels, cfg)


def test_sampler_counts_labels_and_background_share(many_draws):
  labels, _, out = many_draws
  assert out["boxes"].shape == (256, 9, 4) and out["labels"].shape == (256, 9)
  centres = out["centres"]
  centre_labels = labels[0][centres[..., 0], centres[..., 1]]
  np.testing.assert_array_equal(out["labels"], centre_labels)
  # max(1, int(0.1 * 9)) = 1 patch per image on background, the other 8 on objects.
  np.testing.assert_array_equal(out["background"].sum(1), 1)
  assert np.all(out["labels"][out["background"]] == 0)
  assert np.all(np.isin(out["labels"][~out["background"]], (1, 2)))
  # Centres never on ignore; both object classes are drawn in proportion to their area.
  assert not np.any(out["labels"] == 255)
  area = {c: (labels[0] == c).sum() for c in (1, 2)}
  share = (out["labels"][~out["background"]] == 1).mean()
  assert share == pytest.approx(area[1] / (area[1] + area[2]), abs=0.04)
  # Every box holds its centre pixel and lies in the crop.
  boxes = out["boxes"]
  assert np.all((boxes[..., 0] <= centres[..., 0]) & (centres[..., 0] < boxes[..., 2]))
  assert np.all((boxes[..., 1] <= centres[..., 1]) & (centres[..., 1] < boxes[..., 3]))
  assert boxes.min() >= 0 and boxes.max() <= 64


def test_sampler_sides_cover_the_scaled_range(many_draws):
  _, _, out = many_draws
  sides = out["sides"]
  # 64-256 px on 512 crops, scaled to the 64-px crop: 8-32 px, uniform (mean 20).
  assert sides.min() == 8 and sides.max() == 32
  assert sides.mean() == pytest.approx(20, abs=0.5)
  assert np.abs(np.histogram(sides, bins=4, range=(8, 33))[0] / sides.size - 0.25).max() < 0.03
  # Boxes are square, centred on their centre pixel, clipped to the crop.
  half = sides // 2
  for axis in (0, 1):
    start = out["centres"][..., axis] - half
    np.testing.assert_array_equal(out["boxes"][..., axis], np.clip(start, 0, 64))
    np.testing.assert_array_equal(out["boxes"][..., axis + 2], np.clip(start + sides, 0, 64))


def test_sampler_overlap_rule_and_refill_match_numpy(many_draws):
  _, cfg, out = many_draws
  refilled = 0
  for i in range(out["candidates"].shape[0]):
    want = _np_overlap_rule(out["candidates"][i], 64, 64, cfg.max_covered)
    np.testing.assert_array_equal(out["candidate_passed"][i], want)
    # The object patches: those that passed in draw order, then rejected ones in order.
    order = list(np.flatnonzero(want)) + list(np.flatnonzero(~want))
    np.testing.assert_array_equal(out["boxes"][i, :8], out["candidates"][i][order[:8]])
    np.testing.assert_array_equal(out["passed"][i, :8], want[order[:8]])
    refilled += int((~want[order[:8]]).sum())
  # The rule bites on this crowded scene (some candidates rejected) without emptying it.
  assert 0 < (~out["candidate_passed"]).mean() < 0.9
  assert refilled < 0.5 * 8 * out["candidates"].shape[0]


def test_fixed_side():
  sides = _sample(jax.random.key(1), np.zeros((4, 64, 64), np.int32), _cfg(fixed_side=128))["sides"]
  np.testing.assert_array_equal(sides, 16)  # 128 paper px on a 64-px crop
  # On VOC's 321 crop the default range becomes 40-160 px.
  assert triplet.side_range_pixels(_cfg(), 321) == (64, 256, 321 / 512)
  assert round(64 * 321 / 512) == 40 and round(256 * 321 / 512) == 160


def test_sampler_fallbacks_and_ignore_is_dropped():
  labels = np.zeros((4, 32, 32), np.int32)  # image 0: background only
  labels[1] = 3  # image 1: objects only
  labels[2] = 255  # image 2: nothing labelled
  labels[3] = 4  # image 3: two background classes (Cityscapes'
  labels[3, :, 16:] = 7  # stuff), no object
  out = _sample(jax.random.key(2), labels, background=(0, 4, 7))
  np.testing.assert_array_equal(out["labels"][0], 0)  # object patches fall back to bg
  np.testing.assert_array_equal(out["labels"][1], 3)  # the bg patch falls back to objects
  np.testing.assert_array_equal(out["labels"][2], 255)  # dropped
  assert set(np.unique(out["labels"][3])) == {4, 7}


# ---- the graph -----------------------------------------------------------------------------


def _find(parent, i):
  while parent[i] != i:
    i = parent[i]
  return i


@pytest.mark.parametrize("seed", range(4))
def test_graph_is_one_tree_per_class_and_never_links_ignore(seed):
  rng = np.random.default_rng(seed)
  labels = rng.choice([0, 1, 2, 5, 255], size=40, p=[0.3, 0.3, 0.15, 0.05, 0.2])
  labels[0], labels[1] = 7, 255  # class 7 has one node only
  g = jax.device_get(triplet.build_graph(jax.random.key(seed), jnp.asarray(labels)))
  order, pos, neg = g["order"], g["positive"], g["negative"]
  assert sorted(order) == list(range(40))
  node = labels != 255
  # Ignore nodes have no partner and are nobody's partner.
  assert not g["has_positive"][~node].any() and not g["has_negative"][~node].any()
  assert node[pos[g["has_positive"]]].all() and node[neg[g["has_negative"]]].all()
  assert not g["has_positive"][0]  # a class of one node: no positive
  for c in set(labels[node]):
    members = np.flatnonzero(labels == c)
    root = members[np.argmin(order[members])]
    parent = {int(i): int(i) for i in members}
    for i in members:
      if len(members) == 1:
        continue
      assert g["has_positive"][i] and labels[pos[i]] == c and pos[i] != i
      if i != root:  # every later node links to an earlier node of its class
        assert order[pos[i]] < order[i]
        parent[_find(parent, int(i))] = _find(parent, int(pos[i]))
    # Those links form one tree (n - 1 edges, all earlier: acyclic) spanning the class.
    assert len({_find(parent, int(i)) for i in members}) == 1
  for i in np.flatnonzero(node):
    assert g["has_negative"][i] and labels[neg[i]] != labels[i]
    earlier_other = node & (labels != labels[i]) & (order < order[i])
    if earlier_other.any():
      assert order[neg[i]] < order[i]


def test_graph_partners_are_drawn_uniformly():
  labels = jnp.asarray(np.array([0] * 6 + [1] * 2))
  keys = jax.random.split(jax.random.key(5), 2400)
  g = jax.device_get(jax.jit(jax.vmap(lambda k: triplet.build_graph(k, labels)))(keys))
  # The node of class 0 visited last may link to any of the 5 others, equally often.
  last = np.array([np.flatnonzero(o[:6] == o[:6].max())[0] for o in g["order"]])
  picks = g["positive"][np.arange(2400), last]
  counts = np.array([np.sum(picks[last == j] == k) for j in range(6) for k in range(6) if j != k])
  assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
  # One class only: no negatives anywhere.
  g = jax.device_get(triplet.build_graph(jax.random.key(0), jnp.zeros((5,), jnp.int32)))
  assert not g["has_negative"].any() and g["has_positive"].all()


# ---- the loss and the embeddings -----------------------------------------------------------


def test_triplet_loss_matches_numpy():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(12, 5)).astype(np.float32)
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  pos, neg = rng.integers(0, 12, 12), rng.integers(0, 12, 12)
  mask = rng.random(12) > 0.3
  loss, parts = triplet.triplet_loss(jnp.asarray(e), pos, neg, mask, 2.1)
  d_pos = ((e - e[pos]) ** 2).sum(-1)
  d_neg = ((e - e[neg]) ** 2).sum(-1)
  hinge = np.maximum(0.0, 2.1 + d_pos - d_neg)
  np.testing.assert_allclose(loss, hinge[mask].sum() / (2 * mask.sum()), rtol=1e-5)
  np.testing.assert_allclose(parts["hinge"], hinge, rtol=1e-5, atol=1e-6)
  # The hinge is live: a small margin switches some anchors off.
  small, parts = triplet.triplet_loss(jnp.asarray(e), pos, neg, mask, 0.1)
  assert 0 < float(small) < float(loss) and (np.asarray(parts["hinge"])[mask] == 0).any()
  assert float(triplet.triplet_loss(jnp.asarray(e), pos, neg, np.zeros(12, bool), 2.1)[0]) == 0


def test_box_pool_matches_numpy():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)  # stride 4 on 16 x 16 images
  boxes = np.array(
    [[[0, 0, 16, 16], [1, 2, 3, 5], [5, 6, 14, 9]], [[4, 4, 8, 8], [10, 0, 16, 3], [0, 13, 2, 16]]],
    np.int32,
  )
  got = np.asarray(triplet.box_pool(jnp.asarray(feats), jnp.asarray(boxes), (16, 16)))
  pixels = feats.repeat(4, axis=1).repeat(4, axis=2)  # each pixel's feature cell
  for n in range(2):
    for p in range(3):
      y0, x0, y1, x1 = boxes[n, p]
      np.testing.assert_allclose(
        got[n, p], pixels[n, y0:y1, x0:x1].mean((0, 1)), rtol=1e-5, atol=1e-6
      )
  unit = np.asarray(triplet.l2_normalise(jnp.asarray(got)))
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)


# ---- a tiny model: gradients, one graph over 1 vs 8 devices, tuning mode -----------------


@pytest.fixture(scope="module")
def tiny():
  """Tuning mode (method "supervised", triplet alone, SGD without decay) on a tiny model:
  the initial state and the state after one step; the other tests reuse the model."""
  config = tiny_config(
    **{"optim.weight_decay": 0.0, "losses.triplet.enabled": True, "losses.triplet.only": True}
  )
  spec = datasets.build(config.data)
  batch = next(
    pipeline.make_train_iterator(
      spec.train_source, spec.labelled_indices, batch_size=8, crop_size=32, seed=0, kind="labelled"
    )
  )
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = segmenter.build_segmenter(config.model, 6, aux_heads=registry.required_heads(config))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state = state_lib.init_on_mesh(
    model,
    tx,
    mesh,
    (1, 32, 32, 3),
    seed=0,
    aux=registry.init_aux(config, 6, segmenter.feature_widths(model)),
  )
  init = jax.device_get(state)
  step = step_lib.make_train_step(model, tx, config, mesh)
  final, metrics = step(state, sharding.host_to_global(batch, mesh))
  return config, model, init, jax.device_get(final), jax.device_get(metrics)


def _semi_config():
  return tiny_config(
    method="fixmatch",
    **{"losses.triplet.enabled": True, "losses.triplet.on_unlabelled": True, "semi.threshold": 0.5},
  )


def _triplet_loss_fn(config, model, batch_stats):
  """(params, inputs) -> (weighted loss, metrics): the objective on given feature maps."""

  def fn(params, x):
    labelled = objective_lib.Features(low=None, high=x["high_l"], fused=None)
    weak = objective_lib.Features(low=None, high=x["high_u"], fused=None)
    ctx = objective_lib.StepContext(
      config=config,
      model=model,
      params=params,
      batch_stats=batch_stats,
      rng=jax.random.key(1),
      step=jnp.zeros((), jnp.int32),
      num_classes=4,
      background_classes=(0,),
      labelled_image=x["image"],
      labelled_mask=x["mask"],
      labelled_features=None,
      weak_image=x["image"],
      weak_valid=x["valid"],
      pseudo=x["pseudo"],
      confidence=x["confidence"],
      features={"labelled": labelled, "weak": weak},
    )
    loss, metrics, _ = triplet.OBJECTIVE.loss(ctx, config.losses.triplet, {})
    return loss, metrics

  return fn


def _inputs(params, n=8, seed=0):
  """Random stride-16 encoder maps of 32-px crops and block-wise class maps."""
  rng = np.random.default_rng(seed)
  width = params["head_triplet"]["conv0"]["kernel"].shape[2]
  blocks = lambda: np.kron(rng.integers(0, 4, (n, 2, 2)), np.ones((1, 16, 16), np.int64))
  return {
    "image": jnp.zeros((n, 32, 32, 3)),
    "mask": jnp.asarray(blocks().astype(np.uint8)),
    "pseudo": jnp.asarray(blocks().astype(np.int32)),
    "confidence": jnp.asarray(rng.random((n, 32, 32)).astype(np.float32)),
    "valid": jnp.ones((n, 32, 32), jnp.float32),
    "high_l": jnp.asarray(rng.normal(size=(n, 2, 2, width)).astype(np.float32)),
    "high_u": jnp.asarray(rng.normal(size=(n, 2, 2, width)).astype(np.float32)),
  }


def _on_devices(devices, fn, params, x):
  mesh = sharding.make_mesh(devices)
  put = lambda t: jax.device_put(t, sharding.batch_sharded(mesh))  # noqa: E731
  rep = lambda t: jax.device_put(t, sharding.replicated(mesh))  # noqa: E731
  loss = jax.jit(fn, out_shardings=sharding.replicated(mesh))
  return jax.device_get(loss(rep(params), jax.tree.map(put, x)))


def test_one_graph_over_the_global_batch_same_on_one_and_eight_devices(tiny):
  # One labelled and one unlabelled image per device on 8 devices: per-device graphs of 18
  # patches would give another loss than the global one of 144.
  _, model, init, _, _ = tiny
  fn = _triplet_loss_fn(_semi_config(), model, init.batch_stats)
  x = _inputs(init.params)
  one = _on_devices(jax.devices()[:1], fn, init.params, x)
  eight = _on_devices(jax.devices(), fn, init.params, x)
  metrics = one[1]
  assert metrics["patches_labelled"] == 72 and 0 < metrics["patches_unlabelled"] <= 72
  assert metrics["triplets"] > 100 and one[0] > 0
  # Same patches, same graph, same head BatchNorm statistics: the same loss and metrics.
  np.testing.assert_allclose(one[0], eight[0], rtol=1e-5)
  for key in metrics:
    np.testing.assert_allclose(one[1][key], eight[1][key], rtol=1e-5, err_msg=key)
  # The same graph built per device (8 graphs of 18 nodes) gives another loss.
  labels = np.arange(16 * 9) % 4
  whole = jax.device_get(triplet.build_graph(jax.random.key(0), jnp.asarray(labels)))
  crossing = (whole["positive"] // 18) != (np.arange(144) // 18)
  assert crossing.mean() > 0.5


def test_tuning_mode_trains_on_the_triplet_loss_alone(tiny):
  _, _, init, final, metrics = tiny
  # The supervised loss is computed and logged, not trained on.
  assert metrics["train/loss_sup"] > 0 and metrics["train/triplet/loss"] > 0
  assert metrics["train/loss"] == pytest.approx(metrics["train/triplet/loss"], rel=1e-6)

  # Gradients reach the projection head and the whole backbone (SGD without weight decay:
  # only a gradient moves a parameter); the decoder (features="high") stays at its init.
  def moved(tree_a, tree_b):
    return max(
      float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))
    )

  for part in ("head_triplet", "backbone"):
    assert moved(init.params[part], final.params[part]) > 0, part
  for layer in ("conv1", "layer1_0", "layer4_1"):
    assert moved(init.params["backbone"][layer], final.params["backbone"][layer]) > 0, layer
  assert moved(init.params["decoder"], final.params["decoder"]) == 0


def test_a_train_mode_head_keeps_the_networks_running_statistics(tiny):
  # The triplet head runs in train mode (its BatchNorm records statistics). The step must
  # keep the base passes' update of the backbone's and decoder's running statistics too: a
  # head once merged the whole collection as it was before the step over them, so the
  # network's statistics never left their initial values and evaluation collapsed.
  _, _, init, final, _ = tiny
  assert set(final.batch_stats) == set(init.batch_stats) >= {"backbone", "decoder", "head_triplet"}
  for part in ("backbone", "decoder", "head_triplet"):
    before = jax.tree_util.tree_flatten_with_path(init.batch_stats[part])[0]
    after = jax.tree.leaves(final.batch_stats[part])
    for (path, a), b in zip(before, after):
      assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0, (
        part,
        jax.tree_util.keystr(path),
      )


def test_tuned_backbone_file_starts_the_segmentation_stage(tiny, tmp_path):
  _, _, init, final, _ = tiny
  # What export_backbone writes (its own tests cover reading a checkpoint) and what
  # model.pretrained reads.
  path = str(tmp_path / "backbone.npz")
  np.savez(path, **convert.flax_to_torch(final.params["backbone"], final.batch_stats["backbone"]))
  params, stats = convert.load_backbone(path, init.params, init.batch_stats)
  for a, b in zip(
    jax.tree.leaves((params["backbone"], stats["backbone"])),
    jax.tree.leaves((final.params["backbone"], final.batch_stats["backbone"])),
  ):
    np.testing.assert_array_equal(a, b)
  assert "export_backbone" in open(os.path.join(REPO, "configs", "shapes_triplet_tuning.py")).read()


def test_visualise_draws_patches_and_edges(tiny):
  config, model, _, _, _ = tiny
  images = jnp.zeros((2, 64, 64, 3))
  masks = jnp.asarray(np.broadcast_to(_scene(), (2, 64, 64)).astype(np.uint8))
  draw = jax.jit(
    lambda i, m, k: triplet.OBJECTIVE.visualise(model, None, i, m, k, config.losses.triplet)
  )
  panels = np.asarray(draw(images, masks, jax.random.key(0))["triplet"])
  assert panels.shape == (2, 3, 64, 64, 3)
  np.testing.assert_array_equal(panels[:, 0], 0)  # the input, untouched
  drawn = np.abs(panels[:, 1:]).sum(-1) > 0
  assert 0.02 < drawn.mean() < 0.8  # outlines and edges, not fills
  palette = np.asarray(augment.normalize(viz.make_palette(6)[:3] / 255.0))
  for c in (1, 2):  # both object classes' colours appear
    assert np.any(np.all(np.isclose(panels[:, 1], palette[c], atol=1e-5), -1))
  assert not np.array_equal(panels[:, 1], panels[:, 2])  # trees vs negative edges


# ---- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name",
  ["shapes_triplet.py", "shapes_triplet_tuning.py", "voc_triplet.py", "voc_triplet_tuning.py"],
)
def test_triplet_configs_validate(name):
  config = config_schema.sibling_config(os.path.join(REPO, "configs", "x.py"), name)
  with config.unlocked():
    config.data.root = config.data.root or "/data"
  config_schema.validate(config)
  assert [o.name for o, _ in registry.enabled(config)] == ["triplet"]
  assert config.losses.triplet.only == name.endswith("_tuning.py")


@pytest.mark.parametrize(
  "key, value",
  [
    ("losses.triplet.weight", 0.0),
    ("losses.triplet.patches_per_image", 1),
    ("losses.triplet.background_share", 1.0),
    ("losses.triplet.side_range", (64, 32)),
    ("losses.triplet.fixed_side", -1),
    ("losses.triplet.max_covered", 0.0),
    ("losses.triplet.candidates_per_patch", 0),
    ("losses.triplet.margin", 0.0),
    ("losses.triplet.features", "logits"),
    ("losses.triplet.embedding_dim", 0),
    ("losses.triplet.only", True),
    ("losses.triplet.background_classes", (-1,)),
  ],
)
def test_bad_triplet_values_name_the_key(key, value):
  config = tiny_config(method="fixmatch", **{"losses.triplet.enabled": True, key: value})
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}="):
    config_schema.validate(config)


def test_unlabelled_patches_need_a_semi_supervised_method():
  config = tiny_config(**{"losses.triplet.enabled": True, "losses.triplet.on_unlabelled": True})
  with pytest.raises(errors.ConfigError, match=r"config\.losses\.triplet\.on_unlabelled="):
    config_schema.validate(config)
  config_schema.validate(
    tiny_config(**{"losses.triplet.enabled": True, "losses.triplet.only": True})
  )


def test_config_block_is_plain_data():
  block = config_schema.default_config().losses.triplet
  assert isinstance(block, ml_collections.ConfigDict) and block.enabled is False
