"""ONE (Lan, Zhu, Gong, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018) on CIFAR-100 with
ResNet-32, as the official scripts/ONE_ResNet32.sh trains it: 3 branches on a trunk of the first two stages, T = 3,
the KL ramp-up over 80 epochs, 300 epochs, batch 128, SGD 0.1 (×0.1 from 0-based epochs 151 and 225, i.e. after
1-based epochs 151 and 225 here), weight decay 1e-4.

Run:
  python main.py --config configs/cifar100_resnet32_one.py --workdir runs/cifar100_resnet32_one

Expected: the PCL paper's comparison (Wu & Gong, AAAI 2021, Table 1, as reproduced in the README of
shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation) lists ONE with ResNet-32 on CIFAR-100 at
73.79 ± 0.41. The number to compare is `best_leader_top1` in runs/.../summary.json (trunk + branch_0, the branch the
official code tracks, best-epoch test top-1); `eval/top1/teacher` is the gated ensemble.
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-32, ONE with 3 branches."""
  config = get_default_config()
  config.method = 'one'
  config.num_students = 3  # Branches.
  config.one_shared_stages = 2
  config.one_temperature = 3.0
  config.one_rampup_epochs = 80
  config.num_epochs = 300
  config.lr_boundaries = (151, 225)
  config.weight_decay = 1e-4
  return config
