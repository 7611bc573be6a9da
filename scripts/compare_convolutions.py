r"""XLA's convolutions against PyTorch's (oneDNN, as the official code runs them), layer shape by layer shape.

For one config's backbone it traces a training-mode forward pass, lists every distinct 2-D convolution in it (input
shape, kernel, stride, groups) with how often one network runs it, and times each shape on both sides in alternating
rounds: the forward pass, and forward + backward (the input and the kernel gradients, as training needs them). The
project side is the convolution as the model emits it (NHWC, HWIO) jitted with the train step's compiler options
(`sharding.step_compiler_options`: the YNNPACK library fusions on a CPU); the official side is `torch.nn.functional.
conv2d` on C-contiguous NCHW tensors, as the official networks call it, with the same number of threads. Each row also
gives the time one network spends in that shape (count × forward + backward), and the totals say how much of one
network's training pass the convolutions take on each side. Nothing else of the step (batch norm, ReLU, the losses,
the optimizer) is timed here: `scripts/profile_step.py` profiles the whole step.

torch is imported only here, never by training. A refusal (no such config, no torch) is one line on stderr and exit
status 2; --verbosity=1 adds the traceback.

Examples:
  python scripts/compare_convolutions.py --config configs/cifar100_resnet32.py
  python scripts/compare_convolutions.py --config configs/cifar100_resnet32.py --batch_size 128 --rounds 5 \
      --output /tmp/convs.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)

from ffsd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

# (input NHWC, kernel HWIO, strides, padding, feature groups): one distinct convolution.
ConvShape = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...], int]


def backbone_convolutions(config, batch_size: int) -> collections.Counter:
  """Counts the distinct convolutions of one backbone's training-mode forward pass (traced, not run)."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jax.extend  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ffsd_jax import data as data_lib  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ffsd_jax import models  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.dataset = 'synthetic'  # The shapes only: same image size and classes, nothing to read.
  info = data_lib.get_dataset_info(config)
  backbone = models.create_backbone(config.model, info.num_classes)
  images = jax.ShapeDtypeStruct((batch_size, info.image_size, info.image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x, train=False), images)

  def forward(variables, images):
    return backbone.apply(variables, images, train=True, mutable=['batch_stats'])

  counts = collections.Counter()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        dims = eqn.params['dimension_numbers']
        if (dims.lhs_spec, dims.rhs_spec) != ((0, 3, 1, 2), (3, 2, 0, 1)):
          raise ValueError(f'expected NHWC/HWIO convolutions, got {dims}')
        counts[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), tuple(eqn.params['window_strides']),
                tuple(tuple(p) for p in eqn.params['padding']), eqn.params['feature_group_count'])] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(forward)(variables, images).jaxpr)
  if not counts:
    raise ValueError(f'{config.model}: no convolutions found')
  return counts


def xla_timers(shape: ConvShape, compiler_options: dict[str, Any] | None
               ) -> tuple[Callable[[], None], Callable[[], None]]:
  """The convolution jitted as the model emits it: (forward, forward + input and kernel gradients) callables."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  lhs_shape, rhs_shape, strides, padding, groups = shape
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.standard_normal(lhs_shape, np.float32))
  w = jax.device_put(rng.standard_normal(rhs_shape, np.float32) * 0.1)

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups)

  out_shape = jax.eval_shape(conv, x, w).shape
  cotangent = jax.device_put(rng.standard_normal(out_shape, np.float32))

  def forward_backward(x, w, cotangent):
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(cotangent)

  forward = jax.jit(conv, compiler_options=compiler_options).lower(x, w).compile()
  both = jax.jit(forward_backward, compiler_options=compiler_options).lower(x, w, cotangent).compile()
  return (lambda: jax.block_until_ready(forward(x, w)),
          lambda: jax.block_until_ready(both(x, w, cotangent)))


def torch_timers(shape: ConvShape) -> tuple[Callable[[], None], Callable[[], None]]:
  """The same convolution in PyTorch, NCHW / OIHW C-contiguous: (forward, forward + backward) callables."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,import-outside-toplevel,invalid-name

  lhs_shape, rhs_shape, strides, padding, groups = shape
  n, h, w_, c = lhs_shape
  kh, kw, cin, cout = rhs_shape
  # The models pad symmetrically, as PyTorch does (`layers.torch_padding`), so torch takes the same padding.
  if any(lo != hi for lo, hi in padding):
    raise ValueError(f'{describe(shape)}: asymmetric padding {padding} has no PyTorch conv2d equivalent')
  torch_padding = tuple(lo for lo, _ in padding)
  generator = torch.Generator().manual_seed(0)
  x = torch.randn(n, c, h, w_, generator=generator).contiguous()
  weight = (torch.randn(cout, cin, kh, kw, generator=generator) * 0.1).contiguous()
  x_grad = x.clone().requires_grad_(True)
  weight_grad = weight.clone().requires_grad_(True)
  with torch.no_grad():
    cotangent = torch.randn_like(F.conv2d(x, weight, stride=strides, padding=torch_padding, groups=groups))

  def forward():
    with torch.no_grad():
      F.conv2d(x, weight, stride=strides, padding=torch_padding, groups=groups)

  def forward_backward():
    x_grad.grad = None
    weight_grad.grad = None
    F.conv2d(x_grad, weight_grad, stride=strides, padding=torch_padding, groups=groups).backward(cotangent)

  return forward, forward_backward


