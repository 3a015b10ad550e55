"""Shared settings of the Cityscapes experiments: UniMatch V1's recipe.

Not a runnable experiment by itself; `cityscapes_unimatch.py` starts from it. Sources:
UniMatch (Yang et al., CVPR 2023), github.com/LiheYoung/UniMatch (configs/cityscapes.yaml at
commit 818609d: crop 801, batch 2 per GPU x 4 GPUs, lr 0.005, lr_multi 1, OHEM 0.7 / 200000,
conf_thresh 0, ResNet-101 OS16, ASPP rates 6/12/18; unimatch.py; util/ohem.py) and
docs/methods.md §0. Another version of that file in the repository (commit 7292bac) describes a
ResNet-50 run instead: crop 769, 8 GPUs x 1, OS8 with multi-grid, min_kept 100000,
conf_thresh 0.95; the values below follow the paper's ResNet-101 setting.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.default_config()
  config.data.name = "cityscapes"
  config.data.root = ""  # --config.data.root=/data/cityscapes
  config.data.crop_size = 801  # cityscapes.yaml crop_size
  config.data.scale_range = (0.5, 2.0)
  # ResNet-101, deep stem (UniMatch's backbone), output stride 16 (cityscapes.yaml:
  # replace_stride_with_dilation [False, False, True]; ASPP rates 6/12/18, the model's
  # default at OS16). UniMatch starts from ImageNet weights (its pretrained/resnet101.pth):
  # give them with --config.model.pretrained=resnet101.npz (s4jax/models/convert.py); from
  # scratch this will not reach the papers' numbers.
  config.model.backbone = "resnet101"
  config.model.deep_stem = True
  config.model.output_stride = 16
  # 4 GPUs x 2 images (cityscapes.yaml batch_size 2 per GPU).
  config.batch_size = 8
  config.unlabelled_batch_size = 8
  # cityscapes.yaml: lr 0.005, lr_multi 1 (the head learns at the backbone's rate).
  config.optim.lr = 0.005
  config.optim.head_lr_multiplier = 1.0
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.poly_power = 0.9
  # cityscapes.yaml criterion OHEM: thresh 0.7, min_kept 200000 per GPU batch of 2 crops.
  # Our OHEM ranks pixels over the global batch of 8 (4 GPUs' worth), so min_kept x 4.
  config.losses.supervised = "ohem"
  config.losses.ohem_threshold = 0.7
  config.losses.ohem_min_kept = 4 * 200000
  # UniMatch V1 on Cityscapes: conf_thresh 0 (every pseudo-label counts); V2 uses 0.95.
  config.semi.threshold = 0.0
  # V1: pseudo-labels from the student's train-mode weak pass (docs/methods.md).
  config.teacher.source = "student"
  config.teacher.ema_decay = 0.0
  # cityscapes.yaml epochs 240 over the split's unlabelled set (total_steps derived at start).
  config.total_epochs = 240
  config.total_steps = 0
  # Sliding window of the crop size, stride 2/3 of it (UniMatch evaluate mode "sliding_window":
  # 801 / 534), softmax summed over windows; images are all 1024x2048 (no padding needed).
  config.eval.mode = "sliding"
  config.eval.window = 801
  config.eval.stride = 534
  config.eval.batch_size = 8
  config.log_every = 50
  config.eval_every = 2000
  config.checkpoint_every = 2000
  return config
