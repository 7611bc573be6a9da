r"""The FFSD step against the official PyTorch iteration (SJLeo/FFSD), timed side by side in one run.

For each config it builds the official CIFAR trainer (`CIFARTrainer.Trainer`: 2 students, leader, fusion module and
self-distillation decoders, its own SGD/Adam optimizers) from an unmodified checkout, and the project's jitted train
step (`scripts/benchmark.py`'s `compile_step`) for the same architecture, batch size and images, then alternates
rounds: official N iterations, project N steps, official, project, ... It prints, per side, the median, min and max of
all timed iterations and the ratio project/official of the medians.

The official side is its own `Trainer.train_with_test` called unmodified on a loader of pre-made, normalised batches
(already on the device), so data loading and host-to-device copies are excluded on both sides. Each iteration is timed
from the loader handing out a batch to the loop asking for the next one (after `torch.cuda.synchronize()` on a GPU).

What had to be worked around from the outside (the checkout's files are never edited):
  - `utils/html.py` imports `dominate` (only for visdom/HTML pages): a stub module stands in for it.
  - `opt` comes from the official argparse parser's defaults (`options.options.parser`, `--dataroot` a dummy) with
    `gpu_ids` turned into a list as `options.parse()` does, `display_id=0` (no visdom server) and `no_html=True`.
  - `CIFARTrainer.create_dataLoader` is replaced by a fake loader (no torchvision, no CIFAR download); the logger has
    no handlers, so the loop's periodic log line costs what formatting costs.
  - `lambda_warmup(epoch)` is called first, as `Trainer.train()` does before each epoch.

torch is imported only here, never by training. With `--device cpu`, CUDA is hidden from both sides. A refusal (no
official checkout, an unknown config) is one line on stderr and exit status 2; --verbosity=1 adds the traceback.

Examples:
  python scripts/compare_official.py --official_src /tmp/ffsd_official
  python scripts/compare_official.py --official_src /tmp/ffsd_official --configs resnet32,resnet32:bfloat16,wrn16_2 \
      --rounds 3 --steps 5 --output /tmp/compare.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)
sys.path.insert(0, os.path.join(_REPO_ROOT, 'scripts'))

from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

# Files an official checkout has; a folder without them is refused before torch is imported.
_OFFICIAL_FILES = ('CIFARTrainer.py', 'models/__init__.py', 'models/self_distillation.py', 'models/fusion_module.py',
                   'options/options.py', 'utils/util.py', 'utils/visualizer.py')
# The official data/cifar100.py normalisation (mean, std) of CIFAR-100.
_OFFICIAL_MEAN_STD = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
# len(trainLoader.dataset) sets the official loop's log interval (every len // batch // 10 iterations).
_CIFAR_TRAIN_EXAMPLES = 50000


class OfficialCheckoutError(ValueError):
  """The --official_src folder is not an unmodified SJLeo/FFSD checkout."""


def check_official_src(path: str) -> str:
  """Returns the absolute path of an official checkout, or raises OfficialCheckoutError saying what is missing."""
  if not path or not os.path.isdir(path):
    raise OfficialCheckoutError(f'--official_src {path!r} is not a folder; get the official code with '
                                f'`git clone https://github.com/SJLeo/FFSD` (outside this repository).')
  missing = [f for f in _OFFICIAL_FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise OfficialCheckoutError(f'--official_src {path!r} is not an SJLeo/FFSD checkout: missing {", ".join(missing)}.')
  with open(os.path.join(path, 'CIFARTrainer.py')) as f:
    source = f.read()
  if 'class Trainer' not in source or 'def train_with_test' not in source:
    raise OfficialCheckoutError(f'--official_src {path!r}: CIFARTrainer.py has no Trainer.train_with_test; '
                                f'not the code this script was written for.')
  return os.path.abspath(path)


def parse_config_spec(spec: str) -> tuple[str, str]:
  """'resnet32' or 'resnet32:bfloat16' or 'configs/x.py[:dtype]' -> (config path, project compute dtype)."""
  name, _, dtype = spec.partition(':')
  path = name if name.endswith('.py') else os.path.join(_REPO_ROOT, 'configs', f'cifar100_{name}.py')
  if not os.path.isfile(path):
    raise ValueError(f'config {spec!r}: no file {path}')
  return path, dtype or 'float32'


def synthetic_batch(batch_size: int, image_size: int, num_classes: int) -> dict[str, np.ndarray]:
  """The fixed uint8 batch `scripts/benchmark.py` feeds the project step (same generator, same seed)."""
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}


def summarise(times: list[float]) -> dict[str, Any]:
  """Median, min, max and count of per-iteration seconds."""
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times), 'n': len(times)}


def project_timer(config, dtype: str, batch_size: int) -> tuple[Callable[[int], list[float]], dict[str, Any]]:
  """Compiles the project's FFSD step; returns run(n) -> per-step seconds, and facts about the compiled step."""
  import benchmark  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  step = benchmark.compile_step(config, 'ffsd', dtype, batch_size, data='synthetic')
  return step.run, {'compile_s': step.compile_s, 'compiler_options': step.compiler_options, 'model': config.model}


