"""The online-KD zoo study of docs/results.md: seven methods and independent training on 200 CIFAR-10 images per
class, with a validation split.

The small-data arm (configs/study_cifar10_200_resnet8.py: ResNet-8, the first 200 training images of each class of the
real CIFAR-10 JPEGs, `../shared/data/cifar10-jpeg.tar.gz`, the full 10,000-image test set) with model selection that
does not look at the test set: 50 of each class's 200 images are held out as the validation split (500 images, chosen
from the seed, never trained on), so 1,500 images train (11 steps of 128 per epoch), and "best" is the evaluation with
the best validation top-1. 50 epochs (550 steps) rather than 100, so that eight methods × three seeds train in about
two hours on the 2-core development CPU; ×0.1 after epochs 25 and 37 (the official 50% / 75% points), the official
5-epoch λ warm-up, ONE's, PCL's and OKDDip's ramp-ups at their papers' share of the run (80 of 300 epochs: 13 of 50),
every method with 2 networks or branches (`num_students` 2), everything else the defaults (shuffled epochs and the
step schedule for MCL too, so that every method sees the same batches). Build the subset folder as docs/results.md
shows, then:

Run (eight methods × three seeds, one after the other; rerun to resume):
  python scripts/study.py run --configs configs/study_cifar10_200_resnet8_zoo.py \
      --methods ffsd,dml,kdcl,one,pcl,okddip,mcl,independent --seeds 0,1,2 --root runs/zoo \
      --config.image_folder=DATA/cifar10_200
  python scripts/study.py aggregate runs/zoo --csv runs/zoo/results.csv

Expected: docs/results.md holds the measured table (each method's deployed network: test top-1 at the best
validation epoch and after the last epoch, mean ± sample std over the three seeds: 54.5–56.1% for every method but
PCL, whose temporal mean lags at this length, 51.3%; independent training 55.7%).
"""

from configs.study_cifar10_200_resnet8 import get_config as get_small_data_config


def get_config():
  """CIFAR-10 subset (200 images per class, 50 of them held out for validation), ResNet-8, 50 epochs."""
  config = get_small_data_config()
  config.validation_examples_per_class = 50
  config.num_epochs = 50
  config.lr_boundaries = (25, 37)
  config.eval_every_epochs = 10
  config.log_every_steps = 55  # Every 5 epochs (11 steps of 128).
  config.checkpoint_every_steps = 110  # Every 10 epochs.
  # 50 * 80 / 300 = 13.3, so 13.
  config.one_rampup_epochs = 13
  config.pcl_rampup_epochs = 13
  config.okddip_rampup_epochs = 13
  return config
