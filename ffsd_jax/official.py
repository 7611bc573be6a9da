"""Official FFSD checkpoints (SJLeo/FFSD, PyTorch) in ffsd_jax, and ffsd_jax leaders back in the official format.

The official trainer saves a leader as `torch.save({'weight': leader.state_dict(), 'epoch': e, 'cfg': opt.model,
'index': 'leader'}, 'model<index>_best.pth')`; the state dict is the leader backbone plus its trans-fusion head
(`trans_fusion_module.*`). The self-distillation decoders and the fusion module are separate models, saved (if at
all) in files of their own, so a leader file holds no transposed convolution. Students are saved the same way without
the head; they are read as well (a leader without a head).

Layouts: conv OIHW <-> HWIO (also the head's depthwise conv, PyTorch (C, 1, 3, 3) <-> project (3, 3, 1, C)), linear
(out, in) <-> (in, out), batch norm weight/bias/running_mean/running_var <-> scale/bias/mean/var. Every transform is a
pure axis permutation, so a round trip is bit-identical. `num_batches_tracked` is ignored on import (PyTorch uses it
only when a BatchNorm has momentum=None, which no official model does) and written on export as the number of training
steps the running statistics have seen when it is known (the export's `step`), else 0; either value leaves
`load_state_dict`, evaluation and further training with the official code unchanged.

`.pth` files are read without torch by a restricted unpickler, over torch's zip format (`archive/data.pkl` +
`archive/data/<n>` storages, torch >= 1.6) and over the legacy stream format (pickles then raw storages) that torch
1.5, the official code's version, writes: only the tensor-rebuild functions, `collections.OrderedDict` and the storage
classes are allowed, so a pickle naming any other global (e.g. `os.system`) is refused naming it. Safetensors files
are read and written by the small codec here (the format is a JSON header and raw little-endian bytes), so neither
direction needs torch: `.pth` files are also written without it (`save_pth`), in the zip format `torch.load` reads.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from typing import Any, Iterable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ffsd_jax import checkpointing
from ffsd_jax import errors
from ffsd_jax import export
from ffsd_jax import models
from ffsd_jax.models.heads import TransFusionHead

# Project registry name -> the official `--model` (`cfg`) name of the same network.
OFFICIAL_CFG = {
    'resnet20': 'resnet20', 'resnet32': 'resnet32', 'resnet56': 'resnet56',
    'wrn16_2': 'wideresnet1602', 'wrn40_2': 'wideresnet4002',
    'densenet40': 'densenet', 'googlenet': 'googlenet',
    'resnet18': 'resnet18', 'resnet34': 'resnet34',
}
TRANS_FUSION_PREFIX = 'trans_fusion_module.'

# GoogLeNet: project branch unit -> (official Sequential name, index of its conv; its BN follows at index + 1).
_GOOGLENET_UNITS = {'b1_0': ('branch1x1', 0), 'b2_0': ('branch3x3', 0), 'b2_1': ('branch3x3', 3),
                    'b3_0': ('branch5x5', 0), 'b3_1': ('branch5x5', 3), 'b3_2': ('branch5x5', 6),
                    'b4_1': ('branch_pool', 1)}


class OfficialFormatError(errors.UserError, ValueError):
  """A checkpoint that cannot be read or mapped; the message names the key, global or file at fault."""


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping.


def _split_block(name: str) -> tuple[str, str]:
  stage, index = name.rsplit('_', 1)  # 'layer2_0' -> ('layer2', '0'); 'dense3_11' -> ('dense3', '11')
  return stage, index


def _module_name(family: str, path: tuple[str, ...]) -> str:
  """The official module name of the project module at `path` (the variable's path without its leaf name)."""
  head, rest = path[0], path[1:]
  if family == 'googlenet':
    offset = {'conv': 0, 'bn': 1}
    if head == 'pre_layers':
      return f'pre_layers.{offset[rest[0]]}'
    if head == 'linear':
      return 'linear'
    sequential, index = _GOOGLENET_UNITS[rest[0]]
    return f'inception_{head}.{sequential}.{index + offset[rest[1]]}'
  if not rest:
    if family == 'wide_resnet' and head == 'fc':
      return 'linear'
    return head  # conv1, bn1, bn, fc
  stage, index = _split_block(head) if '_' in head else (head, None)
  prefix = f'{stage}.{index}' if index is not None else stage
  layer = rest[0]
  if layer == 'shortcut_conv':
    layer = 'shortcut.0' if family == 'wide_resnet' else 'downsample.0'
  elif layer == 'shortcut_bn':
    layer = 'downsample.1'
  return f'{prefix}.{layer}'


_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
               ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


def _to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))  # HWIO -> OIHW (depthwise (3,3,1,C) -> (C,1,3,3))
  if leaf == 'kernel' and array.ndim == 2:
    return np.ascontiguousarray(array.T)  # (in, out) -> (out, in)
  return np.ascontiguousarray(array)