class _Stub(types.ModuleType):
  """A module whose every attribute is a do-nothing callable (for `from dominate.tags import meta, h3, ...`)."""

  def __getattr__(self, name: str):
    if name.startswith('__'):
      raise AttributeError(name)
    return lambda *args, **kwargs: None


def official_timer(src: str, official_model: str, batch: dict[str, np.ndarray], device: str, threads: int
                   ) -> tuple[Callable[[int], list[float]], dict[str, Any]]:
  """Builds the official trainer; returns run(n) -> per-iteration seconds of `train_with_test`, and facts."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  if device == 'cuda' and not torch.cuda.is_available():
    raise RuntimeError('--device cuda but torch sees no CUDA device.')
  sys.path.insert(0, src)
  # utils/html.py needs `dominate` only to write HTML pages (off here); the official requirements pin it, we do not.
  if 'dominate' not in sys.modules:
    try:
      import dominate  # pylint: disable=g-import-not-at-top,import-outside-toplevel,unused-import
    except ImportError:
      sys.modules['dominate'] = _Stub('dominate')
      sys.modules['dominate.tags'] = _Stub('dominate.tags')
  from options import options as official_options  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import CIFARTrainer  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  opt = official_options.parser.parse_args(
      ['--dataroot', '/nonexistent', '--dataset', 'cifar100', '--model', official_model,
       '--train_batch_size', str(len(batch['label']))])
  opt.gpu_ids = [0]  # What options.parse() makes of the default '0'.
  opt.display_id = 0  # No visdom server.
  opt.no_html = True  # No web folder.

  mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in _OFFICIAL_MEAN_STD)
  # ToTensor + Normalize, C-contiguous NCHW as its DataLoader yields: a transposed view is channels-last to torch,
  # which its convolutions propagate and its `attention_loss` `.view` rejects.
  images = np.ascontiguousarray((batch['image'].transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std)
  torch_device = torch.device('cuda:0' if device == 'cuda' else 'cpu')
  inputs = torch.from_numpy(images).to(torch_device)
  labels = torch.from_numpy(batch['label'].astype(np.int64)).to(torch_device)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  class _Dataset:
    def __len__(self):
      return _CIFAR_TRAIN_EXAMPLES

  class _Loader:
    """Hands out the pre-made batch `num_batches` times, stamping the time at each hand-out and at the end."""

    def __init__(self):
      self.dataset = _Dataset()
      self.num_batches = 0
      self.stamps: list[float] = []

    def __iter__(self):
      self.stamps = []
      for _ in range(self.num_batches):
        sync()
        self.stamps.append(time.perf_counter())
        yield inputs, labels
      sync()
      self.stamps.append(time.perf_counter())

  loader = _Loader()
  CIFARTrainer.create_dataLoader = lambda opt: types.SimpleNamespace(trainLoader=loader, testLoader=None)
  logger = logging.getLogger('compare_official.official')
  logger.propagate = False
  logger.addHandler(logging.NullHandler())
  trainer = CIFARTrainer.Trainer(opt, logger)
  epoch = 10  # Past the 5-epoch lambda warm-up: every loss term at full weight (no effect on the work done).
  trainer.lambda_warmup(epoch)

  def run(num_steps: int) -> list[float]:
    loader.num_batches = num_steps
    trainer.train_with_test(epoch, topk=(1,))
    return [b - a for a, b in zip(loader.stamps[:-1], loader.stamps[1:])]

  return run, {'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
               'official_model': official_model, 'torch_device': str(torch_device)}


def compare(src: str, spec: str, device: str, rounds: int, steps: int, warmup: int, threads: int,
            batch_size: int | None) -> dict[str, Any]:
  """Alternating A/B rounds for one config; returns both sides' figures and the ratio."""
  from ffsd_jax import data as data_lib  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ffsd_jax import official  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ffsd_jax import studies  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  path, dtype = parse_config_spec(spec)
  config = studies.load_config_file(path, _REPO_ROOT)
  batch_size = batch_size or config.batch_size
  if config.model not in official.OFFICIAL_CFG:
    raise ValueError(f'{spec}: model {config.model!r} has no official counterpart')
  with config.unlocked():
    config.dataset = 'synthetic'
  info = data_lib.get_dataset_info(config)
  run_official, official_facts = official_timer(
      src, official.OFFICIAL_CFG[config.model], synthetic_batch(batch_size, info.image_size, info.num_classes),
      device, threads)
  run_project, project_facts = project_timer(config, dtype, batch_size)
  run_official(warmup)
  run_project(1 + warmup)  # The first call and the warm-up are not timed.
  official_times, project_times = [], []
  for r in range(rounds):
    official_times += run_official(steps)
    project_times += run_project(steps)
    print(f'#   round {r + 1}/{rounds}: official {statistics.median(official_times[-steps:]):.3f} s, '
          f'project {statistics.median(project_times[-steps:]):.3f} s', flush=True)
  result = {'config': os.path.relpath(path, _REPO_ROOT), 'model': config.model, 'batch_size': batch_size,
            'official_dtype': 'float32', 'project_dtype': dtype, 'device': device, 'rounds': rounds,
            'steps_per_round': steps, 'warmup': warmup, 'official': summarise(official_times),
            'project': summarise(project_times), **official_facts, **project_facts}
  result['ratio_project_over_official'] = result['project']['median_s'] / result['official']['median_s']
  return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--official_src', required=True, help='Unmodified SJLeo/FFSD checkout (outside this repo).')
  parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
  parser.add_argument('--configs', default='resnet32,resnet32:bfloat16,wrn16_2,densenet40',
                      help='Comma-separated NAME[:PROJECT_DTYPE] (configs/cifar100_NAME.py) or PATH.py[:DTYPE].')
  parser.add_argument('--batch_size', type=int, default=None, help='Default: the config\'s (the official 128).')
  parser.add_argument('--rounds', type=int, default=3, help='A/B rounds.')
  parser.add_argument('--steps', type=int, default=5, help='Timed iterations per side per round.')
  parser.add_argument('--warmup', type=int, default=2, help='Untimed iterations per side before the rounds.')
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)), help='torch.set_num_threads.')
  parser.add_argument('--output', default=None, help='Also write the results as JSON.')
  parser.add_argument('--verbosity', type=int, default=0, help='1: show the traceback of an error as well.')
  return parser.parse_args(argv)


