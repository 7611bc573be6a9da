"""Prints the input pipeline's start-up time and steady-state images/s per host (process), CIFAR- and ImageNet-style.

  python scripts/benchmark_input.py                                   # synthetic data of both sizes
  python scripts/benchmark_input.py --cifar_data_dir DIR --cifar_tfds_name cifar10_jpeg --cifar_dataset cifar10
  python scripts/benchmark_input.py --imagenet_folder /path/to/imagenet_folder --workers 0 2

For every setting: start-up = seconds from creating the iterator to the first batch (for grain workers: spawning
them, their imports, and the first batch); steady = images/s over the batches after --warmup_batches more, plus
images per CPU-second of this process and its worker processes (the per-core efficiency, meaningful on a busy
machine). Run enough batches that prefetch buffers (a few batches) do not inflate the steady rate.

CIFAR: decoded once into an array (the first run decodes and caches it; start-up includes loading that), then
augmented per batch in NumPy. ImageNet: PIL decode + RandomResizedCrop + flip per example, in grain worker processes
(--workers N) or threads (0). Synthetic ImageNet-size images are random pixels (no JPEG decoding), so they overstate
real throughput; use --imagenet_folder (<root>/train/<class>/*.JPEG, <root>/val/<class>/*) for real JPEGs.
The script's own imports stay inside main(): grain's workers are spawned and re-import the main module. A dataset that
cannot be read is one line on stderr and exit status 1; --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# errors imports nothing heavy: grain workers re-import this module.
from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cpu_seconds() -> float:
  """CPU seconds (user + system) used so far by this process and its live children (grain workers)."""
  import psutil  # pylint: disable=g-import-not-at-top
  process = psutil.Process()
  total = sum(process.cpu_times()[:2])
  for child in process.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def _measure(config, batch_size: int, num_batches: int, warmup: int) -> tuple[float, float, float | None]:
  """(start-up seconds to the first batch, steady images/s, steady images per CPU-second or None)."""
  from ffsd_jax import data  # pylint: disable=g-import-not-at-top
  try:
    import psutil  # pylint: disable=g-import-not-at-top,unused-import
    cpu = _cpu_seconds
  except ImportError:
    cpu = None
  start = time.time()
  iterator = data.create_train_iterator(config, global_batch_size=batch_size, process_index=0, process_count=1,
                                        seed=0)
  next(iterator)
  startup = time.time() - start
  for _ in range(warmup):
    next(iterator)
  cpu_start, start = (cpu() if cpu else 0.0), time.time()
  for _ in range(num_batches):
    batch = next(iterator)
  elapsed, cpu_used = time.time() - start, (cpu() - cpu_start if cpu else None)
  iterator.close()
  assert batch['image'].dtype.name == 'uint8'
  images = num_batches * batch_size
  return startup, images / elapsed, (images / cpu_used if cpu_used else None)


def _report(startup: float, rate: float, per_cpu: float | None) -> str:
  cpu = f', {per_cpu:,.0f} images per CPU-second' if per_cpu else ''
  return f'  start-up {startup:.2f} s; steady {rate:,.0f} images/s per host{cpu}'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cifar_dataset', default='synthetic', help="'synthetic', 'cifar100' or 'cifar10'")
  parser.add_argument('--cifar_data_dir', default=None)
  parser.add_argument('--cifar_tfds_name', default=None)
  parser.add_argument('--cifar_batches', type=int, default=400)
  parser.add_argument('--imagenet_folder', default=None, help='image folder of real JPEGs (default: synthetic)')
  parser.add_argument('--imagenet_batches', type=int, default=40)
  parser.add_argument('--imagenet_batch_size', type=int, default=32)
  parser.add_argument('--warmup_batches', type=int, default=5, help='batches after the first, before timing')
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2],
                      help='grain worker counts to compare for ImageNet (0: threads in the main process)')
  parser.add_argument('--skip_imagenet', action='store_true')
  parser.add_argument('--skip_cifar', action='store_true')
  parser.add_argument('--verbosity', type=int, default=0, help='1: show the traceback of an error as well')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  """The command line: a failure is one line on stderr and its exit status (the traceback with --verbosity=1)."""
  args = parse_args(argv)
  with errors.report_errors(verbose=args.verbosity >= 1):
    run(args)


def run(args: argparse.Namespace) -> None:
  """Measures the CIFAR-style pipeline, then the ImageNet-style one per worker count, printing a line for each."""
  if args.imagenet_folder and not args.skip_imagenet and not pathlib.Path(args.imagenet_folder).is_dir():
    raise errors.DataError(f'--imagenet_folder {args.imagenet_folder} is not a folder (expected '
                           '<root>/train/<class>/* and <root>/val/<class>/*).')
  from configs.default import get_config  # pylint: disable=g-import-not-at-top
  from ffsd_jax import data  # pylint: disable=g-import-not-at-top

  if not args.skip_cifar:
    config = get_config()
    config.dataset = args.cifar_dataset
    config.data_dir = args.cifar_data_dir
    config.tfds_name = args.cifar_tfds_name
    config.num_classes = {'cifar10': 10}.get(args.cifar_dataset, 100)
    config.image_size = 32
    info = data.get_dataset_info(config)
    print(f'CIFAR-style training pipeline on {info.name} ({info.num_train_examples} examples), batch 128:')
    print(_report(*_measure(config, 128, args.cifar_batches, args.warmup_batches)), flush=True)

  if args.skip_imagenet:
    return
  for workers in args.workers:
    config = get_config()
    config.image_size = 224
    config.num_classes = 1000
    config.num_data_workers = workers
    if args.imagenet_folder:
      config.dataset = 'image_folder'
      config.image_folder = args.imagenet_folder
      config = _with_classes(config)
    else:
      config.dataset = 'synthetic'
      config.synthetic_num_train_examples = 10_000
    info = data.get_dataset_info(config)
    how = f'{workers} grain worker processes' if workers else 'threads in the main process (0 workers)'
    print(f'ImageNet-style training pipeline on {info.name}, batch {args.imagenet_batch_size}, {how}:')
    print(_report(*_measure(config, args.imagenet_batch_size, args.imagenet_batches, args.warmup_batches)),
          flush=True)


def _with_classes(config):
  """Reads the folder's class count before the real config is built (num_classes must match)."""
  from ffsd_jax.data import sources  # pylint: disable=g-import-not-at-top
  config.num_classes = len(sources.scan_image_folder(config.image_folder)['train'].class_names)
  return config


if __name__ == '__main__':
  main()
