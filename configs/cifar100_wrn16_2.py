"""FFSD on CIFAR-100 with WRN-16-2: 2 students + 1 leader, 299 epochs, batch 128 (docs/method.md §8, §9).

Run:
  python main.py --config configs/cifar100_wrn16_2.py --workdir runs/cifar100_wrn16_2_ffsd

Expected (docs/method.md §11: official README, best-epoch leader top-1, 3 runs): 75.87, 75.86, 75.69; mean 75.81 ± 0.10.
The number to compare is `best_leader_top1` in runs/.../summary.json (the leader's best-epoch test top-1).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, WRN-16-2, FFSD."""
  config = get_default_config()
  config.model = 'wrn16_2'
  return config
