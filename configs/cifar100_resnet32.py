"""FFSD on CIFAR-100 with ResNet-32: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_resnet32.py --workdir runs/cifar100_resnet32_ffsd

Expected (docs/method.md §11: official README, best-epoch leader top-1, 3 runs): 74.92, 74.82, 74.82; mean 74.85 ± 0.06.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-32, FFSD."""
  config = get_default_config()
  # The defaults are this experiment (configs/default.py); this file names it.
  return config
