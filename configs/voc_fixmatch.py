"""FixMatch on PASCAL VOC 2012 (UniMatch's re-implementation: one strong view, tau 0.95).

  python -m s4jax.main --config=configs/voc_fixmatch.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --workdir=runs/voc92_fixmatch

Hyper-parameters: voc_base.py (UniMatch configs/pascal.yaml, fixmatch.py shares them).
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_base.py")
  config.method = "fixmatch"
  return config
