"""FFSD on CIFAR-10 with ResNet-32 (the reference's CIFAR-100 recipe on CIFAR-10; not a README experiment).

Run:
  python main.py --config configs/cifar10_resnet32.py --workdir runs/cifar10_resnet32_ffsd

Expected: the official README reports no CIFAR-10 result (docs/method.md §11); no reference number to compare.
CIFAR-10 uses its own normalisation constants (ffsd_jax/data/normalization.py).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-10, ResNet-32, FFSD."""
  config = get_default_config()
  config.dataset = 'cifar10'
  config.num_classes = 10
  return config
