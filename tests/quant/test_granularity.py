"""granularity: parameter shapes, blocked views, broadcasting and per-block reductions."""

import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.quant import QuantSpec, fake_quant, granularity


def _channel(axis):
  return QuantSpec(granularity="channel", axis=axis)


def _group(axis, group_size):
  return QuantSpec(granularity="group", axis=axis, group_size=group_size)


# --- axis and group_size validation ----------------------------------------------------------


@pytest.mark.parametrize(
  ("axis", "ndim", "allowed"),
  [(2, 2, "-2..1"), (-3, 2, "-2..1"), (3, 3, "-3..2"), ((0, 5), 3, "-3..2"), (1, 1, "-1..0")],
)
def test_channel_axis_out_of_range_raises_naming_axis_and_allowed_range(axis, ndim, allowed):
  shape = (4,) * ndim
  with pytest.raises(ValueError, match="axis") as err:
    granularity.param_shape(_channel(axis), shape)
  assert allowed in str(err.value)


def test_group_axis_out_of_range_raises_naming_axis_and_allowed_range():
  with pytest.raises(ValueError, match=r"axis.*-2\.\.1"):
    granularity.param_shape(_group(2, 2), (4, 4))


def test_axis_out_of_range_is_reported_by_fake_quant():
  with pytest.raises(ValueError, match=r"axis.*-2\.\.1"):
    fake_quant(jnp.ones((3, 4)), jnp.ones(4), spec=_channel(2))


def test_same_axis_named_twice_raises():
  with pytest.raises(ValueError, match="axis"):
    granularity.param_shape(_channel((0, -2)), (3, 4))


@pytest.mark.parametrize(
  ("shape", "axis", "group_size"), [((8, 2), 0, 3), ((6, 10), -1, 4), ((2, 5, 3), 1, 2)]
)
def test_group_size_that_does_not_divide_the_axis_raises_naming_group_size(shape, axis, group_size):
  with pytest.raises(ValueError, match=f"group_size={group_size}"):
    granularity.param_shape(_group(axis, group_size), shape)


def test_group_size_larger_than_the_axis_raises():
  with pytest.raises(ValueError, match="group_size"):
    granularity.param_shape(_group(0, 16), (8, 3))


# --- param_shape -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_tensor_param_shape_is_scalar(shape):
  assert granularity.param_shape(QuantSpec(), shape) == ()


@pytest.mark.parametrize(
  ("axis", "expected"),
  [(0, (3,)), (1, (4,)), (2, (5,)), (-1, (5,)), (-3, (3,)), ((0, 2), (3, 5)), ((2, 0), (3, 5))],
)
def test_channel_param_shape_keeps_the_channel_axes_in_order(axis, expected):
  assert granularity.param_shape(_channel(axis), (3, 4, 5)) == expected


def test_channel_param_shape_with_negative_tuple_axes():
  assert granularity.param_shape(_channel((-1, 1)), (3, 4, 5)) == (4, 5)
  assert granularity.param_shape(_channel((0, 1, 2)), (3, 4, 5)) == (3, 4, 5)


@pytest.mark.parametrize(
  ("shape", "axis", "group_size", "expected"),
  [
    ((8, 6), 0, 4, (2, 6)),
    ((8, 6), 1, 3, (8, 2)),
    ((8, 6), -1, 6, (8, 1)),
    ((8, 6), 0, 1, (8, 6)),
    ((2, 8, 3), 1, 2, (2, 4, 3)),
  ],
)
def test_group_param_shape_divides_the_grouped_axis(shape, axis, group_size, expected):
  assert granularity.param_shape(_group(axis, group_size), shape) == expected


@pytest.mark.parametrize(
  ("spec", "shape", "expected"),
  [
    (QuantSpec(), (3, 4), 12),
    (_channel(0), (3, 4), 4),
    (_channel(-1), (3, 4), 3),
    (_channel((0, 2)), (3, 4, 5), 4),
    (_group(0, 4), (8, 6), 4),
    (_group(1, 3), (8, 6), 3),
  ],
)
def test_elements_per_param(spec, shape, expected):
  assert granularity.elements_per_param(spec, shape) == expected


# --- blocked views, broadcasting, reductions -------------------------------------------------


def test_to_blocks_is_identity_for_tensor_and_channel():
  x = jnp.arange(12.0).reshape(3, 4)
  for spec in (QuantSpec(), _channel(0)):
    np.testing.assert_array_equal(granularity.to_blocks(x, spec), x)


