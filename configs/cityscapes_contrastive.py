"""UniMatch + CSS's collaborative logit/representation supervision on Cityscapes.

  python -m s4jax.main --config=configs/cityscapes_contrastive.py --config.data.root=/data/cityscapes --config.data.split=1_16 --workdir=runs/cs_contrastive

Base recipe: cityscapes_unimatch.py (UniMatch configs/cityscapes.yaml: crop 801, OHEM, tau 0,
sliding-window evaluation). The objective: docs/methods.md §5 (CSS's values; our design where
marked there). Without cross supervision: --config.losses.contrastive.cross_supervision=False.

Cost: 16 stride-4 maps of 201 x 201 pixels (646k) through the representation head; the
anchors x negatives tensor is 19 x 256 x 512 x 256 floats (2.4 GiB), gathered one class at a
time (128 MiB). With 19 classes and label_temperature 0.5 the representation confidence cannot
exceed 0.752 < 0.97 (see configs/voc_contrastive.py).
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "cityscapes_unimatch.py")
  config.losses.contrastive.enabled = True
  config.losses.contrastive.strong_views = 1
  return config
