"""Prints the input pipeline's images/s per host (process) for a CIFAR-style and an ImageNet-style training stream.

  python scripts/benchmark_input.py                                   # synthetic data of both sizes
  python scripts/benchmark_input.py --cifar_data_dir DIR --cifar_tfds_name cifar10_jpeg --cifar_dataset cifar10
  python scripts/benchmark_input.py --imagenet_folder /path/to/imagenet_samples_folder --workers 2

CIFAR: decoded once into an array (the first run decodes and caches it; the timing excludes that), then augmented
per batch in NumPy. ImageNet: PIL decode + RandomResizedCrop + flip per example, in grain workers (--workers) or
threads. Synthetic ImageNet-size images are random pixels (no JPEG decoding), so they overstate real throughput; use
--imagenet_folder (<root>/train/<class>/*.JPEG, <root>/val/<class>/*) for real JPEGs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs.default import get_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from ffsd_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def _measure(config, batch_size: int, num_batches: int, warmup: int = 3) -> float:
  start = time.time()
  iterator = data.create_train_iterator(config, global_batch_size=batch_size, process_index=0, process_count=1,
                                        seed=0)
  for _ in range(warmup):
    next(iterator)
  print(f'  start-up (incl. decode/cache load and {warmup} warm-up batches): {time.time() - start:.1f} s')
  start = time.time()
  for _ in range(num_batches):
    batch = next(iterator)
  elapsed = time.time() - start
  iterator.close()
  assert batch['image'].dtype.name == 'uint8'
  return num_batches * batch_size / elapsed


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cifar_dataset', default='synthetic', help="'synthetic', 'cifar100' or 'cifar10'")
  parser.add_argument('--cifar_data_dir', default=None)
  parser.add_argument('--cifar_tfds_name', default=None)
  parser.add_argument('--cifar_batches', type=int, default=400)
  parser.add_argument('--imagenet_folder', default=None, help='image folder of real JPEGs (default: synthetic)')
  parser.add_argument('--imagenet_batches', type=int, default=10)
  parser.add_argument('--imagenet_batch_size', type=int, default=64)
  parser.add_argument('--workers', type=int, default=0, help='grain worker processes for ImageNet (0: threads)')
  parser.add_argument('--skip_imagenet', action='store_true')
  args = parser.parse_args(argv)

  config = get_config()
  config.dataset = args.cifar_dataset
  config.data_dir = args.cifar_data_dir
  config.tfds_name = args.cifar_tfds_name
  config.num_classes = {'cifar10': 10}.get(args.cifar_dataset, 100)
  config.image_size = 32
  info = data.get_dataset_info(config)
  print(f'CIFAR-style training pipeline on {info.name} ({info.num_train_examples} examples), batch 128:')
  print(f'  {_measure(config, 128, args.cifar_batches):,.0f} images/s per host')

  if args.skip_imagenet:
    return
  config = get_config()
  config.image_size = 224
  config.num_classes = 1000
  config.num_data_workers = args.workers
  if args.imagenet_folder:
    config.dataset = 'image_folder'
    config.image_folder = args.imagenet_folder
    folder_info = data.get_dataset_info(_with_classes(config))
    config.num_classes = folder_info.num_classes
  else:
    config.dataset = 'synthetic'
    config.synthetic_num_train_examples = 10_000
  info = data.get_dataset_info(config)
  print(f'ImageNet-style training pipeline on {info.name}, batch {args.imagenet_batch_size}, '
        f'{args.workers} grain workers:')
  print(f'  {_measure(config, args.imagenet_batch_size, args.imagenet_batches, warmup=1):,.0f} images/s per host')


def _with_classes(config):
  """Reads the folder's class count before the real config is built (num_classes must match)."""
  from ffsd_jax.data import sources  # pylint: disable=g-import-not-at-top
  config.num_classes = len(sources.scan_image_folder(config.image_folder)['train'].class_names)
  return config


if __name__ == '__main__':
  main()