def _from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == 'kernel' and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return np.ascontiguousarray(array)


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _unflatten(items: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in items:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


@functools.lru_cache(maxsize=32)
def _templates(model: str, num_classes: int, num_students: int) -> tuple[Any, Any]:
  """Abstract (shape-only) variables of the leader backbone and of the trans-fusion head."""
  spec = models.get_spec(model)
  size = spec.input_size
  backbone = models.create_backbone(spec.name, num_classes)
  leader = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
  height, width, channels = spec.tap_shapes()[-1]
  head = TransFusionHead(channels, num_students)
  trans = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((1, height, width, channels)),
                                           train=False))
  return leader, trans


def _entries(family: str, variables: Mapping[str, Any], key_prefix: str = '', head: bool = False
             ) -> list[tuple[str, tuple[str, ...], Any]]:
  """(official key, project path (collection, ..., leaf), value or shape) for every variable; BN counters excluded."""
  out = []
  for path, value in _flatten(variables):
    collection, module_path, leaf = path[0], path[1:-1], path[-1]
    module = '.'.join(module_path) if head else _module_name(family, module_path)
    out.append((f'{key_prefix}{module}.{_LEAF_NAMES[(collection, leaf)]}', path, value))
  return out


def _bn_modules(entries: list[tuple[str, tuple[str, ...], Any]]) -> list[str]:
  return [key[:-len('.running_mean')] for key, _, _ in entries if key.endswith('.running_mean')]


def official_keys(model: str, num_classes: int | None = None, num_students: int = 2, trans_fusion: bool = True
                  ) -> dict[str, tuple[int, ...]]:
  """Every key of the official leader's state dict for `model` and its shape (PyTorch layout).

  Args:
    model: project registry name or alias, e.g. 'resnet32', 'wideresnet1602'.
    num_classes: classifier width (default: the architecture's dataset, 100 or 1000).
    num_students: m; the head's 1x1 conv has C·m outputs.
    trans_fusion: include the `trans_fusion_module.*` keys (the official leader has them; a student does not).
  """
  spec = _official_spec(model)
  num_classes = num_classes or spec.default_num_classes
  leader, trans = _templates(spec.name, num_classes, num_students)
  entries = _entries(spec.family, leader)
  if trans_fusion:
    entries += _entries(spec.family, trans, TRANS_FUSION_PREFIX, head=True)
  keys = {key: _torch_shape(value.shape, path[-1]) for key, path, value in entries}
  for module in _bn_modules(entries):
    keys[f'{module}.num_batches_tracked'] = ()
  return keys


def _official_spec(model: str) -> models.BackboneSpec:
  spec = models.get_spec(model)
  if spec.name not in OFFICIAL_CFG:
    raise OfficialFormatError(f'{spec.name} has no counterpart in the official FFSD code; the official architectures '
                              f'are {", ".join(OFFICIAL_CFG)}.')
  return spec


