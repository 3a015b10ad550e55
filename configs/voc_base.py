"""Shared settings of the PASCAL VOC 2012 (+ SBD aug) experiments: UniMatch V1's recipe.

Not a runnable experiment by itself; `voc_supervised.py`, `voc_fixmatch.py` and
`voc_unimatch.py` start from it. Sources: UniMatch (Yang et al., CVPR 2023), its code at
github.com/LiheYoung/UniMatch (configs/pascal.yaml at commit 818609d: crop 321, epochs 80,
batch 2 per GPU x 4 GPUs, lr 0.001, lr_multi 10, conf_thresh 0.95, ResNet-101 OS16, ASPP
rates 6/12/18; unimatch.py; model/semseg/deeplabv3plus.py) and docs/methods.md §0.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.default_config()
  config.data.name = "voc"
  config.data.root = ""  # --config.data.root=/data/VOCdevkit/VOC2012
  # Classic splits (92 ... 1464 labelled from the 1464 fine masks) are trained at crop 321;
  # UniMatch uses 513 for the blended splits (1_16 ... 1_4). pascal.yaml: crop_size.
  config.data.crop_size = 321
  config.data.scale_range = (0.5, 2.0)  # UniMatch dataset/transform.py resize(0.5, 2.0)
  # ResNet-101 with the deep stem (three 3x3 convs), output stride 16 (pascal.yaml:
  # backbone resnet101, replace_stride_with_dilation [False, False, True]).
  # UniMatch starts from ImageNet weights (its pretrained/resnet101.pth, deep stem): give
  # them with --config.model.pretrained=resnet101.npz (s4jax/models/convert.py); from
  # scratch these configs will not reach the papers' numbers.
  config.model.backbone = "resnet101"
  config.model.deep_stem = True
  config.model.output_stride = 16
  # 4 GPUs x 2 labelled images (pascal.yaml batch_size 2 per GPU, scripts/train.sh 4 GPUs).
  config.batch_size = 8
  config.unlabelled_batch_size = 8
  # pascal.yaml: lr 0.001 for the backbone, lr_multi 10 for the head; SGD momentum 0.9,
  # weight decay 1e-4, poly power 0.9 (unimatch.py).
  config.optim.lr = 0.001
  config.optim.head_lr_multiplier = 10.0
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.poly_power = 0.9
  config.semi.threshold = 0.95  # pascal.yaml conf_thresh
  # UniMatch V1 has no EMA teacher: pseudo-labels come from the clean weak half of the
  # student's train-mode pass [labelled; weak] (unimatch.py, fixmatch.py; docs/methods.md).
  # The evaluated "teacher" is then the student itself (ema_decay 0).
  config.teacher.source = "student"
  config.teacher.ema_decay = 0.0
  # pascal.yaml epochs 80, an epoch being a pass over the unlabelled set of the split (10490
  # images for split 92 ... 9118 for 1464): total_steps is derived when the run starts.
  config.total_epochs = 80
  config.total_steps = 0
  # Whole-image evaluation, single scale, each image at its own size (UniMatch evaluate mode
  # "original"): batches group images of one size, so nothing is padded; one compile per
  # distinct size, reused at every later evaluation.
  config.eval.mode = "whole"
  config.eval.batch_size = 8
  config.log_every = 50
  config.eval_every = 2000
  config.checkpoint_every = 2000
  return config
