"""UniMatch (V1) on PASCAL VOC 2012 with the published splits (e.g. 92 labelled images).

  python -m s4jax.main --config=configs/voc_unimatch.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --workdir=runs/voc92

Splits: copy splits/pascal/ of github.com/LiheYoung/UniMatch to <root>/splits (or set
--config.data.splits_dir). Hyper-parameters: voc_base.py (UniMatch configs/pascal.yaml).
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_base.py")
  config.method = "unimatch"
  config.semi.fp_dropout = 0.5  # UniMatch: nn.Dropout2d(0.5) on the encoder features
  return config
