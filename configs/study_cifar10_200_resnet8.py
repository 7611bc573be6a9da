"""The small-data arm of the accuracy study (docs/results.md): ResNet-8 on 200 CIFAR-10 images per class, 100 epochs.

With 1,000 images per class and 20 epochs (configs/study_cifar10_1k_resnet8.py) the networks underfit and FFSD's
leader gains nothing. This setting asks whether it gains where independent training overfits: the first 200 training
images of each class of the real CIFAR-10 JPEGs (`../shared/data/cifar10-jpeg.tar.gz`, 2,000 images, 15 steps of 128
per epoch), the full 10,000-image test set, 100 epochs (1,500 steps, the same number as the 1k study) with ×0.1 after
epochs 50 and 75 (the official 50% / 75% points), the official 5-epoch λ warm-up, ONE's and PCL's ramp-ups scaled to
the same share of the run as in their papers (27 epochs; docs/methods.md), everything else the official defaults.
Build the subset folder as docs/results.md shows for the 1k subset, with `head -200`, then:

Run (one after the other; rerun to resume):
  python scripts/study.py run --configs configs/study_cifar10_200_resnet8.py --methods ffsd,independent \
      --seeds 0,1 --root runs/study_200 --config.image_folder=DATA/cifar10_200
  python scripts/study.py aggregate runs/study_200

Expected: docs/results.md holds the measured table (leader top-1 per method and seed). The ramp-up keys enter only
ONE and PCL, not ffsd or independent: that table stands.
"""

from configs.study_cifar10_1k_resnet8 import get_config as get_1k_config


def get_config():
  """CIFAR-10 subset (200 images per class) as an image folder, ResNet-8, 100 epochs."""
  config = get_1k_config()
  config.num_epochs = 100
  config.lr_boundaries = (50, 75)
  config.eval_every_epochs = 10
  config.log_every_steps = 75  # Every 5 epochs (15 steps of 128).
  config.checkpoint_every_steps = 300  # Every 20 epochs.
  # The papers' 80 of 300 epochs (26.7%) of this 100-epoch run: 100 * 80 / 300 = 26.7, so 27 (at 80 the ramp would
  # take 80% of the run; the 1k config's 5 would be 5%).
  config.one_rampup_epochs = 27
  config.pcl_rampup_epochs = 27
  config.okddip_rampup_epochs = 27
  return config
