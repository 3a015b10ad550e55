"""The sharded train step, the EMA teacher, checkpoint/resume and the loop's guards."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from s4jax import checkpointing
from s4jax import config_schema
from s4jax import optim
from s4jax import state as state_lib
from s4jax import train
from s4jax import workdir as workdir_lib
from s4jax import errors
from s4jax.data import datasets
from s4jax.data import pipeline
from s4jax.models import segmenter
from tiny import run_steps, tiny_config


def _tree_allclose(a, b, rtol, atol):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  worst = 0.0
  for x, y in zip(flat_a, flat_b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
    worst = max(worst, float(np.max(np.abs(x - y))) if x.size else 0.0)
  return worst


def _run_steps(config, devices, batches):
  state, history, _ = run_steps(config, devices, batches)
  return state, [float(m["train/loss"]) for m in history]


@pytest.fixture(scope="module")
def labelled_batches():
  config = tiny_config()
  spec = datasets.build(config.data)
  it = pipeline.make_train_iterator(
    spec.train_source, spec.labelled_indices, batch_size=8, crop_size=32, seed=0, kind="labelled"
  )
  return [next(it) for _ in range(2)]


def test_train_step_same_on_one_and_eight_devices(labelled_batches):
  assert jax.device_count() == 8
  config = tiny_config()
  one, losses_one = _run_steps(config, jax.devices()[:1], labelled_batches)
  eight, losses_eight = _run_steps(config, jax.devices(), labelled_batches)
  np.testing.assert_allclose(losses_one, losses_eight, rtol=1e-5)
  _tree_allclose(one.params, eight.params, rtol=1e-4, atol=1e-6)
  # BatchNorm statistics are over the global batch on 8 devices too (like SyncBN).
  _tree_allclose(one.batch_stats, eight.batch_stats, rtol=1e-4, atol=1e-6)
  assert int(one.step) == int(eight.step) == 2
  # The step really trained: parameters moved and the loss is finite.
  assert all(np.isfinite(losses_one))


def test_ema_decay_warmup_and_update_arithmetic():
  assert float(state_lib.ema_decay_at(0, 0.99)) == 0.0
  np.testing.assert_allclose(float(state_lib.ema_decay_at(1, 0.99)), 0.5)
  np.testing.assert_allclose(float(state_lib.ema_decay_at(9, 0.99)), 0.9)
  np.testing.assert_allclose(float(state_lib.ema_decay_at(10_000, 0.99)), 0.99)
  assert float(state_lib.ema_decay_at(5, 0.0)) == 0.0
  teacher = {"w": np.array([1.0, 2.0])}
  student = {"w": np.array([3.0, 6.0])}
  out = state_lib.ema_update(teacher, student, 0.75)
  np.testing.assert_allclose(out["w"], 0.75 * teacher["w"] + 0.25 * student["w"])


def test_teacher_follows_student_after_first_step(labelled_batches):
  config = tiny_config()
  state, _ = _run_steps(config, jax.devices()[:1], labelled_batches[:1])
  # d_0 = 0: after the first update the teacher equals the student exactly.
  _tree_allclose(state.ema_params, state.params, rtol=0, atol=0)


def test_sgd_matches_torch_semantics():
  """Weight decay before momentum, head lr x multiplier, poly decay (torch SGD)."""
  config = tiny_config(
    **{
      "optim.lr": 0.1,
      "optim.weight_decay": 0.01,
      "optim.momentum": 0.9,
      "optim.head_lr_multiplier": 10.0,
      "optim.poly_power": 1.0,
    }
  )
  tx = optim.make_optimizer(config.optim, total_steps=10)
  params = {"backbone": {"w": np.array([1.0])}, "decoder": {"w": np.array([1.0])}}
  grads = {"backbone": {"w": np.array([0.5])}, "decoder": {"w": np.array([0.5])}}
  opt_state = tx.init(params)
  expected = {"backbone": 1.0, "decoder": 1.0}
  buffers = {"backbone": 0.0, "decoder": 0.0}
  for t in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for group, mult in (("backbone", 1.0), ("decoder", 10.0)):
      lr = 0.1 * (1 - t / 10) * mult
      d = 0.5 + 0.01 * expected[group]
      buffers[group] = 0.9 * buffers[group] + d
      expected[group] -= lr * buffers[group]
  for group in expected:
    np.testing.assert_allclose(float(params[group]["w"][0]), expected[group], rtol=1e-5)


def test_adamw_matches_torch_semantics():
  """Decoupled weight decay scaled by the lr (torch AdamW), head lr x multiplier, poly decay."""
  config = tiny_config(
    **{
      "optim.name": "adamw",
      "optim.lr": 0.1,
      "optim.weight_decay": 0.01,
      "optim.momentum": 0.9,
      "optim.adam_b2": 0.99,
      "optim.head_lr_multiplier": 10.0,
      "optim.poly_power": 1.0,
    }
  )
  tx = optim.make_optimizer(config.optim, total_steps=10)
  grad_values = [0.5, -0.2, 0.3]
  params = {"backbone": {"w": np.array([1.0])}, "decoder": {"w": np.array([1.0])}}
  opt_state = tx.init(params)
  expected = {"backbone": 1.0, "decoder": 1.0}
  m = v = 0.0
  for t, g in enumerate(grad_values):
    grads = {"backbone": {"w": np.array([g])}, "decoder": {"w": np.array([g])}}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    m = 0.9 * m + 0.1 * g
    v = 0.99 * v + 0.01 * g * g
    m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.99 ** (t + 1))
    for group, mult in (("backbone", 1.0), ("decoder", 10.0)):
      lr = 0.1 * (1 - t / 10) * mult
      expected[group] -= lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.01 * expected[group])
  for group in expected:
    np.testing.assert_allclose(float(params[group]["w"][0]), expected[group], rtol=1e-5)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  results = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_loop_writes_metrics_images_checkpoints(straight_run):
  workdir, results = straight_run
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all("step" in r for r in records)
  train_steps = [r["step"] for r in records if "train/loss_sup" in r]
  assert train_steps == [2, 4]
  evals = [r for r in records if "eval/teacher_miou" in r]
  assert len(evals) == 1 and evals[0]["step"] == 4
  assert 0.0 <= evals[0]["eval/student_miou"] <= 1.0
  assert results["best"]["step"] == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert any(f.startswith("predictions_") for f in os.listdir(os.path.join(workdir, "images")))
  assert any(
    f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard"))
  )
  # The parameter table counts every student parameter.
  table = open(os.path.join(workdir, "parameters.txt")).read()
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(results["state"].params))
  assert f"Total: {count:,}" in table and "backbone" in table


def test_resume_equals_straight_run(straight_run, tmp_path):
  workdir, results = straight_run
  resumed_dir = str(tmp_path / "resumed")
  first = train.train_and_evaluate(tiny_config(), resumed_dir, stop_after=2)
  assert int(first["state"].step) == 2
  second = train.train_and_evaluate(tiny_config(), resumed_dir)
  assert int(second["state"].step) == 4
  _tree_allclose(results["state"].params, second["state"].params, rtol=1e-6, atol=1e-7)
  _tree_allclose(results["state"].ema_params, second["state"].ema_params, rtol=1e-6, atol=1e-7)
  # The data iterators stand at the same position: the same batches were consumed.
  state_file = os.path.join("checkpoints", "4", "data_labelled", "process_0-of-1.json")
  with (
    open(os.path.join(workdir, state_file)) as a,
    open(os.path.join(resumed_dir, state_file)) as b,
  ):
    assert json.load(a) == json.load(b)
  # Running again on a finished workdir trains nothing more.
  again = train.train_and_evaluate(tiny_config(), resumed_dir)
  assert int(again["state"].step) == 4


def test_workdir_with_other_config_is_refused_and_kept(straight_run):
  workdir, _ = straight_run
  before = sorted(os.listdir(workdir))
  with pytest.raises(errors.WorkdirConflictError, match="model.width"):
    train.train_and_evaluate(tiny_config(**{"model.width": 16}), workdir)
  assert sorted(os.listdir(workdir)) == before


def test_keys_added_later_count_as_their_default_when_resuming():
  new = workdir_lib.config_as_dict(tiny_config())
  # A run recorded before data.shapes existed: the same experiment if the new keys keep
  # their defaults, a different one if they do not.
  old = json.loads(json.dumps(new))
  del old["data"]["shapes"]
  assert workdir_lib.differing_keys(old, new) == []
  changed = workdir_lib.config_as_dict(tiny_config(**{"data.shapes.max_rotation": 0.0}))
  assert workdir_lib.differing_keys(old, changed) == ["data.shapes.max_rotation"]
  # A key that no version knows still differs.
  old["mystery"] = 1
  assert workdir_lib.differing_keys(old, new) == ["mystery"]


def test_settings_of_an_objective_off_in_both_runs_do_not_differ():
  # cwmim's batch_norm default moved between versions; a run that never enabled cwmim must
  # still resume and evaluate. Once cwmim is on in either run, its settings count again.
  old = workdir_lib.config_as_dict(tiny_config(**{"losses.cwmim.batch_norm": "batch"}))
  new = workdir_lib.config_as_dict(tiny_config(**{"losses.cwmim.batch_norm": "running"}))
  assert old["losses"]["cwmim"]["enabled"] is False
  assert workdir_lib.differing_keys(old, new) == []
  on = workdir_lib.config_as_dict(
    tiny_config(**{"losses.cwmim.batch_norm": "running", "losses.cwmim.enabled": True})
  )
  assert workdir_lib.differing_keys(old, on) == ["losses.cwmim.batch_norm", "losses.cwmim.enabled"]
  old_on = json.loads(json.dumps(on))
  old_on["losses"]["cwmim"]["batch_norm"] = "batch"
  assert workdir_lib.differing_keys(old_on, on) == ["losses.cwmim.batch_norm"]


def test_checkpoint_from_another_model_is_refused(straight_run):
  workdir, _ = straight_run
  config = tiny_config(**{"model.decoder_channels": 24})
  model = segmenter.build_segmenter(config.model, 6)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  template = jax.eval_shape(
    functools.partial(state_lib.init_state, model, tx, image_shape=(1, 32, 32, 3)),
    jax.random.key(0),
  )
  checkpointer = checkpointing.Checkpointer(workdir, keep=2)
  with pytest.raises(errors.CheckpointMismatchError, match=r"different model(.|\n)*decoder"):
    checkpointer.restore_latest(template, {})
  checkpointer.close()


def test_overwrite_moves_the_old_run_aside(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": 123}))
  (workdir / "precious.txt").write_text("keep me")
  config = tiny_config(total_steps=1, eval_every=1, checkpoint_every=1, log_every=1)
  train.train_and_evaluate(config, str(workdir), overwrite=True)
  moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(moved) == 1 and (moved[0] / "precious.txt").read_text() == "keep me"
  assert (workdir / "checkpoints" / "1").is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(
    **{"optim.lr": 1e30, "log_every": 1, "checkpoint_every": 1, "total_steps": 6, "eval_every": 6}
  )
  with pytest.raises(errors.NonFiniteLossError, match="NaN or infinite") as info:
    train.train_and_evaluate(config, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  expected = f"step {saved[-1]}" if saved else "no checkpoint had been saved"
  assert expected in str(info.value)


@pytest.mark.parametrize(
  "method, expected", [("supervised", 2 * (32 // 8)), ("fixmatch", 2 * (32 // 16))]
)
def test_total_epochs_derive_total_steps_from_the_data(tmp_path, method, expected):
  # 64 training images, half labelled; an epoch is a pass over the unlabelled set for a semi
  # method (16 per step here) and over the labelled set for supervised (8 per step).
  config = tiny_config(method=method, total_epochs=2, total_steps=0, unlabelled_batch_size=16)
  run = train.Run(config, str(tmp_path))
  assert len(run.data.labelled_indices) == 32 and len(run.data.unlabelled_indices) == 32
  assert run.config.total_steps == expected
  # The poly schedule reaches zero at the derived end.
  assert float(run.lr_schedule(expected)) == 0.0 and float(run.lr_schedule(expected - 1)) > 0
  # The workdir records the config as given, so the same command resumes.
  run.record_config()
  assert workdir_lib.recorded_config(str(tmp_path))["total_steps"] == config.total_steps
  run.close()


def test_total_epochs_without_a_full_batch_is_refused(tmp_path):
  config = tiny_config(method="supervised", total_epochs=1, total_steps=0, batch_size=40)
  with pytest.raises(config_schema.ConfigError, match="config.total_epochs"):
    train.Run(config, str(tmp_path))


def test_steps_and_epochs_together_are_refused():
  # A --config.total_steps=N override of a config in epochs must not be ignored silently.
  with pytest.raises(config_schema.ConfigError, match="config.total_steps=500.*total_epochs=0"):
    config_schema.validate(tiny_config(total_epochs=80, total_steps=500))
  with pytest.raises(config_schema.ConfigError, match="config.total_steps=0"):
    config_schema.validate(tiny_config(total_epochs=0, total_steps=0))
