"""Defaults shared by every experiment config: the FFSD method on CIFAR-100 with ResNet-32.

The values are the official code's defaults (docs/method.md §6, §8, §9). Experiment configs import `get_config`
from here and override only what differs.

Run:
  python main.py --config configs/default.py --workdir /tmp/ffsd_default
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the default FFSD configuration (CIFAR-100, ResNet-32, 2 students + 1 leader)."""
  config = ml_collections.ConfigDict()
  # Optional values are typed placeholders (None by default) so that `--config.KEY=VALUE` can set them.
  config.seed = 0

  # Networks (docs/method.md §1, §3).
  config.model = 'resnet32'
  config.num_students = 2
  # 'ffsd' | 'dml' | 'independent' | 'kdcl' | 'one' | 'pcl' | 'okddip' | 'mcl' (ffsd_jax/methods/)
  config.method = 'ffsd'
  config.compute_dtype = 'float32'  # 'float32' | 'bfloat16'; parameters and loss math stay float32.

  # Data (docs/method.md §9). `dataset` is 'cifar100', 'cifar10', 'imagenet2012', 'image_folder' or 'synthetic'.
  config.dataset = 'cifar100'
  # TFDS data_dir (prepared with scripts/prepare_data.py); None = TFDS default.
  config.data_dir = config_dict.placeholder(str)
  # Root of <root>/train/<class>/* and <root>/test|val/<class>/* for 'image_folder'.
  config.image_folder = config_dict.placeholder(str)
  config.num_classes = 100
  config.image_size = 32
  # grain worker processes of the ImageNet-style pipeline: -1 = the host's spare cores (all but one); 0 decodes in
  # threads of the main process. The CIFAR-size pipeline needs none.
  config.num_data_workers = -1
  config.synthetic_num_train_examples = 50_000  # Only for dataset='synthetic'.
  config.synthetic_num_eval_examples = 10_000  # Only for dataset='synthetic'.
  # Read a TFDS dataset prepared under another name (e.g. 'cifar10_jpeg').
  config.tfds_name = config_dict.placeholder(str)
  # 'cifar100' | 'cifar10' | 'imagenet' for image folders / synthetic; None = by size.
  config.normalization = config_dict.placeholder(str)
  # Where decoded CIFAR-size arrays are cached; None = the data code's default.
  config.data_cache_dir = config_dict.placeholder(str)
  # ImageNet-style eval: resize to this, then centre-crop; None = size·256/224.
  config.eval_resize_size = config_dict.placeholder(int)
  config.skip_bad_images = False  # Image folders: leave unreadable files out (logged) instead of failing at start-up.
  # Training examples per class held out (chosen from config.seed, never trained on) as a validation split that picks
  # the best checkpoint; 0: none, the best checkpoint is the best test epoch, as in the paper.
  config.validation_examples_per_class = 0
  # Class-balanced batches: m > 0 puts batch_size / m classes in every batch, m examples of each (MCL's sampler, m = 2);
  # 0: shuffled epochs.
  config.batch_images_per_class = 0

  # Optimisation (docs/method.md §8).
  config.batch_size = 128  # Global batch over all devices and hosts.
  config.eval_batch_size = 128
  config.num_epochs = 299  # The reference's range(1, 300) trains 299 epochs.
  # 'cifar': ×0.1 at `lr_boundaries`; 'imagenet': per iteration (docs/method.md §8.3); 'cosine': MCL's per-epoch
  # cosine over num_epochs (the networks; FFSD's decoders keep the step schedule).
  config.lr_schedule = 'cifar'
  config.learning_rate = 0.1
  config.lr_boundaries = (150, 225)  # Epochs (1-based) after which the lr is multiplied by `lr_decay`.
  config.lr_decay = 0.1
  config.momentum = 0.9
  config.weight_decay = 1e-4  # Students and leader (coupled L2, PyTorch style).
  config.fusion_weight_decay = 1e-5
  config.decoder_learning_rate = 1e-3  # Adam for the self-distillation decoders.
  config.decoder_weight_decay = 1e-4

  # FFSD objective (docs/method.md §6).
  config.temperature = 2.0
  config.lambda_diversity = 1e-5
  config.lambda_fusion = 10.0
  config.lambda_self_distillation = 1000.0
  config.lambda_warmup_epochs = 5

  # Newcomer methods' hyper-parameters (ffsd_jax/methods/kdcl.py, one.py, pcl.py), their papers' values; their
  # experiment configs (configs/cifar100_resnet32_{kdcl,one,pcl}.py) also set the papers' schedules and num_students.
  config.kdcl_teacher = 'minlogit'  # KDCL's ensemble teacher: 'minlogit' (KDCL-MinLogit) | 'naive' (KDCL-Naive).
  config.kdcl_kl_weight = 1.0  # λ on each network's T²·KL(teacher ‖ network).
  config.kdcl_temperature = 2.0
  # ONE and PCL split `model` into a shared trunk of this many stages and `num_students` branches; None = all stages
  # but the last (the official ONE ResNets branch the last stage).
  config.one_shared_stages = config_dict.placeholder(int)
  config.one_temperature = 3.0
  config.one_rampup_epochs = 80  # The KL terms are scaled by exp(-5(1 - e/80)^2), e the 0-based epoch; 0 = off.
  config.pcl_shared_stages = config_dict.placeholder(int)
  config.pcl_temperature = 3.0
  config.pcl_ema_decay = 0.999  # The peer mean teachers' EMA decay (min(1 - 1/t, decay) at update t).
  config.pcl_rampup_epochs = 80  # The peer-mean KL terms are scaled by exp(-5(1 - e/80)^2); 0 = off.

  # OKDDip (ffsd_jax/methods/okddip.py; official DefangChen/OKDDip train_GL.py defaults): `num_students` auxiliary
  # peers and one group leader, branches of a trunk of this many stages (None = all stages but the last).
  config.okddip_shared_stages = config_dict.placeholder(int)
  config.okddip_temperature = 3.0
  config.okddip_kl_weight = 1.0  # α on every KL term (the peers' to their attention targets, the leader's).
  config.okddip_rampup_epochs = 80  # The KL terms are scaled by exp(-5(1 - e/80)^2), e the 0-based epoch; 0 = off.
  # MCL (ffsd_jax/methods/mcl.py; official winycg/MCL main_cifar.py with its README's flags, not its parser's 0s).
  # The networks share their first this-many stages; None = the official rule (2 networks: none, else 1); 0 = none.
  config.mcl_shared_stages = config_dict.placeholder(int)
  config.mcl_embedding_dim = 128  # D of each network's embedding head (--feat-dim).
  config.mcl_contrast_temperature = 0.1  # τ of the similarities v_a·v_k/τ (--tau).
  config.mcl_temperature = 3.0  # T of the soft (KL) contrastive terms (--kd_T).
  config.mcl_vcl_weight = 0.1  # α (--alpha).
  config.mcl_soft_vcl_weight = 1.0  # γ (--gamma).
  config.mcl_icl_weight = 0.1  # β (--beta).
  config.mcl_soft_icl_weight = 1.0  # λ (--lam).

  # Loop, logging and checkpoints.
  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.max_steps = -1  # > 0 stops training after this many steps (smoke runs, benchmarks).
  # A fresh run starts its leader (and trans-fusion head) from an export folder or an official FFSD checkpoint
  # (.pth / .safetensors, see scripts/convert_official.py); True also starts every student from that leader.
  config.init_leader_from = config_dict.placeholder(str)
  config.init_students_from_leader = False
  # Resuming with other optimisation values (learning rates, λ's, temperature, compute_dtype, ...) than the
  # checkpoint's is refused unless True; accepted changes are logged to WORKDIR/config_changes.jsonl.
  config.allow_config_change = False
  config.distributed = False  # Call jax.distributed.initialize() (also when the launcher's environment asks).
  # Devices = data × networks: the size of the 'networks' mesh axis. > 1 holds the method's same-architecture
  # networks as one stacked tree split over that axis, each device running its own networks on its data shard
  # (README "Several GPUs"); it must divide the number of networks and the device count.
  config.network_parallelism = 1
  # Batch-norm statistics in training: 'global' (over the global batch, one device's numbers) or 'device' (over each
  # device's data shard, as PyTorch DataParallel in the official code; no per-layer all-reduce).
  config.batch_norm_statistics = 'global'
  # On CPU, compile the steps with XLA's YNNPACK library fusions (about 1.7x faster here; docs/benchmarks.md).
  config.cpu_library_fusions = True
  # Persistent XLA compilation cache (a restart or resume skips the compiles): None = $XDG_CACHE_HOME/ffsd_jax/jax
  # (~/.cache/ffsd_jax/jax) unless JAX_COMPILATION_CACHE_DIR names one; '' = no cache; or a folder.
  config.jax_cache_dir = config_dict.placeholder(str)
  return config
