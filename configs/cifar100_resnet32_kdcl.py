"""KDCL-MinLogit (Guo et al., "Online Knowledge Distillation via Collaborative Learning", CVPR 2020) on CIFAR-100
with ResNet-32: 2 networks, T = 2, λ = 1, on this repository's CIFAR schedule (299 epochs, batch 128, SGD 0.1 with
×0.1 after epochs 150 and 225, weight decay 1e-4), the one FFSD and DML train with here.

Run:
  python main.py --config configs/cifar100_resnet32_kdcl.py --workdir runs/cifar100_resnet32_kdcl

Expected: the KDCL paper reports no CIFAR-100 ResNet-32 number for this setting; the PCL paper's comparison (Wu &
Gong, AAAI 2021, Table 1, as reproduced in the README of shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-
Distillation) lists KDCL with ResNet-32 on CIFAR-100 at 73.76 ± 0.34 (its own re-run, not this config's exact
setting). The number to compare is `best_leader_top1` in runs/.../summary.json (student_0's best-epoch test top-1).
--config.kdcl_teacher=naive trains KDCL-Naive.
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-32, KDCL-MinLogit with 2 networks."""
  config = get_default_config()
  config.method = 'kdcl'
  config.num_students = 2
  config.kdcl_teacher = 'minlogit'
  config.kdcl_kl_weight = 1.0
  config.kdcl_temperature = 2.0
  return config