def to_official(leader: Mapping[str, Any], model: str, trans_fusion: Mapping[str, Any] | None = None,
                num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """The official-format state dict of a project leader (and its trans-fusion head).

  Args:
    leader: `{'params': ..., 'batch_stats': ...}` of the leader backbone.
    model: project registry name or alias.
    trans_fusion: `{'params', 'batch_stats'}` of the head, or None for the backbone alone (what a student file holds).
    num_batches_tracked: the value written for every BatchNorm's counter (see the module docstring).

  Returns:
    An ordered dict of NumPy arrays in PyTorch layouts, keyed by the official names.
  """
  spec = _official_spec(model)
  entries = _entries(spec.family, leader)
  if trans_fusion is not None:
    entries += _entries(spec.family, trans_fusion, TRANS_FUSION_PREFIX, head=True)
  state = collections.OrderedDict()
  for key, path, value in entries:
    state[key] = _to_torch_layout(np.asarray(value), path[-1])
  for module in _bn_modules(entries):
    state[f'{module}.num_batches_tracked'] = np.asarray(num_batches_tracked, np.int64)
  return state


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the `module.` prefix `nn.DataParallel` puts on every key (all keys or none)."""
  keys = list(state)
  if keys and all(k.startswith('module.') for k in keys):
    return collections.OrderedDict((k[len('module.'):], v) for k, v in state.items())
  return dict(state)


def guess_architecture(keys: Iterable[str]) -> str | None:
  """The official architecture whose leader key names best match `keys` (Jaccard overlap), or None if none do."""
  keys = {k for k in keys if not k.startswith(TRANS_FUSION_PREFIX)}
  best, best_score = None, 0.0
  for name in OFFICIAL_CFG:
    expected = {k for k in official_keys(name, trans_fusion=False)}
    score = len(keys & expected) / max(len(keys | expected), 1)
    if score > best_score:
      best, best_score = name, score
  return best if best_score > 0.5 else None


def from_official(state: Mapping[str, Any], model: str, num_classes: int | None = None,
                  num_students: int | None = None, require_trans_fusion: bool = False
                  ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Maps an official state dict onto the project's leader (and trans-fusion head) variables.

  Args:
    state: the official state dict (NumPy arrays or anything `np.asarray` accepts); a `module.` prefix is accepted.
    model: project registry name or alias of the expected architecture.
    num_classes: classifier width (default: the architecture's dataset, 100 or 1000).
    num_students: m expected for the head (default: read from the head's 1x1 conv).
    require_trans_fusion: refuse a state dict without the head (a student's).

  Returns:
    `(leader, trans_fusion)`: `{'params', 'batch_stats'}` trees of float32 NumPy arrays; `trans_fusion` is None when
    the state dict has no head.

  Raises:
    OfficialFormatError: naming every missing, unused or wrongly shaped key, and the architecture the keys look like.
  """
  spec = _official_spec(model)
  num_classes = num_classes or spec.default_num_classes
  state = strip_module_prefix(state)
  has_head = any(k.startswith(TRANS_FUSION_PREFIX) for k in state)
  if require_trans_fusion and not has_head:
    raise OfficialFormatError(f'The state dict has no {TRANS_FUSION_PREFIX}* keys: it is not a leader checkpoint (a '
                              f'student\'s, or a leader saved without its trans-fusion head).')
  channels = spec.fusion_channels
  if num_students is None:
    conv = state.get(f'{TRANS_FUSION_PREFIX}conv1_1.weight')
    shape = tuple(np.shape(conv)) if conv is not None else ()
    num_students = shape[0] // channels if len(shape) == 4 and shape[0] % channels == 0 and shape[0] else 2
  leader_t, trans_t = _templates(spec.name, num_classes, num_students)
  entries = [(e, 'leader') for e in _entries(spec.family, leader_t)]
  if has_head:
    entries += [(e, 'trans') for e in _entries(spec.family, trans_t, TRANS_FUSION_PREFIX, head=True)]
  expected = {key for (key, _, _), _ in entries}
  counters = {f'{m}.num_batches_tracked' for m in _bn_modules([e for e, _ in entries])}
  missing = sorted(expected - set(state))
  unused = sorted(set(state) - expected - counters)
  wrong = []
  for (key, path, template), _ in entries:
    if key in state:
      want = _torch_shape(template.shape, path[-1])
      if tuple(np.shape(state[key])) != want:
        wrong.append(f'{key} has shape {tuple(np.shape(state[key]))}, expected {want}')
  if missing or unused or wrong:
    problems = []
    if missing:
      problems.append(f'{len(missing)} missing key(s): {", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}')
    if unused:
      problems.append(f'{len(unused)} unused key(s): {", ".join(unused[:8])}{" ..." if len(unused) > 8 else ""}')
    if wrong:
      problems.append(f'{len(wrong)} key(s) of the wrong shape: {"; ".join(wrong[:8])}')
    guess = guess_architecture(state)
    details = '; '.join(problems)
    if guess and guess != spec.name:
      raise OfficialFormatError(f'The checkpoint is not an official {OFFICIAL_CFG[spec.name]} ({spec.name}) leader: '
                                f'its keys look like the official {OFFICIAL_CFG[guess]} ({guess}); use a config with '
                                f'model={guess!r}. Details: {details}.')
    hint = ''
    if guess == spec.name and wrong:
      hint = f' The keys are those of {spec.name}; check num_classes ({num_classes}) and num_students ({num_students}).'
    raise OfficialFormatError(f'The checkpoint does not match the official {OFFICIAL_CFG[spec.name]} leader '
                              f'({spec.name}): {details}.{hint}')
  leader_items, trans_items = [], []
  for (key, path, _), target in entries:
    array = np.asarray(state[key])
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16):
      raise OfficialFormatError(f'{key} has dtype {array.dtype}; a float tensor was expected.')
    value = _from_torch_layout(array.astype(np.float32), path[-1])
    (leader_items if target == 'leader' else trans_items).append((path, value))
  return _unflatten(leader_items), (_unflatten(trans_items) if has_head else None)


