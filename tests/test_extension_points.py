"""An objective written entirely in this file — its own projection head, aux state sized from
the feature width, a target hook that changes the pseudo-labels and an eval hook — trains,
checkpoints and evaluates through the ordinary loop with no edit anywhere else."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from s4jax import train
from s4jax.losses import objective as objective_lib
from s4jax.losses import registry
from s4jax.models import heads
from s4jax.methods import base as method_base
from tiny import tiny_config

PROJECTION = 8


def _heads(cfg):
  del cfg
  return (heads.HeadSpec("probe_projection", "projection", channels=PROJECTION),)


def _init_aux(cfg, num_classes, feature_widths):
  del cfg
  # Sized from what the segmenter reports, as CSS's K x D prototypes are.
  return {
    "class_means": jnp.zeros((num_classes, feature_widths["fused"]), jnp.float32),
    "updates": jnp.zeros((), jnp.int32),
  }


def _loss(ctx, cfg, aux):
  embedding = ctx.head("probe_projection", ctx.labelled_features, train=True)
  loss = cfg.weight * jnp.mean(jnp.square(embedding))
  labels = jax.image.resize(
    ctx.labelled_mask.astype(jnp.float32), ctx.labelled_features.shape[:3], "nearest"
  ).astype(jnp.int32)
  one_hot = jax.nn.one_hot(labels, ctx.num_classes)  # ignore -> zeros
  sums = jnp.einsum("nhwk,nhwc->kc", one_hot, ctx.labelled_features.astype(jnp.float32))
  counts = one_hot.sum(axis=(0, 1, 2))[:, None]
  means = jax.lax.stop_gradient(sums / jnp.maximum(counts, 1.0))
  new_aux = {
    "class_means": jnp.where(counts > 0, means, aux["class_means"]),
    "updates": aux["updates"] + 1,
  }
  return loss, {"loss": loss}, new_aux


def _targets(ctx, cfg, aux):
  del aux
  # Every weak-view pixel becomes a fully confident `cfg.label`, at half weight.
  t = ctx.targets
  new = method_base.Targets(
    pseudo=jnp.full_like(t.pseudo, cfg.label),
    confidence=jnp.ones_like(t.confidence),
    weight=0.5 * t.weight,
    logits=t.logits,
  )
  changed = jnp.mean((t.pseudo != cfg.label).astype(jnp.float32))
  return new, {"changed": changed}


def _refine_eval(model, variables, images, logits, cfg):
  del model, variables, images
  return logits.at[..., cfg.label].add(1e4)  # evaluation then predicts `label` everywhere


PROBE = objective_lib.Objective(
  name="probe",
  heads=_heads,
  loss=_loss,
  init_aux=_init_aux,
  targets=_targets,
  refine_eval=_refine_eval,
)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
  registry.register(PROBE)
  config = tiny_config(
    method="fixmatch",
    total_steps=2,
    log_every=1,
    eval_every=2,
    checkpoint_every=2,
    num_visualised=0,
  )
  config.unlock()
  config.losses.probe = ml_collections.ConfigDict({"enabled": True, "weight": 0.1, "label": 1})
  config.lock()
  workdir = str(tmp_path_factory.mktemp("probe"))
  try:
    results = train.train_and_evaluate(config, workdir)
    run = train.Run(config, workdir, training=False)
    restored = run.restore_saved("latest")
    # The prediction grids' predictions (and s4jax.predict's, through the same function).
    shown = run.predict(restored.student_variables(), run.first_eval_batch()["image"])
    results = {**results, "grid_prediction": np.asarray(jax.device_get(shown))}
  finally:
    registry.unregister("probe")
  return config, results, restored, workdir


def test_outside_objective_trains_its_head_and_state(probe_run):
  _, results, _, _ = probe_run
  state = results["state"]
  assert "head_probe_projection" in state.params
  # The head's BatchNorm ran in train mode: its running statistics moved off the init.
  assert "head_probe_projection" in state.batch_stats
  bn = jax.device_get(state.batch_stats["head_probe_projection"]["bn0"]["mean"])
  assert np.abs(bn).max() > 0
  aux = jax.device_get(state.aux["probe"])
  assert aux["class_means"].shape == (6, 16)  # K x the decoder width of tiny_config
  assert int(aux["updates"]) == 2 and np.abs(aux["class_means"]).max() > 0


def test_outside_objective_state_is_checkpointed_exactly(probe_run):
  _, results, restored, _ = probe_run
  for a, b in zip(
    jax.tree.leaves(jax.device_get(results["state"].aux)),
    jax.tree.leaves(jax.device_get(restored.aux)),
  ):
    np.testing.assert_array_equal(a, b)


def test_target_hook_changes_what_the_unlabelled_loss_trains_on(probe_run):
  from s4jax import logs

  _, _, _, workdir = probe_run
  rows = [r for r in logs.read_metrics(f"{workdir}/metrics.jsonl") if "train/loss" in r]
  assert len(rows) == 2
  # The hook made every pixel confident: the diagnostics see its targets, not the teacher's.
  assert all(r["train/confident_fraction"] == pytest.approx(1.0) for r in rows)
  assert all(r["train/probe/changed"] > 0 for r in rows)


def test_eval_hook_decides_what_evaluation_scores(probe_run):
  _, results, _, _ = probe_run
  # The pictures show what evaluation scores: the hook's class 1 everywhere.
  assert (results["grid_prediction"] == 1).all()
  # Every pixel predicted as class 1: every other class has IoU 0, class 1 is its share.
  iou = {k: v for k, v in results.items() if k.startswith("eval/teacher_iou/")}
  assert iou, results.keys()
  positive = [k for k in sorted(iou) if iou[k] > 0]
  assert positive == ["eval/teacher_iou/ellipse"]  # class 1 of shapes
