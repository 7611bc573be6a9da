"""FFSD on CIFAR-100 with GoogLeNet: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_googlenet.py --workdir runs/cifar100_googlenet_ffsd

Expected (docs/method.md §11: official README, best-epoch leader top-1, 3 runs): 81.52, 81.93, 81.34; mean 81.60 ± 0.30.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, GoogLeNet, FFSD."""
  config = get_default_config()
  config.model = 'googlenet'
  return config
