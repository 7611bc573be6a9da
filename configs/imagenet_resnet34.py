"""FFSD on ImageNet (ILSVRC-2012) with ResNet-34: the ResNet-18 recipe (configs/imagenet_resnet18.py), deeper nets.

Run (prepare the data first, see scripts/prepare_data.py; multi-host launch in the README):
  python main.py --config configs/imagenet_resnet34.py --workdir runs/imagenet_resnet34_ffsd \
      --config.data_dir=/path/to/tensorflow_datasets

Expected (docs/method.md §11, official README, one run): leader top-1 74.69% (best epoch; top-5 is logged too).
"""

from configs.imagenet_resnet18 import get_config as get_resnet18_config


def get_config():
  """ImageNet, ResNet-34, FFSD."""
  config = get_resnet18_config()
  config.model = 'resnet34'
  return config
