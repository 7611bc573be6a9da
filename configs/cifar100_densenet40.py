"""FFSD on CIFAR-100 with DenseNet-40-12: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_densenet40.py --workdir runs/cifar100_densenet40_ffsd

Expected (docs/method.md §11: official README, best-epoch leader top-1, 3 runs): 77.29, 77.70, 77.17; mean 77.39 ± 0.28.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, DenseNet-40-12, FFSD."""
  config = get_default_config()
  config.model = 'densenet40'
  return config
