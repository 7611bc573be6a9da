"""Augmentation exactly as the official code (docs/method.md §9), on uint8 pixels; normalisation comes later, on device.

CIFAR: Pad(4, reflect), RandomHorizontalFlip, RandomCrop(32), vectorised over a batch in NumPy.
ImageNet: torchvision's RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) with its 10-try fallback and
RandomHorizontalFlip for training; Resize(256) + CenterCrop(224) for evaluation; both on PIL images with bilinear
resampling, as torchvision does for PIL inputs.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

CIFAR_PAD = 4


def cifar_augment_params(rng: np.random.Generator, batch_size: int, image_size: int, pad: int = CIFAR_PAD
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-image crop offsets (top, left) in [0, 2*pad] of the padded image and flip flags."""
  tops = rng.integers(0, 2 * pad + 1, batch_size)
  lefts = rng.integers(0, 2 * pad + 1, batch_size)
  flips = rng.random(batch_size) < 0.5
  return tops, lefts, flips


def cifar_augment(images: np.ndarray, tops: np.ndarray, lefts: np.ndarray, flips: np.ndarray,
                  pad: int = CIFAR_PAD) -> np.ndarray:
  """Pad(pad, reflect), then flip where `flips`, then crop back to the input size at (tops, lefts); uint8 in/out.

  The reference's order: the padded image is flipped first and the crop offsets refer to the flipped image. Column
  x of the flipped padded image is column (W + 2*pad - 1 - x) of the unflipped one, so the crop is taken from the
  mirrored window and reversed. One slice per image: faster than a vectorised gather for 32x32 images.
  """
  batch, height, width = images.shape[:3]
  # numpy's 'reflect' mode is torchvision's padding_mode='reflect': mirror without repeating the edge pixel.
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  padded_width = width + 2 * pad
  out = np.empty_like(images)
  for b in range(batch):
    top, left = int(tops[b]), int(lefts[b])
    if flips[b]:
      start = padded_width - left - width
      out[b] = padded[b, top:top + height, start:start + width][:, ::-1]
    else:
      out[b] = padded[b, top:top + height, left:left + width]
  return out


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: (top, left, crop height, crop width), with the central fallback."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback to a central crop, clamping the aspect ratio into range.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train_transform(image: PIL.Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
  """RandomResizedCrop(size) + RandomHorizontalFlip on an RGB PIL image -> uint8 (size, size, 3)."""
  top, left, h, w = random_resized_crop_params(rng, image.height, image.width)
  crop = image.crop((left, top, left + w, top + h)).resize((size, size), PIL.Image.BILINEAR)
  array = np.asarray(crop, np.uint8)
  if rng.random() < 0.5:
    array = array[:, ::-1]
  return np.ascontiguousarray(array)


def resize_shorter_side(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
  """torchvision Resize(size) with an int: the shorter side becomes `size`, the longer int(size * long / short)."""
  width, height = image.size
  if width <= height:
    new_width, new_height = size, int(size * height / width)
  else:
    new_width, new_height = int(size * width / height), size
  if (new_width, new_height) == (width, height):
    return image
  return image.resize((new_width, new_height), PIL.Image.BILINEAR)


def center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
  """torchvision CenterCrop(size) for an image at least `size` on both sides."""
  top = int(round((image.height - size) / 2.0))
  left = int(round((image.width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def imagenet_eval_transform(image: PIL.Image.Image, size: int, resize_size: int) -> np.ndarray:
  """Resize(resize_size) + CenterCrop(size) on an RGB PIL image -> uint8 (size, size, 3)."""
  return np.asarray(center_crop(resize_shorter_side(image, resize_size), size), np.uint8)
