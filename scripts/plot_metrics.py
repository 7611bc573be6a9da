"""Draws one or several runs' metrics.jsonl to one PNG, to compare runs and methods at a glance.

  python scripts/plot_metrics.py runs/r32_ffsd runs/r32_dml runs/r32_independent --out compare.png

Panels: eval top-1 per epoch of the leader, each student, the fusion classifier and the ensemble (one colour per run,
one line style per network), then one panel per training loss term (averaged over each logging window).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_run(path: str) -> list[dict]:
  """The records of one run (a workdir or a metrics.jsonl file)."""
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
  points = [(r['epoch'], r[key]) for r in records if r.get(key) is not None and 'epoch' in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot(runs: dict[str, list[dict]], out: str) -> str:
  """Writes the figure for `runs` ({label: records}) to `out`; returns `out`."""
  eval_keys = sorted({k for records in runs.values() for r in records for k in r if k.startswith('eval/top1/')})
  loss_keys = sorted({k for records in runs.values() for r in records for k in r
                      if not k.startswith(('eval/', 'accuracy/', 'learning_rate', 'grad_norm', 'steps_per_sec',
                                           'lambda', 'nonfinite'))
                      and k not in ('step', 'epoch') and ('loss' in k or '/' in k)})
  num_panels = 1 + len(loss_keys)
  cols = min(3, num_panels)
  rows = math.ceil(num_panels / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
  axes = axes.ravel()
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  styles = ['-', '--', ':', '-.']
  ax = axes[0]
  for i, (label, records) in enumerate(runs.items()):
    for j, key in enumerate(eval_keys):
      net = key[len('eval/top1/'):]
      x, y = _series(records, key)
      if x:
        ax.plot(x, y, styles[j % len(styles)], marker='.', color=colours[i % len(colours)],
                lw=2.0 if net == 'leader' else 1.0,
                label=f'{label}: {net}')
  ax.set(title='eval top-1 (%)', xlabel='epoch')
  ax.grid(alpha=0.3)
  if eval_keys:
    ax.legend(fontsize='x-small')
  for ax, key in zip(axes[1:], loss_keys):
    for i, (label, records) in enumerate(runs.items()):
      x, y = _series(records, key)
      if x:
        ax.plot(x, y, color=colours[i % len(colours)], label=label)
    ax.set(title=key, xlabel='epoch')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='x-small')
  for ax in axes[num_panels:]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('runs', nargs='+', help='workdirs or metrics.jsonl files; label=path sets a label')
  parser.add_argument('--out', default='metrics.png', help='output PNG')
  args = parser.parse_args(argv)
  runs = {}
  for spec in args.runs:
    label, _, path = spec.rpartition('=') if '=' in spec else (None, None, spec)
    runs[label or os.path.basename(os.path.normpath(path.replace('metrics.jsonl', '')))] = read_run(path)
  print(plot(runs, args.out))


if __name__ == '__main__':
  main(sys.argv[1:])
