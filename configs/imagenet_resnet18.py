"""FFSD on ImageNet (ILSVRC-2012) with ResNet-18: 2 students + 1 leader, 89 epochs, batch 256 (docs/method.md §8.3).

Run (prepare the data first, see scripts/prepare_data.py; multi-host launch in the README):
  python main.py --config configs/imagenet_resnet18.py --workdir runs/imagenet_resnet18_ffsd \
      --config.data_dir=/path/to/tensorflow_datasets

Expected (docs/method.md §11, official README, one run): leader top-1 70.87% (best epoch; top-5 is logged too).
"""

from configs.default import get_config as get_default_config


def get_config():
  """ImageNet, ResNet-18, FFSD."""
  config = get_default_config()
  config.model = 'resnet18'
  config.dataset = 'imagenet2012'
  config.num_classes = 1000
  config.image_size = 224
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 89  # The reference's range(1, 90).
  # Students, leader, fusion: 0.1·0.1^(epoch//30 + [epoch>=80]) with the 5-epoch warm-up, set every iteration;
  # the decoders' Adam steps down at these epochs.
  config.lr_schedule = 'imagenet'
  config.lr_boundaries = (30, 60, 80)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