def time_calls(call: Callable[[], None], repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def describe(shape: ConvShape) -> str:
  """'128x32x32x16 3x3 16->16 s1' (batch x H x W x C, kernel, channels, stride; 'g4' for groups)."""
  (n, h, w, c), (kh, kw, cin, cout), strides, _, groups = shape
  text = f'{n}x{h}x{w}x{c} {kh}x{kw} {cin * groups}->{cout} s{strides[0]}'
  return text + (f' g{groups}' if groups > 1 else '')


def compare(config, batch_size: int, rounds: int, repeats: int, threads: int) -> dict[str, Any]:
  """Times every distinct convolution of the config's backbone on both sides; returns rows and totals."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ffsd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  torch.set_num_threads(threads)
  mesh = sharding_lib.create_mesh(jax.devices()[:1])
  compiler_options = sharding_lib.step_compiler_options(mesh, config)
  rows = []
  for shape, count in sorted(backbone_convolutions(config, batch_size).items(), key=lambda item: -item[1]):
    timers = {'xla': xla_timers(shape, compiler_options), 'torch': torch_timers(shape)}
    times = {side: {'forward': [], 'forward_backward': []} for side in timers}
    for side, (forward, both) in timers.items():  # Warm-up: first calls, allocator, library plans.
      time_calls(forward, 2)
      time_calls(both, 2)
    for _ in range(rounds):
      for side, (forward, both) in timers.items():
        times[side]['forward'] += time_calls(forward, repeats)
        times[side]['forward_backward'] += time_calls(both, repeats)
    row = {'shape': describe(shape), 'count_per_network': count}
    for side in timers:
      for kind in ('forward', 'forward_backward'):
        row[f'{side}_{kind}_ms'] = 1e3 * statistics.median(times[side][kind])
      row[f'{side}_per_network_ms'] = count * row[f'{side}_forward_backward_ms']
    row['ratio_forward_backward'] = row['xla_forward_backward_ms'] / row['torch_forward_backward_ms']
    rows.append(row)
    print(f'{row["shape"]:32s} x{count:<3d} forward {row["xla_forward_ms"]:7.2f} / {row["torch_forward_ms"]:7.2f} ms   '
          f'fwd+bwd {row["xla_forward_backward_ms"]:7.2f} / {row["torch_forward_backward_ms"]:7.2f} ms   '
          f'ratio {row["ratio_forward_backward"]:.2f}', flush=True)
  totals = {side: sum(row[f'{side}_per_network_ms'] for row in rows) for side in ('xla', 'torch')}
  return {'model': config.model, 'batch_size': batch_size, 'rounds': rounds, 'repeats': repeats,
          'torch_threads': torch.get_num_threads(), 'torch_version': torch.__version__,
          'compiler_options': compiler_options or {}, 'rows': rows,
          'xla_per_network_ms': totals['xla'], 'torch_per_network_ms': totals['torch'],
          'ratio_per_network': totals['xla'] / totals['torch']}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--config', required=True, help='Experiment config file (its model and dataset are used).')
  parser.add_argument('--batch_size', type=int, default=None, help="Default: the config's.")
  parser.add_argument('--rounds', type=int, default=3, help='Alternating rounds per shape.')
  parser.add_argument('--repeats', type=int, default=5, help='Timed calls per side, kind and round.')
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)), help='torch.set_num_threads.')
  parser.add_argument('--output', default=None, help='Also write the results as JSON.')
  parser.add_argument('--verbosity', type=int, default=0, help='1: show the traceback of an error as well.')
  return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
  """Times the config's convolutions on both sides, printing one line per shape and the totals."""
  if not os.path.isfile(args.config):
    raise errors.UsageError(f'compare_convolutions: --config {args.config!r} is not a file')
  try:
    import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel,unused-import
  except ImportError as error:
    raise errors.UsageError('compare_convolutions: needs torch for the official side (`pip install torch --index-url '
                     'https://download.pytorch.org/whl/cpu`); training never needs it.') from error
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ffsd_jax import studies  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  config = studies.load_config_file(args.config, _REPO_ROOT)
  batch_size = args.batch_size or config.batch_size
  print(f'# jax {jax.__version__} on {jax.devices()[0].device_kind}, python {platform.python_version()}, '
        f'{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; {config.model}, '
        f'batch {batch_size}; times are project (XLA) / official (torch) medians', flush=True)
  result = compare(config, batch_size, args.rounds, args.repeats, args.threads)
  print(f'# one network\'s convolutions, forward + backward: XLA {result["xla_per_network_ms"]:.0f} ms, torch '
        f'{result["torch_per_network_ms"]:.0f} ms, ratio {result["ratio_per_network"]:.2f}', flush=True)
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(result, f, indent=2)


def main(argv: list[str] | None = None) -> None:
  """The command line: a failure is one line on stderr and its exit status (the traceback with --verbosity=1)."""
  args = parse_args(argv)
  with errors.report_errors(verbose=args.verbosity >= 1):
    run(args)

if __name__ == '__main__':
  main()
