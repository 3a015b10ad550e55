"""Label conventions shared by data, losses, evaluation and pictures (no JAX import)."""

# Mask value of pixels that carry no label: VOC's boundary, padding of crops, unconfident or
# unlabelled regions. Losses and metrics skip it; pictures draw it white.
IGNORE_INDEX = 255
