"""Backbones split into stage ranges (`create_backbone(..., stages=(start, stop))`) recompose the full network exactly.

For every family and split point k, the variables of stages (0, k) and (k, n) partition the full network's variable
tree by top-level name, and running (0, k) then (k, n) with the full network's variables gives bit-identical logits,
taps and updated batch statistics. Two checks, both in train and eval mode:

- the chained ranges trace to the same jaxpr as the full network, i.e. the very same operations on the same values
  (tracing compiles nothing, so this covers every family and split cheaply);
- running them gives arrays equal to the full network's (np.testing.assert_array_equal). This runs eagerly (no jit):
  op by op the split and the full network execute the same kernels, and small eager kernels compile much faster than
  whole networks on a 2-core CPU. By default it runs for the small families only: every distinct layer shape of
  DenseNet-40 and GoogLeNet costs an eager compilation per mode (about a minute in all on a loaded 2-core CPU), and the
  jaxpr check already proves their split computes the same operations. FFSD_TEST_STAGE_VALUES=all runs them too.

Variables are random NumPy values shaped by `jax.eval_shape` (random running statistics make eval mode differ from
train mode).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffsd_jax import models
from test_models import random_variables  # pylint: disable=g-bad-import-order

KEY = jax.random.key(0)
CLASSES = 10
BATCH = 2
# The smallest registered backbone of each family.
FAMILY_MODELS = ('resnet8_tiny', 'wrn16_2', 'densenet40', 'googlenet', 'resnet_imagenet_tiny')
# The families whose split is also run numerically (see the module docstring).
VALUE_MODELS = FAMILY_MODELS if os.environ.get('FFSD_TEST_STAGE_VALUES') == 'all' else (
    'resnet8_tiny', 'wrn16_2', 'resnet_imagenet_tiny')


def _abstract_images(model: str) -> jax.ShapeDtypeStruct:
  size = models.get_spec(model).input_size
  return jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)


def _images(model: str) -> jax.Array:
  shape = _abstract_images(model).shape
  return jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)


def _abstract_variables(module, inputs):
  return jax.eval_shape(lambda x: module.init(KEY, x, train=True), inputs)


@functools.lru_cache(maxsize=None)
def _abstract_range_variables(model: str, start: int, stop: int, input_shape: tuple[int, ...], input_dtype):
  """The variables that stages (start, stop) create, as shapes (cached: tracing a large network's init is slow)."""
  module = models.create_backbone(model, CLASSES, stages=(start, stop))
  return _abstract_variables(module, jax.ShapeDtypeStruct(input_shape, input_dtype))


@functools.lru_cache(maxsize=None)
def _abstract_full_variables(model: str):
  return _abstract_variables(models.create_backbone(model, CLASSES), _abstract_images(model))


@functools.lru_cache(maxsize=None)
def _full_variables(model: str):
  return random_variables(_abstract_full_variables(model))


def _slice_variables(full_variables, abstract_part):
  """The full network's variables under the top-level names that a stage range creates (`abstract_part`)."""
  return {collection: {key: full_variables[collection][key] for key in tree}
          for collection, tree in abstract_part.items()}


def _shapes(tree):
  return jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)


def _apply(module, variables, inputs, train: bool):
  """(outputs, taps, updated batch_stats or None) of one module."""
  if not train:
    return (*module.apply(variables, inputs, train=False), None)
  (outputs, taps), updates = module.apply(variables, inputs, train=True, mutable=['batch_stats'])
  return outputs, taps, updates['batch_stats']


def _chain(model: str, boundaries: tuple[int, ...], variables, images, train: bool):
  """Runs the stage ranges between consecutive `boundaries` in sequence, each with its slice of the full `variables`.

  Returns:
    (logits, taps, merged updated batch_stats or None), and the variables of each range.
  """
  x, all_taps, new_stats, parts = images, [], {}, []
  for start, stop in zip(boundaries[:-1], boundaries[1:]):
    abstract = _abstract_range_variables(model, start, stop, tuple(x.shape), x.dtype)
    part = _slice_variables(variables, abstract)
    assert _shapes(part) == _shapes(dict(abstract)), f'stages {start}:{stop} build variables of other shapes'
    parts.append(part)
    x, taps, stats = _apply(models.create_backbone(model, CLASSES, stages=(start, stop)), part, x, train)
    assert len(taps) == stop - start
    if stop < boundaries[-1]:
      assert x is taps[-1]  # The features of a range that stops early are its last tap.
    all_taps += taps
    new_stats.update(stats or {})
  return (x, tuple(all_taps), new_stats if train else None), parts


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@functools.lru_cache(maxsize=None)
def _full_jaxpr(model: str, train: bool) -> str:
  full = models.create_backbone(model, CLASSES)
  return str(jax.make_jaxpr(lambda v, x: _apply(full, v, x, train))(_abstract_full_variables(model),
                                                                    _abstract_images(model)))


def _assert_same_jaxpr(model: str, boundaries: tuple[int, ...], train: bool) -> list[dict[str, tuple[str, ...]]]:
  """Asserts the chained ranges trace to the full network's jaxpr; returns each range's variable names per collection.

  Tracing runs nothing, so abstract variables and images suffice.
  """
  names = []

  def chain(variables, images):
    outputs, parts = _chain(model, boundaries, variables, images, train)
    names.extend({collection: tuple(tree) for collection, tree in part.items()} for part in parts)
    return outputs

  chain_jaxpr = jax.make_jaxpr(chain)(_abstract_full_variables(model), _abstract_images(model))
  assert str(chain_jaxpr) == _full_jaxpr(model, train), f'stages {boundaries} of {model} compute something else'
  return names


