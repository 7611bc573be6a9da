"""FFSD on CIFAR-100 with ResNet-56: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_resnet56.py --workdir runs/cifar100_resnet56_ffsd

Expected (docs/method.md §11: official README, best-epoch leader top-1, 3 runs): 75.84, 75.66, 75.91; mean 75.80 ± 0.13.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-56, FFSD."""
  config = get_default_config()
  config.model = 'resnet56'
  return config