# ----------------------------------------------------------------------------------------------------------------------
# Reading .pth without arbitrary unpickling, and a dependency-free safetensors codec.

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage: its data (zip format), or its key and element offset until the data is read (legacy format)."""

  def __init__(self, data: np.ndarray | None = None, key: str | None = None, offset: int = 0,
               dtype: np.dtype | None = None):
    self.data, self.key, self.offset, self.dtype = data, key, offset, dtype


class _PendingTensor:
  """A legacy-format tensor whose storage bytes follow the pickle; `_materialize` turns it into an array."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _strided(data: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(st < 0 for st in stride):
    raise OfficialFormatError(f'A tensor has an invalid size {size} / stride {stride}: the file is corrupt.')
  if not all(size):
    return np.zeros(size, data.dtype)
  last = offset + sum((s - 1) * st for s, st in zip(size, stride))
  if offset < 0 or last >= data.size:
    raise OfficialFormatError(f'A tensor of shape {size} (offset {offset}, stride {stride}) lies outside its storage '
                              f'of {data.size} elements: the file is truncated or corrupt.')
  view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                         strides=tuple(st * data.itemsize for st in stride))
  return np.array(view)  # A copy: owns its memory, C-contiguous.


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_unused
                    ) -> Any:
  if not isinstance(storage, _Storage):
    raise OfficialFormatError(f'A tensor is rebuilt from a {type(storage).__name__}, not a storage: the file is '
                              f'corrupt.')
  if storage.data is None:
    return _PendingTensor(storage, int(offset), tuple(size), tuple(stride))
  return _strided(storage.data, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_unused) -> Any:
  return data


_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds torch's tensors as NumPy arrays; refuses every global but the rebuild functions and storage types."""

  def __init__(self, file, storage_loader=None):
    super().__init__(file)
    self._storage_loader = storage_loader

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise OfficialFormatError(f'The checkpoint\'s pickle names the global {module}.{name}, which is not a tensor or a '
                              f'container: refusing to load it (it could run arbitrary code).')

  def persistent_load(self, pid: Any) -> Any:
    if self._storage_loader is None or not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
      raise OfficialFormatError(f'Unexpected persistent id {pid!r} in the checkpoint\'s pickle.')
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
      raise OfficialFormatError(f'Unsupported storage type {storage_type!r} in the checkpoint.')
    return self._storage_loader(storage_type.dtype, *pid[2:])


def _read_torch_zip(path: str, archive: zipfile.ZipFile) -> Any:
  names = archive.namelist()
  pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise OfficialFormatError(f'{path} is a zip file but not a torch checkpoint (no <archive>/data.pkl).')
  root = pickles[0][:-len('data.pkl')]
  if f'{root}byteorder' in names and archive.read(f'{root}byteorder').strip() != b'little':
    raise OfficialFormatError(f'{path} was saved on a big-endian machine; re-save it on a little-endian one.')

  def load_storage(dtype: np.dtype, key: str, _location: str, numel: int, *_unused) -> _Storage:
    numel = int(numel)
    name = f'{root}data/{key}'
    if name not in names:
      raise OfficialFormatError(f'{path} lacks the storage record {name}: the file is truncated or corrupt.')
    raw = archive.read(name)
    if len(raw) < numel * dtype.itemsize:
      raise OfficialFormatError(f'{path}: the storage record {name} holds {len(raw)} bytes, {numel} elements of '
                                f'{dtype} need {numel * dtype.itemsize}: the file is corrupt.')
    return _Storage(data=np.frombuffer(raw, dtype=dtype.newbyteorder('<'), count=numel))

  return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


def _materialize(obj: Any, data: Mapping[str, np.ndarray]) -> Any:
  if isinstance(obj, _PendingTensor):
    return _strided(data[obj.storage.key], obj.storage.offset + obj.offset, obj.size, obj.stride)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v, data)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v, data) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, data) for v in obj)
  return obj


