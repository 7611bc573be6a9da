"""PCL (Wu & Gong, "Peer Collaborative Learning for Online Knowledge Distillation", AAAI 2021) on CIFAR-100 with
ResNet-32: 3 peers on a trunk of the first two stages, T = 3, temporal means with EMA decay 0.999, the peer-mean KL
ramped up over 80 epochs; 300 epochs, batch 128, SGD 0.1 with ×0.1 after epochs 150 and 225, weight decay 5e-4 (the
public implementation's settings, shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation).

Run:
  python main.py --config configs/cifar100_resnet32_pcl.py --workdir runs/cifar100_resnet32_pcl

Expected (the PCL paper's own Table 1 figure for CIFAR-100 ResNet-32, which the public reproduction's README quotes
beside its own 74.77): 74.14 ± 0.16. The
number to compare is `best_leader_top1` in runs/.../summary.json (the temporal mean of peer 0, the deployed network,
best-epoch test top-1). Every peer sees the same augmented batch here, not its own augmentation (docs/deviations.md).
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-32, PCL with 3 peers."""
  config = get_default_config()
  config.method = 'pcl'
  config.num_students = 3  # Peers.
  config.pcl_shared_stages = 2
  config.pcl_temperature = 3.0
  config.pcl_ema_decay = 0.999
  config.pcl_rampup_epochs = 80
  config.num_epochs = 300
  config.lr_boundaries = (150, 225)
  config.weight_decay = 5e-4
  return config
