"""Prepares VOC or Cityscapes for `data.source="tfds"` (ArrayRecord; no TensorFlow needed).

  python -m s4jax.data.prepare --dataset=voc --root=/data/VOCdevkit/VOC2012 --out=/data/tfds
  python -m s4jax.data.prepare --dataset=cityscapes --root=/data/cityscapes --out=/data/tfds

then train with `--config.data.source=tfds --config.data.tfds_dir=/data/tfds`. Every image
and mask is decoded and checked once here (a bad file stops preparation with its name).
"""

import argparse
import sys

from s4jax.errors import DataError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m s4jax.data.prepare",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--dataset", required=True, choices=("voc", "cityscapes"))
  parser.add_argument("--root", required=True, help="the manual download (dataset root)")
  parser.add_argument("--out", required=True, help="TFDS data directory to write")
  args = parser.parse_args(argv)
  # Imported here: TFDS takes a second to import, and --help should not wait for it.
  from s4jax.data import tfds_builders  # pylint: disable=import-outside-toplevel

  try:
    counts = tfds_builders.prepare(args.dataset, args.root, args.out)
  except DataError as e:
    print(f"s4jax: error: {e}", file=sys.stderr)
    return 2
  print(
    f"prepared {args.dataset} in {args.out}: "
    + ", ".join(f"{split} {count}" for split, count in counts.items())
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
