"""FFSD on CIFAR-100 with ResNet-110: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_resnet110.py --workdir runs/cifar100_resnet110_ffsd

Expected: the official README lists no ResNet-110 result (docs/method.md §11); no reference number to compare.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-110, FFSD."""
  config = get_default_config()
  config.model = 'resnet110'
  return config