def checked_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
  """(official checkout, config specs), or UsageError naming what is wrong; before torch or JAX are imported."""
  try:
    src = check_official_src(args.official_src)
    specs = args.configs.split(',')
    for spec in specs:
      parse_config_spec(spec)
  except ValueError as error:  # OfficialCheckoutError included.
    raise errors.UsageError(f'compare_official: {error}') from error
  return src, specs


def run(args: argparse.Namespace) -> None:
  """Compares every config, printing one line per config (and per round)."""
  src, specs = checked_inputs(args)
  if args.device == 'cpu':
    os.environ['CUDA_VISIBLE_DEVICES'] = ''  # Before torch and JAX start: both sides on the CPU.
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  if args.device == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
  elif jax.default_backend() != 'gpu':
    raise errors.UsageError(f'compare_official: --device cuda but JAX runs on {jax.default_backend()}')

  print(f'# jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, python '
        f'{platform.python_version()}, {platform.processor() or platform.machine()}, '
        f'{len(os.sched_getaffinity(0))} cores; official {src}', flush=True)
  results = []
  for spec in specs:
    result = compare(src, spec, args.device, args.rounds, args.steps, args.warmup, args.threads, args.batch_size)
    results.append(result)
    o, p = result['official'], result['project']
    print(f'# {result["model"]} B{result["batch_size"]} official fp32 (torch {result["torch_version"]}, '
          f'{result["torch_threads"]} threads) vs project {result["project_dtype"]}: '
          f'official {o["median_s"]:.3f} s ({o["min_s"]:.3f}-{o["max_s"]:.3f}, n={o["n"]}), '
          f'project {p["median_s"]:.3f} s ({p["min_s"]:.3f}-{p["max_s"]:.3f}, n={p["n"]}), '
          f'project/official {result["ratio_project_over_official"]:.2f}', flush=True)
    if args.output:
      with open(args.output, 'w') as f:
        json.dump({'jax_version': jax.__version__, 'python': platform.python_version(), 'results': results}, f,
                  indent=1)


def main(argv: list[str] | None = None) -> None:
  """The command line: a failure is one line on stderr and its exit status (the traceback with --verbosity=1)."""
  args = parse_args(argv)
  with errors.report_errors(verbose=args.verbosity >= 1):
    run(args)

if __name__ == '__main__':
  main()
