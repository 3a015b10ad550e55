"""UniMatch + CSS's collaborative logit/representation supervision on PASCAL VOC 2012.

  python -m s4jax.main --config=configs/voc_contrastive.py --config.data.root=/data/VOCdevkit/VOC2012 --config.data.split=92 --workdir=runs/voc_contrastive

Base recipe: voc_unimatch.py (UniMatch configs/pascal.yaml). The objective follows
docs/methods.md §5 (Wang, Xie et al., ICCV 2023, code WangChangqi98/CSS, configs
VOC_config_baseline.yaml and cross_label.py's defaults; the parts marked "our design" there
are ours). Without cross supervision: --config.losses.contrastive.cross_supervision=False.

Cost: the representation head on the labelled images and one strong view (16 stride-4 maps
of 81 x 81 per step), one more teacher forward of the weak view (the target hook), and
21 x 256 anchors x 512 negatives of 256 floats, gathered one class at a time (128 MiB; the
whole tensor would be 2.62 GiB).

Note: with 21 classes and label_temperature 0.5 the representation confidence cannot exceed
0.732 < rep_threshold 0.97, so the cross-supervised unlabelled CE gets weight 0 (as in CSS's
released code; the run warns); --config.losses.contrastive.label_temperature=0.1 (CSS's
Model_cross default) makes the weights reachable.
"""

from s4jax import config_schema


def get_config():
  config = config_schema.sibling_config(__file__, "voc_unimatch.py")
  c = config.losses.contrastive
  c.enabled = True
  c.dim = 256
  c.num_anchors = 256
  c.num_negatives = 512
  c.temperature = 0.5
  c.label_temperature = 0.5
  c.rep_threshold = 0.97  # CSS's un_threshold
  c.weak_threshold = 0.7
  c.anchor_threshold = 0.8  # CSS's strong_threshold (cross_label.py)
  c.prototype_momentum = 0.99
  c.rampdown = 5.0  # CSS's ramp_mult -5 over the whole run
  c.strong_views = 1
  c.class_chunk = 1
  return config
