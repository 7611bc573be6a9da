"""FFSD on CIFAR-100 with ResNet-20: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_resnet20.py --workdir runs/cifar100_resnet20_ffsd

Expected (docs/method.md §11: official README, best-epoch leader top-1, 3 runs): 72.64, 72.58, 72.88; mean 72.70 ± 0.16.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-20, FFSD."""
  config = get_default_config()
  config.model = 'resnet20'
  return config
