"""Writes the committed fixtures for reading torch files without torch (needs torch).

  python tests/data/official/make_torch_fixture.py   # written with torch 2.13.0

torch_saved_tiny.pth is torch's zip format (torch >= 1.6); torch_saved_tiny_legacy.pth the same object in the legacy
format that torch 1.5, the official code's version, writes (`_use_new_zipfile_serialization=False`). Each holds what
the official trainer saves ({'weight', 'epoch', 'cfg', 'index'}) with `nn.DataParallel`'s `module.` prefix, and the
cases a reader must get right: a view with an offset and strides sharing its storage with another tensor,
float16/bfloat16/float64/int32/bool storages and an int64 scalar (num_batches_tracked).
"""

import collections
import os

import torch

base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5) / 7
state = collections.OrderedDict([
    ('module.conv.weight', base),
    ('module.fc.weight', base[:, :, 1].t()),  # (4, 3), storage offset 1, strides (5, 20): shares `base`'s storage
    ('module.half', torch.arange(6, dtype=torch.float16) / 3),
    ('module.bf16', torch.arange(4, dtype=torch.bfloat16) / 3),
    ('module.double', torch.arange(3, dtype=torch.float64) / 3),
    ('module.bn.num_batches_tracked', torch.tensor(12345, dtype=torch.long)),
    ('module.int32', torch.tensor([1, -2, 3], dtype=torch.int32)),
    ('module.mask', torch.tensor([True, False])),
])
checkpoint = {'weight': state, 'epoch': 7, 'cfg': 'resnet32', 'index': 'leader'}
folder = os.path.dirname(os.path.abspath(__file__))
torch.save(checkpoint, os.path.join(folder, 'torch_saved_tiny.pth'))
torch.save(checkpoint, os.path.join(folder, 'torch_saved_tiny_legacy.pth'), _use_new_zipfile_serialization=False)