def _assert_partition(model: str, names: list[dict[str, tuple[str, ...]]], boundaries: tuple[int, ...]):
  """The ranges' variable names are disjoint, cover the full tree, and merge back into it."""
  full_variables = _abstract_full_variables(model)
  assert {collection for part in names for collection in part} == set(full_variables)
  for collection, tree in full_variables.items():
    keys = [key for part in names for key in part.get(collection, ())]
    assert len(keys) == len(set(keys)), f'{collection}: stage ranges {boundaries} share variables'
    assert set(keys) == set(tree), f'{collection}: stage ranges {boundaries} do not cover the full network'
  merged = models.merge_stage_variables(*({collection: dict.fromkeys(keys) for collection, keys in part.items()}
                                          for part in names))
  assert {collection: set(tree) for collection, tree in merged.items()} == {
      collection: set(tree) for collection, tree in full_variables.items()}


def _assert_same_values(model: str, boundaries: tuple[int, ...], train: bool):
  variables, images = _full_variables(model), _images(model)
  expected = _apply(models.create_backbone(model, CLASSES), variables, images, train)
  outputs, parts = _chain(model, boundaries, variables, images, train)
  _assert_trees_equal(outputs, expected)
  _assert_trees_equal(models.merge_stage_variables(*parts), variables)


def _two_way_splits(model: str) -> list[tuple[int, int, int]]:
  num_stages = models.get_spec(model).num_taps
  return [(0, split, num_stages) for split in range(1, num_stages)]


@pytest.mark.parametrize('model', FAMILY_MODELS)
def test_two_stage_ranges_partition_the_variables_and_trace_to_the_full_network(model):
  for boundaries in _two_way_splits(model):
    for train in (True, False):
      _assert_partition(model, _assert_same_jaxpr(model, boundaries, train), boundaries)


@pytest.mark.parametrize('model', VALUE_MODELS)
@pytest.mark.parametrize('train', [True, False])
def test_two_stage_ranges_give_the_full_network_outputs(model, train):
  for boundaries in _two_way_splits(model):
    _assert_same_values(model, boundaries, train)


@pytest.mark.parametrize('train', [True, False])
def test_three_stage_ranges_recompose_the_full_network(train):
  boundaries = (0, 1, 3, 4)
  _assert_partition('resnet_imagenet_tiny', _assert_same_jaxpr('resnet_imagenet_tiny', boundaries, train), boundaries)
  _assert_same_values('resnet_imagenet_tiny', boundaries, train)


def test_full_range_is_the_full_network_and_init_matches_by_name():
  """stages=(0, n) is the full network, and initialising a range gives the full network's values for its variables."""
  images = _images('resnet8_tiny')
  full = models.create_backbone('resnet8_tiny', CLASSES)
  full_variables = full.init(KEY, images, train=True)
  _assert_trees_equal(models.create_backbone('resnet8_tiny', CLASSES, stages=(0, 3)).init(KEY, images, train=True),
                      full_variables)
  _, taps = full.apply(full_variables, images, train=False)
  tail_variables = models.create_backbone('resnet8_tiny', CLASSES, stages=(1, 3)).init(KEY, taps[0], train=True)
  _assert_trees_equal(tail_variables, _slice_variables(full_variables, tail_variables))


@pytest.mark.parametrize('stages', [(0, 0), (2, 1), (-1, 2), (0, 4), (3, 3), (0,), (0, 1, 2), 'ab', (0.0, 1),
                                    (False, 1), 2])
def test_bad_stages_raise_with_the_valid_range(stages):
  with pytest.raises(ValueError, match=r'resnet8_tiny has 3 stages.*0 <= start < stop <= 3'):
    models.create_backbone('resnet8_tiny', CLASSES, stages=stages)
  # A module built directly (not through the registry) checks its attribute the same way.
  module = models.get_spec('googlenet').builder(num_classes=CLASSES, stages=stages)
  with pytest.raises(ValueError, match=r'googlenet has 3 stages.*0 <= start < stop <= 3'):
    jax.eval_shape(lambda x: module.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


@pytest.mark.parametrize('model, shape', [('resnet8_tiny', (1, 32, 32, 3)), ('resnet8_tiny', (1, 16, 16, 4)),
                                          ('densenet40', (1, 32, 32, 24)), ('googlenet', (1, 32, 32, 192)),
                                          ('wrn16_2', (1, 16, 16, 32)), ('resnet_imagenet_tiny', (1, 16, 16, 16))])
def test_a_range_after_the_stem_rejects_anything_but_the_previous_tap(model, shape):
  module = models.create_backbone(model, CLASSES, stages=(1, models.get_spec(model).num_taps))
  with pytest.raises(ValueError, match=r'takes the output of stage 0'):
    jax.eval_shape(lambda x: module.init(KEY, x, train=True), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_merge_stage_variables_names_a_duplicated_key():
  head = {'params': {'conv1': 1, 'layer1_0': 2}, 'batch_stats': {'bn1': 3}}
  tail = {'params': {'layer1_0': 4, 'fc': 5}}
  with pytest.raises(ValueError, match=r"params\['layer1_0'\] is defined by both part 0 and part 1"):
    models.merge_stage_variables(head, tail)
  assert models.merge_stage_variables(head, {'params': {'fc': 5}}) == {
      'params': {'conv1': 1, 'layer1_0': 2, 'fc': 5}, 'batch_stats': {'bn1': 3}}
