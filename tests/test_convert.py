"""Pretrained backbone weights: torch names -> our tree, checks, and loading in the loop."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4jax import train
from s4jax.errors import ConfigError
from s4jax.errors import UserInputError
from s4jax.models import convert
from s4jax.models import segmenter
import torch_writer
from tiny import tiny_config

# Our module names -> torch's, written out here independently of convert.py.
_STEM = {
  "conv1": "conv1",
  "bn1": "bn1",
  "conv1_0": "conv1.0",
  "bn1_0": "conv1.1",
  "conv1_1": "conv1.3",
  "bn1_1": "conv1.4",
  "conv1_2": "conv1.6",
}
_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def _torch_name(path):
  module = [p.key for p in path[:-1]]
  leaf = _LEAF[path[-1].key]
  if len(module) == 1:
    return f"{_STEM[module[0]]}.{leaf}"
  layer, block = module[0].split("_")
  inner = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
    module[1], module[1]
  )
  return f"{layer}.{block}.{inner}.{leaf}"


def _as_torch_state_dict(params, batch_stats):
  state = {}
  for tree in (params["backbone"], batch_stats["backbone"]):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      value = np.asarray(leaf)
      state[_torch_name(path)] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
  state["fc.weight"] = np.zeros((10, 4), np.float32)
  state["bn1.num_batches_tracked"] = np.array(7)
  return state


def _variables(seed, **model):
  config = tiny_config(**{f"model.{k}": v for k, v in model.items()})
  net = segmenter.build_segmenter(config.model, 3)
  variables = net.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), train=False)
  # Non-trivial statistics, so that a swap of mean and var would show.
  stats = jax.tree.map(
    lambda x: x + jax.random.uniform(jax.random.key(seed), x.shape), variables["batch_stats"]
  )
  return variables["params"], stats


@pytest.mark.parametrize("deep_stem", [False, True])
def test_torch_weights_land_in_the_backbone(tmp_path, deep_stem):
  params, stats = _variables(1, deep_stem=deep_stem)
  path = str(tmp_path / "weights.npz")
  np.savez(path, **{f"module.{k}": v for k, v in _as_torch_state_dict(params, stats).items()})
  fresh_params, fresh_stats = _variables(2, deep_stem=deep_stem)
  got_params, got_stats = convert.load_backbone(path, fresh_params, fresh_stats)
  for want, got in (
    (params["backbone"], got_params["backbone"]),
    (stats["backbone"], got_stats["backbone"]),
  ):
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), b)
  # The decoder is left as initialised.
  for a, b in zip(jax.tree.leaves(fresh_params["decoder"]), jax.tree.leaves(got_params["decoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatching_weights_are_refused_with_the_parameter(tmp_path):
  params, stats = _variables(1, width=16)
  path = str(tmp_path / "wide.npz")
  np.savez(path, **_as_torch_state_dict(params, stats))
  narrow = _variables(2)
  with pytest.raises(ConfigError, match=r"wide\.npz: params/backbone/.* has shape"):
    convert.load_backbone(path, *narrow)
  deeper = _variables(2, backbone="resnet34")
  path18 = str(tmp_path / "r18.npz")
  np.savez(path18, **_as_torch_state_dict(*_variables(1)))
  with pytest.raises(ConfigError, match=r"r18\.npz: holds \d+ of the backbone's \d+"):
    convert.load_backbone(path18, *deeper)
  state = _as_torch_state_dict(*_variables(1))
  state["head.classifier.weight"] = np.zeros(3)
  np.savez(path18, **state)
  with pytest.raises(ConfigError, match="'head.classifier.weight' is not part of"):
    convert.load_backbone(path18, *_variables(2))


@pytest.mark.parametrize("writer", [torch_writer.legacy_bytes, torch_writer.zip_bytes])
def test_pth_is_read_without_torch(tmp_path, monkeypatch, writer):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  params, stats = _variables(1)
  path = tmp_path / "resnet18.pth"
  path.write_bytes(writer(_as_torch_state_dict(params, stats)))
  got_params, got_stats = convert.load_backbone(str(path), *_variables(2))
  for want, got in (
    (params["backbone"], got_params["backbone"]),
    (stats["backbone"], got_stats["backbone"]),
  ):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), b)
  path.write_bytes(b"not read")
  with pytest.raises(UserInputError, match=r"resnet18\.pth is not a PyTorch checkpoint"):
    convert.read_state_dict(str(path))
  with pytest.raises(ConfigError, match="is not a file"):
    convert.read_state_dict(str(tmp_path / "missing.npz"))


def test_run_starts_from_the_pretrained_backbone(tmp_path):
  params, stats = _variables(5)
  path = str(tmp_path / "r18.npz")
  np.savez(path, **_as_torch_state_dict(params, stats))
  config = tiny_config(**{"model.pretrained": path})
  run = train.Run(config, str(tmp_path / "run"))
  state = jax.device_get(run.restore_or_init())
  for tree in (state.params, state.ema_params):
    for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(tree["backbone"])):
      np.testing.assert_array_equal(np.asarray(a), b)
  for tree in (state.batch_stats, state.ema_batch_stats):
    for a, b in zip(jax.tree.leaves(stats["backbone"]), jax.tree.leaves(tree["backbone"])):
      np.testing.assert_array_equal(np.asarray(a), b)
  run.checkpointer.close()
  run.writer.close()


@pytest.mark.parametrize("deep_stem", [False, True])
def test_flax_to_torch_inverts_the_torch_mapping(deep_stem):
  params, stats = _variables(3, deep_stem=deep_stem)
  want = _as_torch_state_dict(params, stats)
  del want["fc.weight"], want["bn1.num_batches_tracked"]
  got = convert.flax_to_torch(params["backbone"], stats["backbone"])
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_exported_backbone_starts_another_run(tmp_path, capsys):
  from s4jax import export_backbone  # pylint: disable=g-import-not-at-top
  from s4jax.errors import UserInputError  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "pretrain")
  run = train.Run(tiny_config(), workdir)
  state = run.restore_or_init()
  run.record_config()  # as the loop does once a run has started
  # A teacher that differs from the student, so the export's choice shows.
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params))
  run.checkpointer.save(3, state, run.iterators)
  run.checkpointer.wait()
  run.checkpointer.close()
  run.writer.close()
  teacher, student = str(tmp_path / "teacher.npz"), str(tmp_path / "student.npz")
  export_backbone.export(workdir, teacher)
  config = tiny_config()
  described = f"the teacher backbone ({config.model.backbone}, width {config.model.width})"
  assert described in capsys.readouterr().out
  export_backbone.export(workdir, student, weights="student")
  with pytest.raises(UserInputError, match="teacher.npz.* exists"):
    export_backbone.export(workdir, teacher)
  with pytest.raises(UserInputError, match="not the directory of a training run"):
    export_backbone.export(str(tmp_path / "nothing"), str(tmp_path / "x.npz"))

  expected = jax.device_get(state)
  for name, path, want in (("t", teacher, expected.ema_params), ("s", student, expected.params)):
    new = train.Run(tiny_config(**{"model.pretrained": path}), str(tmp_path / f"run_{name}"))
    got = jax.device_get(new.restore_or_init())
    for a, b in zip(jax.tree.leaves(want["backbone"]), jax.tree.leaves(got.params["backbone"])):
      np.testing.assert_array_equal(np.asarray(a), b)
    new.checkpointer.close()
    new.writer.close()