def _read_torch_legacy(path: str, f: Any) -> Any:
  """torch's pre-1.6 format (what torch 1.5, the official code's version, writes): pickles, then raw storages.

  The stream holds the magic number, the protocol version, a system-info dict, the object (storages as persistent
  ids ('storage', type, key, location, numel, view)), the sorted storage keys, then per key an int64 element count
  and the elements.
  """
  load = lambda loader=None: _RestrictedUnpickler(f, loader).load()
  if load() != _LEGACY_MAGIC:
    raise OfficialFormatError(f'{path} is a bare pickle, not a torch checkpoint.')
  if load() != _LEGACY_PROTOCOL:
    raise OfficialFormatError(f'{path}: unsupported legacy torch protocol version.')
  sys_info = load()
  if not isinstance(sys_info, dict) or not sys_info.get('little_endian', True):
    raise OfficialFormatError(f'{path} was saved on a big-endian machine; re-save it on a little-endian one.')
  roots: dict[str, tuple[np.dtype, int]] = {}

  def load_storage(dtype: np.dtype, key: str, _location: str, numel: int, view: Any = None) -> _Storage:
    key = str(key)
    previous = roots.setdefault(key, (dtype, int(numel)))
    if previous != (dtype, int(numel)):
      raise OfficialFormatError(f'{path}: the storage {key} is declared twice with different types or sizes.')
    if view is None:
      return _Storage(key=key, dtype=dtype)
    _view_key, offset, _view_size = view
    return _Storage(key=key, offset=int(offset), dtype=dtype)

  obj = load(load_storage)
  keys = load()
  if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
    raise OfficialFormatError(f'{path}: the storage key list does not match the tensors: the file is corrupt.')
  data = {}
  for key in map(str, keys):
    dtype, numel = roots[key]
    header = f.read(8)
    if len(header) < 8:
      raise OfficialFormatError(f'{path} ends before the storage {key}: the file is truncated.')
    (count,) = struct.unpack('<q', header)
    if count != numel:
      raise OfficialFormatError(f'{path}: the storage {key} holds {count} elements, {numel} declared: corrupt file.')
    raw = f.read(numel * dtype.itemsize)
    if len(raw) < numel * dtype.itemsize:
      raise OfficialFormatError(f'{path} ends inside the storage {key}: the file is truncated.')
    data[key] = np.frombuffer(raw, dtype=dtype.newbyteorder('<'), count=numel)
  return _materialize(obj, data)


def read_pth(path: str) -> Any:
  """The object a `torch.save` file holds (zip format, or torch < 1.6's legacy format), tensors as NumPy arrays.

  Never unpickles anything but tensors and containers.

  Raises:
    OfficialFormatError: truncated or corrupt file, or a forbidden global (named).
  """
  with open(path, 'rb') as f:
    magic = f.read(4)
  try:
    if magic[:2] == b'PK':
      try:
        with zipfile.ZipFile(path) as archive:
          return _read_torch_zip(path, archive)
      except zipfile.BadZipFile as e:
        raise OfficialFormatError(f'{path} is not a readable zip file ({e}): the file is truncated or corrupt.') \
            from None
    if magic[:1] != b'\x80':
      raise OfficialFormatError(f'{path} is neither a torch checkpoint nor a pickle: the file is truncated or of '
                                f'another format.')
    with open(path, 'rb') as f:
      return _read_torch_legacy(path, f)
  except OfficialFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (EOFError, UnpicklingError, zlib/CRC errors, ...)
    raise OfficialFormatError(f'{path} cannot be read ({type(e).__name__}: {e}): the file is truncated or corrupt.') \
        from None


class _Global:
  """A global (module, name) written by `_TorchPickler` as a GLOBAL opcode, without importing its module."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce wants a callable; never called here.
    raise NotImplementedError


class _StorageRef:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _TensorRef:
  """Pickles as torch does a CPU tensor: _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""

  def __init__(self, storage: _StorageRef):
    self.storage = storage

  def __reduce__(self):
    array = self.storage.array
    stride = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
    return (_Global('torch._utils', '_rebuild_tensor_v2'),
            (self.storage, 0, tuple(array.shape), stride, False, collections.OrderedDict()))


_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, writing `_Global`s by name and storages as torch's persistent ids."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_global_ref(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global_ref

  def persistent_id(self, obj: Any) -> Any:
    if isinstance(obj, _StorageRef):
      return ('storage', _Global('torch', _STORAGE_NAMES[obj.array.dtype]), obj.key, 'cpu', obj.array.size)
    return None


