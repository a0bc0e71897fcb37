"""Accumulator-aware numerics: the sum bound, the data-type bound, the integer simulation and the
per-layer overflow check on exported layers."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from efqat_jax.quant import (
  AccumulatorSpec,
  OverflowReport,
  QuantSpec,
  accumulator,
  apply_integer,
  check_accumulator,
  check_accumulators,
  export_layer,
  ranges,
)
from efqat_jax.quant.accumulator import (
  datatype_bound,
  fits,
  input_range,
  required_bits,
  tile_sums,
  worst_partial_sums,
  zero_centred_l1_limit,
)

DENSE_DN = (((1,), (0,)), ((), ()))
W4 = QuantSpec.for_weights(4)  # per output channel, grid [-7, 7]
A8 = QuantSpec.for_activations(8)  # unsigned, grid [0, 255]

_input_specs = st.builds(QuantSpec, bits=st.integers(2, 8), signed=st.booleans())
_tiles = st.one_of(st.none(), st.integers(1, 12))
# Random integer layers: rows of weights at some width, their inputs' format and tile size.
_LAYERS = dict(
  seed=st.integers(0, 2**16),
  shape=st.tuples(st.integers(1, 5), st.integers(1, 40)),
  weight_bits=st.integers(2, 9),
  input_spec=_input_specs,
  tile=_tiles,
)


def _random_rows(seed, shape, qmax, qmin=None):
  qmin = -qmax if qmin is None else qmin
  return np.random.default_rng(seed).integers(qmin, qmax + 1, size=shape, dtype=np.int64)


def _limit(bits):
  return 2 ** (bits - 1) - 1


# --- AccumulatorSpec ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 0, -3, 65, True, 16.0, "16", None])
def test_accumulator_spec_bits_outside_3_to_64_or_not_an_int_raises_naming_bits(bits):
  with pytest.raises(ValueError, match="AccumulatorSpec.bits"):
    AccumulatorSpec(bits=bits)


@pytest.mark.parametrize("tile", [2, 0, -8, True, 8.0, "8"])
def test_accumulator_spec_tile_below_3_or_not_an_int_raises_naming_tile(tile):
  with pytest.raises(ValueError, match="AccumulatorSpec.tile"):
    AccumulatorSpec(bits=16, tile=tile)


def test_accumulator_spec_order_defaults_to_flax_layout_and_rejects_others():
  assert AccumulatorSpec(bits=16).order == "hwc"
  assert AccumulatorSpec(16, 8, "chw").order == "chw"
  with pytest.raises(ValueError, match=r"AccumulatorSpec\.order must be one of \['hwc', 'chw'\]"):
    AccumulatorSpec(bits=16, tile=8, order="hwio")


def test_accumulator_spec_limit_and_tile_size():
  assert AccumulatorSpec(bits=3).limit == 3
  assert AccumulatorSpec(bits=16).limit == 32767
  assert AccumulatorSpec(bits=64).limit == 2**63 - 1
  assert AccumulatorSpec(bits=16).tile_size(100) == 100
  assert AccumulatorSpec(bits=16, tile=32).tile_size(100) == 32
  assert AccumulatorSpec(bits=16, tile=256).tile_size(100) == 256  # one (padded) tile


# --- input range, data-type bound, l1 limit ----------------------------------------------------


def test_input_range_uses_the_full_grid():
  assert input_range(A8) == (0, 255)
  assert input_range(QuantSpec(bits=8)) == (-128, 127)
  assert input_range(QuantSpec(bits=8, narrow=True)) == (-128, 127)  # the worst case
  assert input_range(QuantSpec.for_activations(4)) == (0, 15)


def test_datatype_bound_concrete_values():
  assert datatype_bound(128, QuantSpec.for_activations(4), 4) == 16
  assert datatype_bound(128, QuantSpec(bits=4), 4) == 15  # signed inputs: one bit less
  assert datatype_bound(1, QuantSpec.for_activations(8), 8) == 17
  assert datatype_bound(1, QuantSpec(bits=8), 8) == 16  # -128 * -128 = 2^14 needs 16 bits


def test_datatype_bound_matches_the_float_formula():
  for k, n_bits, m_bits, signed in itertools.product(
    [1, 3, 100, 128, 1000], [2, 8], [3, 8], [0, 1]
  ):
    alpha = np.log2(k) + n_bits + m_bits - 1 - signed
    expected = int(np.ceil(alpha + np.log2(1 + 2.0**-alpha) + 1))
    spec = QuantSpec(bits=n_bits, signed=bool(signed))
    assert datatype_bound(k, spec, m_bits) == expected


@settings(max_examples=60)
@given(
  k=st.integers(1, 300),
  input_spec=_input_specs,
  weight_bits=st.integers(2, 8),
  seed=st.integers(0, 2**16),
)
def test_any_narrow_weights_fit_at_the_datatype_bound(k, input_spec, weight_bits, seed):
  bound = datatype_bound(k, input_spec, weight_bits)
  qmax = 2 ** (weight_bits - 1) - 1
  rows = np.concatenate(
    [
      _random_rows(seed, (6, k), qmax),
      np.full((1, k), qmax),
      np.full((1, k), -qmax),
    ]
  )
  mu, nu = input_range(input_spec)
  p, n = tile_sums(rows, None)
  assert fits(p, n, mu, nu, bound).all()
  assert (worst_partial_sums(rows, mu, nu, None) <= _limit(bound)).all()
  assert (required_bits(p, n, mu, nu) <= bound).all()


@given(k=st.integers(1, 300), input_bits=st.integers(2, 8), weight_bits=st.integers(2, 8))
def test_datatype_bound_is_tight_for_signed_inputs_and_full_range_weights(
  k, input_bits, weight_bits
):
  # x = -2^(N-1) times q = -2^(M-1) on every input reaches 2^alpha exactly.
  spec = QuantSpec(bits=input_bits)
  rows = np.full((1, k), -(2 ** (weight_bits - 1)))
  p, n = tile_sums(rows, None)
  assert required_bits(p, n, *input_range(spec))[0] == datatype_bound(k, spec, weight_bits)


def test_zero_centred_l1_limit_value():
  assert zero_centred_l1_limit(16, A8) == (2**16 - 2) / 255
  assert zero_centred_l1_limit(12, QuantSpec(bits=4)) == (2**12 - 2) / 15


@given(
  bits=st.integers(3, 20), input_spec=_input_specs, k=st.integers(2, 40), seed=st.integers(0, 99)
)
def test_zero_sum_rows_within_the_l1_limit_fit(bits, input_spec, k, seed):
  # A row summing to 0 with l1 norm 2 * half <= Z: half split over the positive entries, half
  # over the negative ones.
  half = int(zero_centred_l1_limit(bits, input_spec)) // 2
  rng = np.random.default_rng(seed)
  a, b = k // 2, k - k // 2
  pos = np.bincount(rng.integers(0, a, size=half), minlength=a)
  neg = -np.bincount(rng.integers(0, b, size=half), minlength=b)
  row = rng.permutation(np.concatenate([pos, neg]))[None]
  assert row.sum() == 0 and np.abs(row).sum() <= zero_centred_l1_limit(bits, input_spec)
  p, n = tile_sums(row, None)
  assert fits(p, n, *input_range(input_spec), bits).all()


# --- tile sums, fits, required bits, simulation ------------------------------------------------


def test_tile_sums_pad_the_last_tile():
  rows = np.array([[1, -2, 3, -4, 5], [0, 0, -1, 0, 7]])
  p, n = tile_sums(rows, 2)
  np.testing.assert_array_equal(p, [[1, 3, 5], [0, 0, 7]])
  np.testing.assert_array_equal(n, [[-2, -4, 0], [0, -1, 0]])
  p, n = tile_sums(rows, None)
  np.testing.assert_array_equal(p, [[9], [7]])
  np.testing.assert_array_equal(n, [[-6], [-1]])
  assert p.dtype == n.dtype == np.int64


def test_a_row_that_fits_tile_by_tile_but_not_as_one_accumulator():
  row = np.full((1, 8), 7)  # unsigned 4-bit inputs: 15 * 56 = 840 in one, 15 * 28 = 420 per tile
  mu, nu = input_range(QuantSpec.for_activations(4))
  p, n = tile_sums(row, None)
  assert required_bits(p, n, mu, nu)[0, 0] == 11 and not fits(p, n, mu, nu, 10).any()
  p, n = tile_sums(row, 4)
  assert p.shape == (1, 2) and fits(p, n, mu, nu, 10).all()
  np.testing.assert_array_equal(worst_partial_sums(row, mu, nu, 4), [[420, 420]])
  np.testing.assert_array_equal(worst_partial_sums(row, mu, nu, None), [[840]])


def test_required_bits_is_exact_at_powers_of_two():
  # worst = 2^j - 1 needs j + 1 bits, worst = 2^j needs j + 2.
  j = np.arange(1, 62, dtype=np.int64)
  worst = np.concatenate([(np.int64(1) << j) - 1, np.int64(1) << j])
  got = required_bits(worst, np.zeros_like(worst), 0, 1)
  np.testing.assert_array_equal(got, np.concatenate([j + 1, j + 2]))
  assert required_bits(np.int64(2**63 - 1), 0, 0, 1) == 64
  assert required_bits(0, 0, -3, 3) == 2


def test_fits_at_64_bits_holds_everything_int64_holds():
  big = np.int64(2**63 - 1)
  assert fits(big, 0, 0, 1, 64) and not fits(big, 0, 0, 1, 63)
  assert fits(0, -big, 0, 1, 64)


def test_an_input_range_without_zero_raises():
  with pytest.raises(ValueError, match="contain 0"):
    fits(1, 0, 1, 3, 8)
  with pytest.raises(ValueError, match="contain 0"):
    worst_partial_sums(np.ones((1, 3)), -5, -1, None)


@given(**_LAYERS)
def test_required_bits_is_the_smallest_width_that_fits(seed, shape, weight_bits, input_spec, tile):
  rows = _random_rows(seed, shape, 2 ** (weight_bits - 1) - 1)
  mu, nu = input_range(input_spec)
  p, n = tile_sums(rows, tile)
  need = required_bits(p, n, mu, nu)
  assert need.dtype == np.int64 and need.shape == p.shape and (need >= 2).all()
  assert fits(p, n, mu, nu, need).all()
  assert not fits(p, n, mu, nu, np.maximum(need - 1, 2))[need > 2].any()


@given(**_LAYERS, bits=st.integers(3, 30))
def test_fits_agrees_with_the_simulation(seed, shape, weight_bits, input_spec, tile, bits):
  rows = _random_rows(seed, shape, 2 ** (weight_bits - 1) - 1)
  mu, nu = input_range(input_spec)
  p, n = tile_sums(rows, tile)
  worst = worst_partial_sums(rows, mu, nu, tile)
  assert worst.shape == p.shape and worst.dtype == np.int64
  np.testing.assert_array_equal(fits(p, n, mu, nu, bits), worst <= _limit(bits))
  np.testing.assert_array_equal(worst, np.maximum(nu * p + mu * n, -(mu * p + nu * n)))


@settings(max_examples=25)
@given(
  seed=st.integers(0, 2**16),
  k=st.integers(1, 5),
  mu=st.integers(-3, 0),
  nu=st.integers(0, 3),
  tile=st.one_of(st.none(), st.integers(1, 3)),
)
def test_simulation_matches_brute_force_over_every_input(seed, k, mu, nu, tile):
  q = _random_rows(seed, (2, k), 7)
  xs = np.array(list(itertools.product(range(mu, nu + 1), repeat=k)), np.int64)  # [inputs, K]
  t = k if tile is None else tile
  expected = []
  for row in q:
    per_tile = []
    for start in range(0, k, t):
      prefix = np.cumsum(xs[:, start : start + t] * row[start : start + t], axis=1)
      per_tile.append(np.abs(prefix).max())
    expected.append(per_tile)
  np.testing.assert_array_equal(worst_partial_sums(q, mu, nu, tile), expected)


# --- check_accumulator on exported layers ------------------------------------------------------


def _params(x, spec):
  lo, hi = ranges.minmax(jnp.asarray(x), spec)
  return ranges.scale_and_zero_point(lo, hi, spec)


def _dense_layer(seed=0, in_f=64, out_f=6, input_spec=A8):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(8, in_f)) + 0.5).astype(np.float32)
  w = rng.normal(size=(in_f, out_f)).astype(np.float32)
  s_w, _ = _params(w, W4)
  s_x, z_x = _params(x, input_spec)
  return export_layer(
    w, s_w, W4, s_x, z_x, input_spec, op="dot_general", dimension_numbers=DENSE_DN
  )


def _grouped_conv_layer(seed=1):
  rng = np.random.default_rng(seed)
  x_shape, k_shape = (1, 6, 6, 8), (3, 3, 4, 6)  # 2 feature groups: K = 4 * 3 * 3 = 36
  x = (rng.normal(size=x_shape) + 0.5).astype(np.float32)
  w = rng.normal(size=k_shape).astype(np.float32)
  s_w, _ = _params(w, W4)
  s_x, z_x = _params(x, A8)
  dn = lax.conv_dimension_numbers(x_shape, k_shape, ("NHWC", "HWIO", "NHWC"))
  settings_ = dict(
    window_strides=(1, 1), padding="SAME", rhs_dilation=(1, 1), feature_group_count=2
  )
  return export_layer(w, s_w, W4, s_x, z_x, A8, op="conv", dimension_numbers=dn, **settings_)


def test_dense_layer_overflows_below_its_needed_bits_and_fits_from_there():
  layer = _dense_layer()
  rows = np.asarray(layer.weight, np.int64).T  # [out, in]
  p, n = np.maximum(rows, 0).sum(1), np.minimum(rows, 0).sum(1)
  worst = 255 * int(np.maximum(p, -n).max())  # unsigned inputs: x = 255 on one sign, 0 elsewhere
  report = check_accumulator(layer, AccumulatorSpec(bits=14))
  assert isinstance(report, OverflowReport)
  assert not report.fits and report.needed_bits > 14
  assert report.needed_bits == worst.bit_length() + 1
  assert report.tile == 64 and report.limit == 2**13 - 1 and report.accumulator_bits == 14
  assert report.datatype_bound == datatype_bound(64, A8, 4) == 19
  assert report.worst_partial_sum == worst
  assert report.worst_partial_sum > report.limit

  at_need = check_accumulator(layer, AccumulatorSpec(bits=report.needed_bits))
  assert at_need.fits and at_need.worst_partial_sum <= at_need.limit
  assert not check_accumulator(layer, AccumulatorSpec(bits=report.needed_bits - 1)).fits
  assert check_accumulator(layer, AccumulatorSpec(bits=report.datatype_bound)).fits


def test_tiles_lower_the_needed_bits_and_the_datatype_bound():
  layer = _dense_layer()
  whole = check_accumulator(layer, AccumulatorSpec(bits=16))
  tiled = check_accumulator(layer, AccumulatorSpec(bits=16, tile=8))
  assert tiled.tile == 8 and tiled.datatype_bound == datatype_bound(8, A8, 4) == 16
  assert tiled.needed_bits < whole.needed_bits and tiled.fits
  rows = np.asarray(layer.weight, np.int64).T.reshape(6, 8, 8)
  p, n = np.maximum(rows, 0).sum(-1), np.minimum(rows, 0).sum(-1)
  assert tiled.worst_partial_sum == 255 * np.maximum(p, -n).max()
  longer = check_accumulator(layer, AccumulatorSpec(bits=16, tile=100))
  assert longer.tile == 100 and longer.datatype_bound == whole.datatype_bound
  assert longer.needed_bits == whole.needed_bits


@pytest.mark.parametrize(
  "order, layout", [("hwc", (3, 0, 1, 2)), ("chw", (3, 2, 0, 1))], ids=["hwc", "chw"]
)
def test_grouped_conv_layer_rows_are_per_output_channel_in_the_accumulation_order(order, layout):
  layer = _grouped_conv_layer()
  w = np.asarray(layer.weight, np.int64)  # HWIO
  rows = w.transpose(layout).reshape(6, 36)
  for tile in (None, 9, 5):
    report = check_accumulator(layer, AccumulatorSpec(bits=12, tile=tile, order=order))
    assert report.order == order
    p, n = tile_sums(rows, tile)
    assert report.needed_bits == required_bits(p, n, 0, 255).max()
    assert report.worst_partial_sum == worst_partial_sums(rows, 0, 255, tile).max()
  report = check_accumulator(layer, AccumulatorSpec(bits=12))
  assert not report.fits and report.needed_bits > 12
  assert report.datatype_bound == datatype_bound(36, A8, 4)
  assert check_accumulator(layer, AccumulatorSpec(bits=report.needed_bits + 1)).fits


@pytest.mark.parametrize("input_spec", [A8, QuantSpec(bits=8)], ids=["unsigned", "signed"])
def test_simulation_matches_the_integer_path_on_adversarial_inputs(input_spec):
  layer = _dense_layer(seed=3, in_f=32, out_f=5, input_spec=input_spec)
  rows = np.asarray(layer.weight, np.int64).T
  mu, nu = input_range(input_spec)
  # For every output channel, the inputs that drive its sum up and down.
  x_int = np.concatenate([np.where(rows > 0, nu, mu), np.where(rows > 0, mu, nu)])
  z = 0 if layer.input_zero_point is None else int(layer.input_zero_point)
  x = jnp.asarray((x_int - z) * np.float32(layer.input_scale), jnp.float32)
  _, acc_max = jax.jit(apply_integer)(layer, x)
  worst = worst_partial_sums(rows, mu, nu, None)
  assert int(acc_max) == worst.max()
  # One output channel alone: its own adversarial inputs reach exactly its worst sum.
  o = int(np.argmin(worst[:, 0]))
  single = dataclasses.replace(
    layer, weight=layer.weight[:, o : o + 1], weight_scale=layer.weight_scale[..., o : o + 1]
  )
  _, acc_o = apply_integer(single, x[jnp.array([o, o + 5])])
  assert int(acc_o) == worst[o, 0]


def test_layers_without_integer_accumulation_are_refused_and_skipped():
  layer = _dense_layer()
  weight_only = dataclasses.replace(layer, input_scale=None, input_zero_point=None, input_spec=None)
  table = jnp.asarray(np.arange(12).reshape(4, 3) % 5 - 2, jnp.int8)
  take = dataclasses.replace(
    layer, weight=table, weight_scale=jnp.ones((3,)), op="take", dimension_numbers=None
  )
  with pytest.raises(ValueError, match="weight-only dot_general"):
    check_accumulator(weight_only, AccumulatorSpec(bits=16))
  with pytest.raises(ValueError, match="embedding lookup"):
    check_accumulator(take, AccumulatorSpec(bits=16))
  spec = AccumulatorSpec(bits=16)
  reports = check_accumulators({"dense": layer, "head": weight_only, "embed": take}, spec)
  assert list(reports) == ["dense"] and reports["dense"] == check_accumulator(layer, spec)


def test_accumulator_module_is_exported():
  assert accumulator.datatype_bound is datatype_bound
