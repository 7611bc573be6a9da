"""Smoke run: the whole FFSD system (2 students, leader, fusion, decoders) on synthetic data in about a minute on CPU.

Random pixels and labels: accuracies stay at chance (about 10%); the run shows that training, logging, evaluation,
checkpointing, --mode eval and --mode export work end to end, without any dataset download.

Run:
  python main.py --config configs/smoke.py --workdir /tmp/ffsd_smoke
  python main.py --config configs/smoke.py --workdir /tmp/ffsd_smoke --mode eval
  python main.py --config configs/smoke.py --workdir /tmp/ffsd_smoke --mode export

Expected: 2 epochs of 16 steps, `eval/top1/leader` near 10 (chance on 10 classes) in /tmp/ffsd_smoke/metrics.jsonl,
and --mode eval reproducing the leader's best logged top-1 exactly.
"""

from configs.default import get_config as get_default_config


def get_config():
  """Synthetic data, resnet8_tiny, 2 short epochs."""
  config = get_default_config()
  config.model = 'resnet8_tiny'
  config.dataset = 'synthetic'
  config.num_classes = 10
  config.normalization = 'cifar10'
  config.synthetic_num_train_examples = 512
  config.synthetic_num_eval_examples = 256
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 2
  config.lr_boundaries = (1, 2)
  config.lambda_warmup_epochs = 1
  config.log_every_steps = 4
  config.checkpoint_every_steps = 16
  return config
