"""UniMatch (V1) on Cityscapes with the published splits (e.g. 1/16 labelled: 186 images).

  python -m s4jax.main --config=configs/cityscapes_unimatch.py --config.data.root=/data/cityscapes --config.data.split=1_16 --workdir=runs/cs_1_16

Splits: copy splits/cityscapes/ of github.com/LiheYoung/UniMatch to <root>/splits (or set
--config.data.splits_dir). Hyper-parameters: cityscapes_base.py (UniMatch
configs/cityscapes.yaml): crop 801, lr 0.005 x1, batch 8 + 8, 240 epochs, OHEM, tau 0,
sliding-window evaluation 801 / 534.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "cityscapes_base.py")
  config.method = "unimatch"
  config.semi.fp_dropout = 0.5
  return config
