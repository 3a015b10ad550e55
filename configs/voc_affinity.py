"""UniMatch + AuxSegNet's auxiliary tasks and cross-task affinity on PASCAL VOC 2012.

  python -m s4jax.main --config=configs/voc_affinity.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --workdir=runs/voc_affinity

Base recipe: voc_unimatch.py (UniMatch configs/pascal.yaml). The objective follows
docs/methods.md §4 (Xu et al., AuxSegNet, ICCV 2021; the parts marked "our" there are ours).
The affinity is built at stride 16 on the 321 crop: a 21 x 21 grid, one 441 x 441 map per
image and task (0.78 MB in float32). Stride 8 (41 x 41, 11.3 MB per map) is
--config.losses.affinity.stride=8 --config.losses.affinity.dilations='(6, 12)'; the memory
of both is in docs/methods.md §4. The ablation arms are the overrides listed in
shapes_affinity.py. With teacher.source = "student" (this recipe), refine_pseudo_labels runs
one more inference forward of the student on the weak view.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_unimatch.py")
  aff = config.losses.affinity
  aff.enabled = True
  aff.stride = 16
  # The paper's (6, 12) at stride 8 cover the same input pixels as (3, 6) at stride 16.
  aff.dilations = (3, 6)
  aff.branch_channels = 128  # the paper's width
  aff.classifier_dropout = 0.5
  aff.refine_predictions = True
  aff.refine_pseudo_labels = False
  aff.refine_eval = False
  return config
