"""Backbone names and the output strides each reaches, without importing JAX.

The config schema checks `model.backbone` / `model.output_stride` against these when a config
file is loaded, before JAX is imported; `segmenter.py` builds the networks they name.
"""

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MOBILE_NETWORKS = ("mobilenet_v2", "efficientnet_lite0")
BACKBONES = RESNETS + MOBILE_NETWORKS
# Every backbone reaches these by dilating its last stages: the ResNet stages and the
# MobileNets' strided blocks fall at strides 4, 8, 16 and 32.
OUTPUT_STRIDES = (8, 16, 32)
BACKBONE_OUTPUT_STRIDES = {name: OUTPUT_STRIDES for name in BACKBONES}