def save_pth(path: str, obj: Any) -> None:
  """Writes `obj` (dicts, lists, str/int/float and NumPy arrays as tensors) in torch's zip format, without torch.

  `torch.load(path, weights_only=True)` reads it as `torch.save` would have written it (checked by the tests when
  torch is installed), and so does `read_pth`. The file is written atomically.
  """
  storages: list[_StorageRef] = []

  def convert(value):
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
      array = np.array(value, order='C')
      storages.append(_StorageRef(str(len(storages)), array))
      return _TensorRef(storages[-1])
    if isinstance(value, Mapping):
      return type(value)((k, convert(v)) for k, v in value.items()) if isinstance(value, collections.OrderedDict) \
          else {k: convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return type(value)(convert(v) for v in value)
    return value

  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(convert(obj))
  archive = os.path.splitext(os.path.basename(path))[0] or 'archive'
  data = io.BytesIO()
  with zipfile.ZipFile(data, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(f'{archive}/data.pkl', buffer.getvalue())
    z.writestr(f'{archive}/byteorder', 'little')
    for storage in storages:
      z.writestr(f'{archive}/data/{storage.key}', storage.array.astype(storage.array.dtype.newbyteorder('<'),
                                                                        copy=False).tobytes())
    z.writestr(f'{archive}/version', '3\n')
  checkpointing.write_file_atomically(path, data.getvalue())


_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
                       'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
                       'BOOL': np.bool_}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file (the format of the `safetensors` package), atomically."""
  header: dict[str, Any] = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blobs, offset = [], 0
  for key, value in tensors.items():
    array = np.array(value, order='C')
    data = array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
    header[key] = {'dtype': _SAFETENSORS_NAMES[array.dtype], 'shape': list(array.shape),
                   'data_offsets': [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # The data starts 8-byte aligned, as the reference writer does.
  checkpointing.write_file_atomically(path, struct.pack('<Q', len(encoded)) + encoded + b''.join(blobs))


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file: (tensors, metadata)."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    (size,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    metadata = header.pop('__metadata__', {}) or {}
    tensors = collections.OrderedDict()
    for key, info in header.items():
      begin, end = info['data_offsets']
      dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
      shape = tuple(info['shape'])
      if end > len(data) or end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise OfficialFormatError(f'{path}: the tensor {key} lies outside the file: it is truncated or corrupt.')
      tensors[key] = np.frombuffer(data[begin:end], dtype.newbyteorder('<')).reshape(shape).copy()
  except OfficialFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise OfficialFormatError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}).') from None
  return tensors, metadata


def read_official_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads an official checkpoint (`.pth` as the official trainer saves it, a bare state dict, or safetensors).

  Returns:
    `(state_dict, info)`: NumPy arrays by official key; info holds `epoch`, `cfg`, `index` when the file has them.
  """
  with open(path, 'rb') as f:
    head = f.read(8)
  is_zip_or_pickle = head[:2] == b'PK' or head[:1] == b'\x80'
  if path.endswith('.safetensors') or (not is_zip_or_pickle and len(head) == 8):
    tensors, metadata = load_safetensors(path)
    info = {k: metadata[k] for k in ('epoch', 'cfg', 'index') if k in metadata}
    if 'epoch' in info and str(info['epoch']).lstrip('-').isdigit():
      info['epoch'] = int(info['epoch'])
    return tensors, info
  obj = read_pth(path)
  if isinstance(obj, Mapping) and 'weight' in obj and isinstance(obj['weight'], Mapping):
    info = {k: obj[k] for k in ('epoch', 'cfg', 'index') if k in obj}
    state = obj['weight']
  elif isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values()):
    state, info = obj, {}
  else:
    keys = list(obj)[:6] if isinstance(obj, Mapping) else '-'
    raise OfficialFormatError(f'{path} holds a {type(obj).__name__} (keys {keys}), '
                              f'neither a state dict nor the official trainer\'s {{"weight", "epoch", "cfg", '
                              f'"index"}} checkpoint.')
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise OfficialFormatError(f'{path}: the state dict entry {bad[0]} is not a tensor.')
  return collections.OrderedDict(state), info


