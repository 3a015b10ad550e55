"""Tests for the ResNet backbones, the DeepLabV3+ decoder and the Segmenter.

Most structural checks use ``jax.eval_shape`` (tracing only, nothing is
compiled) so that deep networks stay cheap; only one tiny ResNet-18 segmenter
is actually compiled and run.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from s4jax.models import conv_ops
from s4jax.models import deeplabv3plus
from s4jax.models import resnet
from s4jax.models import segmenter as segmenter_lib

IMAGE = 64
WIDTH = 8
NUM_CLASSES = 5


def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


def _num_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@functools.cache
def _resnet_abstract(depth, output_stride, deep_stem=False, width=WIDTH):
  """(abstract variables, abstract features) of a ResNet, via eval_shape."""
  model = resnet.ResNet(depth, output_stride=output_stride, deep_stem=deep_stem, width=width)
  x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, features


# --- ResNet -----------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("depth", resnet.RESNET_DEPTHS)
def test_resnet_stage_shapes(depth, output_stride):
  _, features = _resnet_abstract(depth, output_stride)
  low_channels, high_channels = resnet.resnet_output_channels(depth, WIDTH)
  expansion = high_channels // (8 * WIDTH)
  # Nominal strides of the stem and the four stages: the last ones dilate instead.
  strides = dict(
    zip(
      ["stem", "layer1", "layer2", "layer3", "layer4"],
      (2, 4, 8, min(16, output_stride), output_stride),
    )
  )
  channels = {
    "stem": WIDTH,
    "layer1": low_channels,
    "layer2": 2 * WIDTH * expansion,
    "layer3": 4 * WIDTH * expansion,
    "layer4": high_channels,
  }
  assert set(features) == set(strides)
  for name, stride in strides.items():
    size = IMAGE // stride
    assert features[name].shape == (2, size, size, channels[name]), name
    assert features[name].dtype == jnp.float32


def test_resnet_output_channels():
  assert resnet.resnet_output_channels(50, 64) == (256, 2048)
  assert resnet.resnet_output_channels(101, 64) == (256, 2048)
  assert resnet.resnet_output_channels(18, 64) == (64, 512)
  assert resnet.resnet_output_channels(34, 16) == (16, 128)
  with pytest.raises(ValueError):
    resnet.resnet_output_channels(42, 64)


@pytest.mark.parametrize(
  "depth, expected",
  [
    # torchvision's parameters() count minus the fc layer.
    (18, 11_689_512 - 513_000),
    (34, 21_797_672 - 513_000),
    (50, 25_557_032 - 2_049_000),
    (101, 44_549_160 - 2_049_000),
  ],
)
def test_resnet_param_count_matches_torchvision(depth, expected):
  variables, _ = _resnet_abstract(depth, 32, width=64)
  assert _num_params(variables["params"]) == expected
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_resnet_param_names_match_torchvision_layout():
  params = _resnet_abstract(50, 16)[0]["params"]
  assert params["conv1"]["kernel"].shape == (7, 7, 3, WIDTH)
  assert set(params["bn1"]) == {"scale", "bias"}
  for stage, blocks in enumerate((3, 4, 6, 3), start=1):
    for j in range(blocks):
      block = params[f"layer{stage}_{j}"]
      # Every ResNet-50 stage changes channels in its first block.
      has_downsample = j == 0
      assert ("downsample_conv" in block) == has_downsample
      assert ("downsample_bn" in block) == has_downsample
      for k in (1, 2, 3):
        assert f"conv{k}" in block and f"bn{k}" in block
  assert params["layer1_0"]["conv1"]["kernel"].shape == (1, 1, WIDTH, WIDTH)
  assert params["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, WIDTH, 4 * WIDTH)
  assert "layer4_3" not in params

  params18 = _resnet_abstract(18, 16)[0]["params"]
  # ResNet-18's layer1 keeps 64 channels, so torchvision has no downsample.
  assert "downsample_conv" not in params18["layer1_0"]
  assert "conv3" not in params18["layer1_0"]
  for stage in (2, 3, 4):
    assert "downsample_conv" in params18[f"layer{stage}_0"]
    assert "downsample_conv" not in params18[f"layer{stage}_1"]


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_deep_stem(depth):
  variables, features = _resnet_abstract(depth, 8, deep_stem=True)
  params = variables["params"]
  assert "conv1" not in params
  assert params["conv1_0"]["kernel"].shape == (3, 3, 3, WIDTH)
  assert params["conv1_1"]["kernel"].shape == (3, 3, WIDTH, WIDTH)
  assert params["conv1_2"]["kernel"].shape == (3, 3, WIDTH, 2 * WIDTH)
  assert {"bn1_0", "bn1_1", "bn1"} <= set(params)
  assert "bn1_2" not in params
  assert params["bn1"]["scale"].shape == (2 * WIDTH,)
  # The stem emits 2 * width channels, so layer1_0 needs a projection even
  # for BasicBlock.
  assert "downsample_conv" in params["layer1_0"]
  assert features["stem"].shape == (2, IMAGE // 2, IMAGE // 2, 2 * WIDTH)
  assert features["layer4"].shape[1:3] == (IMAGE // 8, IMAGE // 8)


def _conv3x3_strides_and_dilations(depth, output_stride, monkeypatch):
  # Read the schedule off XLA convolutions: on CPU a dilated conv on this small input would
  # otherwise be computed tap by tap (conv_ops.conv_by_taps) and leave no conv primitive.
  monkeypatch.setenv(conv_ops.DILATED_ENV, "xla")
  model = resnet.ResNet(depth, output_stride=output_stride, width=WIDTH)
  variables, _ = _resnet_abstract(depth, output_stride)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
    variables, jnp.zeros((1, 32, 32, 3))
  )
  out = []
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      rhs_shape = eqn.invars[1].aval.shape
      if rhs_shape[:2] == (3, 3):
        out.append((eqn.params["window_strides"][0], eqn.params["rhs_dilation"][0]))
  return out


def test_resnet50_os8_dilation_schedule_matches_torchvision(monkeypatch):
  # torchvision with replace_stride_with_dilation=[False, True, True]: the
  # first block of a dilated stage uses the previous stage's dilation.
  expected = (
    [(1, 1)] * 3  # layer1
    + [(2, 1)]
    + [(1, 1)] * 3  # layer2
    + [(1, 1)]
    + [(1, 2)] * 5  # layer3 (dilated)
    + [(1, 2)]
    + [(1, 4)] * 2  # layer4 (dilated)
  )
  assert _conv3x3_strides_and_dilations(50, 8, monkeypatch) == expected


def test_resnet18_os16_dilation_schedule(monkeypatch):
  # BasicBlock: both 3x3 convs of a block share its dilation.
  expected = (
    [(1, 1), (1, 1)] * 2  # layer1
    + [(2, 1), (1, 1)]
    + [(1, 1), (1, 1)]  # layer2
    + [(2, 1), (1, 1)]
    + [(1, 1), (1, 1)]  # layer3
    + [(1, 1), (1, 1)]
    + [(1, 2), (1, 2)]  # layer4 (dilated)
  )
  assert _conv3x3_strides_and_dilations(18, 16, monkeypatch) == expected


# --- Decoder ----------------------------------------------------------------


def test_decoder_shapes_and_names():
  decoder = deeplabv3plus.DeepLabV3PlusDecoder(
    num_classes=NUM_CLASSES, aspp_channels=16, decoder_channels=24
  )
  low = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)
  high = jax.ShapeDtypeStruct((2, 4, 4, 64), jnp.float32)
  variables = jax.eval_shape(
    lambda l, h: decoder.init(jax.random.key(0), l, h, train=False), low, high
  )
  out = jax.eval_shape(lambda v, l, h: decoder.apply(v, l, h, train=False), variables, low, high)
  assert out["features"].shape == (2, 16, 16, 24)
  assert out["logits"].shape == (2, 16, 16, NUM_CLASSES)

  params = variables["params"]
  assert set(params) == {"aspp", "reduce", "fuse", "classifier"}
  assert set(params["aspp"]) == {"b0", "b1", "b2", "b3", "b4", "project"}
  assert params["aspp"]["b1"]["conv"]["kernel"].shape == (3, 3, 64, 16)
  assert params["aspp"]["project"]["conv"]["kernel"].shape == (1, 1, 80, 16)
  assert params["reduce"]["conv"]["kernel"].shape == (1, 1, 32, 48)
  assert set(params["fuse"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert params["fuse"]["conv1"]["kernel"].shape == (3, 3, 16 + 48, 24)
  assert params["classifier"]["kernel"].shape == (1, 1, 24, NUM_CLASSES)
  assert params["classifier"]["bias"].shape == (NUM_CLASSES,)
  assert "bias" not in params["aspp"]["b0"]["conv"]


def test_aspp_rates():
  assert deeplabv3plus.aspp_rates_for_output_stride(16) == (6, 12, 18)
  assert deeplabv3plus.aspp_rates_for_output_stride(8) == (12, 24, 36)
  with pytest.raises(ValueError):
    deeplabv3plus.aspp_rates_for_output_stride(4)


# --- Segmenter --------------------------------------------------------------


def _small_segmenter(**kwargs):
  args = dict(
    num_classes=NUM_CLASSES, backbone="resnet18", width=WIDTH, aspp_channels=16, decoder_channels=16
  )
  args.update(kwargs)
  return segmenter_lib.Segmenter(**args)


@pytest.fixture(scope="module")
def small_model():
  """A compiled-once ResNet-18 segmenter with initialised variables."""
  model = _small_segmenter()
  x = jax.random.normal(jax.random.key(1), (2, IMAGE, IMAGE, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  return model, variables, x


@pytest.fixture(scope="module")
def small_model_outputs(small_model):
  model, variables, x = small_model
  train_out, train_state = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  )(variables, x)
  eval_out, eval_state = jax.jit(
    lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"])
  )(variables, x)
  return train_out, train_state, eval_out, eval_state


def test_segmenter_outputs(small_model_outputs):
  for out in small_model_outputs[0], small_model_outputs[2]:
    assert out["logits"].shape == (2, IMAGE, IMAGE, NUM_CLASSES)
    assert out["logits"].dtype == jnp.float32
    assert out["low"].shape == (2, IMAGE // 4, IMAGE // 4, WIDTH)
    assert out["features"].shape == (2, IMAGE // 4, IMAGE // 4, 16)
    assert np.all(np.isfinite(out["logits"]))


def test_segmenter_top_level_collections(small_model):
  _, variables, _ = small_model
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "decoder"}
  assert set(variables["batch_stats"]) == {"backbone", "decoder"}
  assert variables["params"]["backbone"]["layer1_0"]["conv1"]["kernel"].shape == (
    3,
    3,
    WIDTH,
    WIDTH,
  )


def test_train_updates_batch_stats_eval_does_not(small_model, small_model_outputs):
  _, variables, _ = small_model
  _, train_state, _, eval_state = small_model_outputs
  old = variables["batch_stats"]
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), old, train_state["batch_stats"])
  assert all(jax.tree.leaves(changed))
  same = jax.tree.map(np.array_equal, old, eval_state["batch_stats"])
  assert all(jax.tree.leaves(same))


def test_encode_decode_match_call(small_model, small_model_outputs):
  model, variables, x = small_model
  eval_out = small_model_outputs[2]

  @jax.jit
  def split(v, x):
    low, high = model.apply(v, x, train=False, method="encode")
    return low, high, model.apply(v, low, high, train=False, method="decode")

  low, high, out = split(variables, x)
  assert low.shape == (2, IMAGE // 4, IMAGE // 4, WIDTH)
  assert high.shape == (2, IMAGE // 16, IMAGE // 16, 8 * WIDTH)
  np.testing.assert_allclose(out["features"], eval_out["features"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(low, eval_out["low"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    segmenter_lib.upsample_logits(out["logits"], (IMAGE, IMAGE)),
    eval_out["logits"],
    rtol=1e-5,
    atol=1e-5,
  )


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _small_segmenter(backbone="resnet50", dtype=jnp.bfloat16, deep_stem=True, output_stride=8)
  x = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  out, state = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
  )
  assert out["logits"].dtype == jnp.float32
  assert out["logits"].shape == (1, IMAGE, IMAGE, NUM_CLASSES)
  assert out["features"].dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))


@pytest.mark.parametrize("backbone", segmenter_lib.BACKBONES)
def test_segmenter_logits_at_input_resolution(backbone):
  model = _small_segmenter(backbone=backbone, output_stride=16)
  x = jax.ShapeDtypeStruct((1, 48, 80, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out["logits"].shape == (1, 48, 80, NUM_CLASSES)
  assert out["features"].shape[:3] == (1, 12, 20)


def test_bad_backbone_and_output_stride_raise():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"model\.backbone.*resnet50"):
    jax.eval_shape(
      lambda x: _small_segmenter(backbone="vgg16").init(jax.random.key(0), x, train=False), x
    )
  with pytest.raises(ValueError, match=r"model\.output_stride"):
    segmenter_lib.validate_model_args("resnet50", 4)
  with pytest.raises(ValueError, match=r"model\.backbone"):
    segmenter_lib.validate_model_args("resnet152", 16)


def _model_config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      backbone="resnet34",
      output_stride=8,
      deep_stem=True,
      width=WIDTH,
      aspp_channels=16,
      decoder_channels=24,
      dtype="bfloat16",
    )
  )
  config.update(overrides)
  return config


def test_build_segmenter_from_config():
  model = segmenter_lib.build_segmenter(_model_config(), num_classes=3)
  assert model.backbone == "resnet34"
  assert model.output_stride == 8
  assert model.deep_stem
  assert model.width == WIDTH
  assert model.aspp_channels == 16
  assert model.decoder_channels == 24
  assert model.dtype == jnp.bfloat16
  assert model.num_classes == 3

  with pytest.raises(ValueError, match=r"model\.backbone"):
    segmenter_lib.build_segmenter(_model_config(backbone="r50"), 3)
  with pytest.raises(ValueError, match=r"model\.output_stride"):
    segmenter_lib.build_segmenter(_model_config(output_stride=12), 3)
  with pytest.raises(ValueError, match=r"model\.dtype"):
    segmenter_lib.build_segmenter(_model_config(dtype="float16"), 3)
