"""MCL(×2) (Yang et al., "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022) on CIFAR-100
with ResNet-32, as the official README trains it (winycg/MCL, `python main_cifar.py --arch resnet32 --number-net 2
--alpha 0.1 --gamma 1. --beta 0.1 --lam 1.`): 2 independent networks with 128-d embedding heads, τ = 0.1, T = 3;
300 epochs, batch 128, SGD 0.1 (Nesterov momentum 0.9), weight decay 5e-4, the official per-epoch cosine learning
rate (`lr_schedule='cosine'`: 0.1 · ½(1 + cos(π·e/300)) in 0-based epoch e), and the official class-balanced batches
(`batch_images_per_class=2`: 64 classes × 2 images, so every anchor has one positive).

Run:
  python main.py --config configs/cifar100_resnet32_mcl.py --workdir runs/cifar100_resnet32_mcl
  MCL(×4), whose networks share the stem and first stage:  ... --config.num_students=4

Expected: the MCL README (winycg/MCL) reports ResNet-32 on CIFAR-100 at 72.96 ± 0.28 for MCL(×2) and 74.04 ± 0.07 for
MCL(×4) (three runs each, best network of each run). The number to compare is `best_leader_top1` in
runs/.../summary.json (network 0, best-epoch test top-1); expect it somewhat below the README's, which take the best
of the networks.
"""

from configs.default import get_config as get_default_config


def get_config():
  """CIFAR-100, ResNet-32, MCL with 2 networks."""
  config = get_default_config()
  config.method = 'mcl'
  config.num_students = 2  # Networks; 4 for MCL(×4).
  config.mcl_embedding_dim = 128
  config.mcl_contrast_temperature = 0.1
  config.mcl_temperature = 3.0
  config.mcl_vcl_weight = 0.1
  config.mcl_soft_vcl_weight = 1.0
  config.mcl_icl_weight = 0.1
  config.mcl_soft_icl_weight = 1.0
  config.num_epochs = 300
  config.lr_schedule = 'cosine'  # main_cifar.py's --lr-type default; `lr_boundaries` do not enter.
  config.batch_images_per_class = 2  # MPerClassSampler(m=2): 64 classes × 2 images per batch of 128.
  config.weight_decay = 5e-4
  return config