def load_official(path: str, model: str, num_classes: int | None = None, num_students: int | None = None,
                  require_trans_fusion: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
  """Reads and maps an official checkpoint: `(leader, trans_fusion or None, info)`; see `from_official`."""
  state, info = read_official_checkpoint(path)
  cfg = info.get('cfg')
  spec = _official_spec(model)
  try:
    leader, trans = from_official(state, spec.name, num_classes, num_students, require_trans_fusion)
  except OfficialFormatError as e:
    saved = f' (the file records cfg={cfg!r})' if cfg is not None else ''
    raise OfficialFormatError(f'{path}{saved}: {e}') from None
  return leader, trans, info


# ----------------------------------------------------------------------------------------------------------------------
# Export folders.


def write_export(export_dir: str, leader: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
  """Writes the export folder `export.export_leader` writes, from leader variables (a folder this call created is
  removed again if writing fails).

  Returns:
    The absolute export folder.
  """
  export_dir = os.path.abspath(export_dir)
  created = not os.path.isdir(export_dir)
  try:
    return export.write_leader_export(export_dir, dict(leader), dict(metadata))
  except BaseException:
    if created and os.path.isdir(export_dir):
      shutil.rmtree(export_dir)
    raise


def _mean_std(config: Any) -> list[list[float]]:
  from ffsd_jax.data import normalization  # pylint: disable=g-import-not-at-top
  dataset = config.get('dataset', 'cifar100')
  if dataset in ('cifar100', 'cifar10'):
    name = dataset
  elif dataset == 'imagenet2012':
    name = 'imagenet'
  else:
    name = config.get('normalization') or ('cifar100' if int(config.image_size) <= 64 else 'imagenet')
  return [list(map(float, v)) for v in normalization.get_mean_std(name)]


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert_official_to_export(checkpoint: str, config: Any, export_dir: str) -> str:
  """Reads an official leader checkpoint, maps it onto `config.model`, and writes a project export folder.

  The metadata has export.py's keys (`step` 0 and `checkpoint` the source file: no project training step exists) and
  `official`: {file, sha256, epoch, cfg, index, num_students}. Nothing is written when anything fails.
  """
  checkpoint = os.path.abspath(checkpoint)
  leader, trans, info = load_official(checkpoint, config.model, int(config.num_classes),
                                      None, require_trans_fusion=False)
  spec = models.get_spec(config.model)
  metadata = {
      'model': spec.name,
      'network': 'leader',
      'num_classes': int(config.num_classes),
      'image_size': int(config.image_size),
      'mean_std': _mean_std(config),
      'compute_dtype': config.get('compute_dtype', 'float32'),
      'dataset': config.get('dataset'),
      'step': 0,
      'checkpoint': checkpoint,
      'official': {
          'file': checkpoint, 'sha256': file_sha256(checkpoint),
          'epoch': info.get('epoch'), 'cfg': info.get('cfg'), 'index': info.get('index'),
          'num_students': (None if trans is None else
                           int(trans['params']['conv1_1']['kernel'].shape[-1] // spec.fusion_channels)),
      },
  }
  return write_export(export_dir, leader, metadata)


def write_official(out_path: str, leader: Mapping[str, Any], model: str, trans_fusion: Mapping[str, Any] | None = None,
                   epoch: int = 0, step: int = 0, index: str = 'leader') -> list[str]:
  """Writes an official-format checkpoint as `<out>.pth` and `<out>.safetensors`, without torch.

  The `.pth` is what the official trainer saves, {'weight': state_dict, 'epoch', 'cfg', 'index'}, in torch's zip
  format (`save_pth`); the safetensors file holds the same state dict with epoch/cfg/index as string metadata.
  `out_path` may end in `.pth` or `.safetensors` (the suffix is replaced). Returns the files written.
  """
  spec = _official_spec(model)
  state = to_official(leader, spec.name, trans_fusion, num_batches_tracked=int(step))
  base = out_path
  for suffix in ('.pth', '.safetensors'):
    if base.endswith(suffix):
      base = base[:-len(suffix)]
  cfg = OFFICIAL_CFG[spec.name]
  written = [f'{base}.safetensors', f'{base}.pth']
  save_safetensors(written[0], state, {'epoch': epoch, 'cfg': cfg, 'index': index, 'format': 'pt'})
  try:
    save_pth(written[1], {'weight': state, 'epoch': int(epoch), 'cfg': cfg, 'index': index})
  except BaseException:
    os.remove(written[0])  # Both files or neither.
    raise
  return written


# ----------------------------------------------------------------------------------------------------------------------
# Initialising training from a converted leader.


def load_leader_source(source: str, model: str, num_classes: int, num_students: int | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """Leader (and head, if the source has one) variables from a project export folder or an official file."""
  if os.path.isdir(source):
    metadata, leader = export.read_export(source)
    if models.get_spec(metadata['model']).name != models.get_spec(model).name:
      raise OfficialFormatError(f'{source} holds a {metadata["model"]} leader; the config trains {model}.')
    return leader, None
  leader, trans, _ = load_official(source, model, num_classes, num_students)
  return leader, trans


def init_leader_from(state: Any, source: str, model: str, num_classes: int, num_students: int,
                     students: bool = False) -> Any:
  """A train state whose leader (and head, and optionally students) start from `source`; a fresh optimizer state.

  Args:
    state: a `TrainState` (freshly created; its step is kept).
    source: a project export folder or an official checkpoint file.
    model, num_classes, num_students: the config's `model`, `num_classes`, `num_students`.
    students: also copy the leader backbone into every `student_i` (same architecture, so the shapes always match).

  Returns:
    The new state: replaced leaves keep the sharding of the leaves they replace; `opt_state = tx.init(params)`.
  """
  leader, trans = load_leader_source(source, model, num_classes, num_students)
  params, batch_stats = dict(state.params), dict(state.batch_stats)
  targets = ['leader'] + ([k for k in params if k.startswith('student_')] if students else [])
  replacements = {target: leader for target in targets}
  if trans is not None and 'trans_fusion' in params:
    replacements['trans_fusion'] = trans

  def place(old, new, where):
    new = np.asarray(new)
    if tuple(old.shape) != new.shape:
      raise OfficialFormatError(f'{where}: shape {new.shape} from {source} does not fit {tuple(old.shape)}.')
    sharding = getattr(old, 'sharding', None)
    return jax.device_put(new.astype(old.dtype), sharding) if sharding is not None else jnp.asarray(new, old.dtype)

  for target, variables in replacements.items():
    for collection, tree in (('params', params), ('batch_stats', batch_stats)):
      if target not in tree:
        continue
      old_flat = dict(_flatten(tree[target]))
      new_flat = dict(_flatten(variables.get(collection, {})))
      if set(old_flat) != set(new_flat):
        raise OfficialFormatError(f'{collection}[{target!r}] and {source} have different variables: '
                                  f'{sorted(set(old_flat) ^ set(new_flat))[:5]}.')
      tree[target] = _unflatten((p, place(old_flat[p], new_flat[p], f'{collection}/{target}/{"/".join(p)}'))
                                for p in old_flat)
  # tx.init under jit with the old state's shardings: eager ops on arrays spanning several processes are not allowed.
  leaves = jax.tree.leaves(state.opt_state)
  if leaves and all(isinstance(x, jax.Array) for x in leaves):
    opt_state = jax.jit(state.tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, state.opt_state))(params)
  else:
    opt_state = state.tx.init(params)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


# ----------------------------------------------------------------------------------------------------------------------
# Project checkpoints and exports -> official format.


def export_official_from_workdir(config_or_setup: Any, workdir: str, out_path: str | None = None,
                                 checkpoint: str = 'best') -> list[str]:
  """`--mode export --format=pytorch`: the deployed network of a checkpoint (FFSD's leader with its trans-fusion head)
  in the official format.

  Writes `<out_path>.pth` and `<out_path>.safetensors` (default `workdir/export/modelleader_best`, the official file
  name); `epoch` is the number of completed epochs of the checkpoint's step, `num_batches_tracked` its step.

  Args:
    config_or_setup: the run's config, or its `run_setup.build(config)`.
    workdir: the training run's folder.
    out_path: the files' path without extension.
    checkpoint: 'best' or 'latest'.

  Returns:
    The paths written (empty on processes other than 0).
  """
  from ffsd_jax import inference  # pylint: disable=g-import-not-at-top  (the training stack, only here)
  restored = inference.restore_for_inference(config_or_setup, workdir, checkpoint)
  setup, state = restored.setup, restored.state
  local = lambda tree: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
  # The deployed network (the leader, or the method's own choice, e.g. student_0) is written as the official leader.
  leader = local(inference.deployed_variables(setup, state))
  trans = None
  if setup.deployed_network == 'leader' and 'trans_fusion' in state.params:
    trans = local({'params': state.params['trans_fusion'], 'batch_stats': state.batch_stats['trans_fusion']})
  out_path = out_path or os.path.join(workdir, 'export', 'modelleader_best')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  if jax.process_index() != 0:
    return []
  written = write_official(out_path, leader, setup.config.model, trans,
                           epoch=restored.step // setup.steps_per_epoch, step=restored.step)
  logging.info('Wrote %s (%s, step %d) in the official format: %s.', setup.deployed_network, setup.config.model,
               restored.step, ', '.join(written))
  return written


def export_official_from_export(export_dir: str, out_path: str) -> list[str]:
  """The backbone of a project export folder in the official format (an export holds no trans-fusion head).

  The official leader's `load_state_dict` then needs `strict=False` (the head's keys are missing), or load it into the
  official model built without `leader=True`, whose keys it matches exactly.
  """
  metadata, leader = export.read_export(export_dir)
  official = metadata.get('official') or {}
  return write_official(out_path, leader, metadata['model'], None, epoch=int(official.get('epoch') or 0),
                        step=int(metadata.get('step') or 0))
