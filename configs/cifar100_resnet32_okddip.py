"""OKDDip (Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020) on CIFAR-100 with ResNet-32, as
the official code (DefangChen/OKDDip, `python train_GL.py --model resnet32 --dataset CIFAR100`) trains it: 3
auxiliary peers and 1 group leader (its `--num_branches 4`) on a trunk of the first two stages, attention
projections 64 → 8, T = 3, α = 1, the KL ramp-up over 80 epochs; 300 epochs, batch 128, SGD 0.1 (Nesterov momentum
0.9) with ×0.1 after epochs 150 and 225, weight decay 5e-4.

Run:
  python main.py --config configs/cifar100_resnet32_okddip.py --workdir runs/cifar100_resnet32_okddip

Expected: the OKDDip paper's own CIFAR-100 ResNet-32 figure is not quoted here (it could not be checked); the PCL
paper's comparison (Wu & Gong, AAAI 2021, Table 1, as reproduced in the README of
shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation) lists OKDDip with ResNet-32 on CIFAR-100 at
73.25 ± 0.38. The number to compare is `best_leader_top1` in runs/.../summary.json (trunk + group leader, the
network the official code tracks, best-epoch test top-1); `eval/top1/ensemble` is the peers' logit mean.
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-32, OKDDip with 3 peers and a group leader."""
  config = get_default_config()
  config.method = 'okddip'
  config.num_students = 3  # Auxiliary peers; the group leader is one more branch.
  config.okddip_shared_stages = 2
  config.okddip_temperature = 3.0
  config.okddip_kl_weight = 1.0
  config.okddip_rampup_epochs = 80
  config.num_epochs = 300
  config.lr_boundaries = (150, 225)
  config.weight_decay = 5e-4
  return config