def test_to_blocks_splits_the_grouped_axis():
  x = jnp.arange(48.0).reshape(8, 6)
  blocks = granularity.to_blocks(x, _group(0, 4))
  assert blocks.shape == (2, 4, 6)
  np.testing.assert_array_equal(blocks[1, 2], x[6])
  blocks = granularity.to_blocks(x, _group(1, 3))
  assert blocks.shape == (8, 2, 3)
  np.testing.assert_array_equal(blocks[5, 1], x[5, 3:6])


@pytest.mark.parametrize(
  ("spec", "shape", "np_reduce"),
  [
    (QuantSpec(), (3, 4), lambda x: x.max()),
    (_channel(0), (3, 4), lambda x: x.max(axis=1)),
    (_channel(-1), (3, 4), lambda x: x.max(axis=0)),
    (_channel((0, 2)), (3, 4, 5), lambda x: x.max(axis=1)),
    (_group(0, 4), (8, 3), lambda x: x.reshape(2, 4, 3).max(axis=1)),
    (_group(1, 2), (3, 6), lambda x: x.reshape(3, 3, 2).max(axis=2)),
  ],
)
def test_reduce_blocks_gives_one_value_per_parameter(spec, shape, np_reduce):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  out = granularity.reduce_blocks(jnp.max, granularity.to_blocks(jnp.asarray(x), spec), spec, shape)
  out = jnp.reshape(out, granularity.param_shape(spec, shape))
  np.testing.assert_array_equal(out, np_reduce(x))


@pytest.mark.parametrize(
  ("spec", "shape", "np_expand"),
  [
    (_channel(0), (3, 4), lambda p: np.broadcast_to(p[:, None], (3, 4))),
    (_channel(-1), (3, 4), lambda p: np.broadcast_to(p[None, :], (3, 4))),
    (_channel((0, 2)), (3, 4, 5), lambda p: np.broadcast_to(p[:, None, :], (3, 4, 5))),
    (_group(0, 4), (8, 3), lambda p: np.repeat(p, 4, axis=0)),
    (_group(1, 2), (3, 6), lambda p: np.repeat(p, 2, axis=1)),
  ],
)
def test_expand_param_broadcasts_each_parameter_over_its_block(spec, shape, np_expand):
  p = np.arange(np.prod(granularity.param_shape(spec, shape)), dtype=np.float32) + 1.0
  p = p.reshape(granularity.param_shape(spec, shape))
  blocks = granularity.to_blocks(jnp.zeros(shape), spec)
  expanded = (blocks + granularity.expand_param(jnp.asarray(p), spec, shape)).reshape(shape)
  np.testing.assert_array_equal(expanded, np_expand(p))


# --- check_param_shape -----------------------------------------------------------------------


@pytest.mark.parametrize(
  ("spec", "shape", "bad"),
  [
    (QuantSpec(), (3, 4), (2,)),
    (QuantSpec(), (3, 4), (4,)),
    (_channel(-1), (3, 4), (3,)),
    (_channel(-1), (3, 4), ()),
    (_channel(-1), (3, 4), (1, 4)),
    (_channel((0, 1)), (3, 4), (4, 3)),
    (_group(0, 4), (8, 3), (8, 3)),
    (_group(0, 4), (8, 3), (2,)),
  ],
)
def test_check_param_shape_rejects_the_wrong_shape_naming_param_and_expected(spec, shape, bad):
  expected = granularity.param_shape(spec, shape)
  with pytest.raises(ValueError, match="scale") as err:
    granularity.check_param_shape("scale", jnp.ones(bad), spec, shape)
  assert str(expected) in str(err.value)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_check_param_shape_accepts_any_single_element_for_per_tensor(shape):
  granularity.check_param_shape("scale", jnp.ones(shape), QuantSpec(), (3, 4))


def test_check_param_shape_accepts_the_natural_shape():
  granularity.check_param_shape("s", jnp.ones((2, 3)), _group(0, 4), (8, 3))
  granularity.check_param_shape("s", jnp.ones((3, 5)), _channel((0, 2)), (3, 4, 5))


def test_normalize_axes_sorts_and_wraps():
  assert granularity.normalize_axes(-1, 3) == (2,)
  assert granularity.normalize_axes((2, -3), 3) == (0, 2)
