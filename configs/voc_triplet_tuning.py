"""Mix-and-Match tuning on PASCAL VOC 2012: the backbone trained on the triplet loss alone.

  python -m s4jax.main --config=configs/voc_triplet_tuning.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --config.model.pretrained=/weights/resnet101.pth --workdir=runs/voc_mm_tuning
  python -m s4jax.export_backbone --workdir=runs/voc_mm_tuning --out=runs/voc_mm_tuning/backbone.npz --weights=student
  python -m s4jax.main --config=configs/voc_unimatch.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --config.model.pretrained=runs/voc_mm_tuning/backbone.npz --workdir=runs/voc_mm_then_unimatch

Stage 1 of Zhan et al., AAAI 2018 (docs/methods.md §3): the labelled images of the split,
`method="supervised"`, `losses.triplet.only=True` (the supervised loss is logged, not
trained on). The reference tunes 8000 iterations of 16 images with SGD 0.01 (x0.1 at 6000),
momentum 0.9, wd 5e-4 on 512 crops; here batch 16 and 8000 steps with voc_base.py's SGD and
poly schedule at the backbone lr 1e-3 (a pretrained ResNet-101; the projection head at x10).
VOC configs have no EMA teacher (`teacher.ema_decay = 0`): export the student. The decoder
is untrained in this stage, so its evaluations mean nothing; evaluation runs once at the end.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_base.py")
  config.method = "supervised"
  config.batch_size = 16
  config.unlabelled_batch_size = 0
  config.total_epochs = 0
  config.total_steps = 8000
  config.eval_every = 8000
  config.checkpoint_every = 2000
  config.losses.triplet.enabled = True
  config.losses.triplet.only = True
  config.losses.triplet.features = "high"
  return config
