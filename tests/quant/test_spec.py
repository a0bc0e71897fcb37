"""QuantSpec: validation, integer grid bounds and the weight/activation presets."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efqat_jax.quant import QuantSpec

# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 17, 0, -8, 32, 4.0, 8.5, True, False, "8", None])
def test_bits_outside_2_to_16_or_not_an_int_raises_naming_bits(bits):
  with pytest.raises(ValueError, match="bits"):
    QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 8, 15, 16])
def test_bits_inside_2_to_16_is_accepted(bits):
  assert QuantSpec(bits=bits).bits == bits


@pytest.mark.parametrize("granularity", ["row", "Tensor", "channels", "", None])
def test_unknown_granularity_raises_naming_granularity(granularity):
  with pytest.raises(ValueError, match="granularity"):
    QuantSpec(granularity=granularity)


def test_narrow_with_unsigned_raises_naming_narrow():
  with pytest.raises(ValueError, match="narrow"):
    QuantSpec(signed=False, narrow=True)


@pytest.mark.parametrize("group_size", [None, 0, -4, 2.0, "4"])
def test_group_without_a_positive_int_group_size_raises_naming_group_size(group_size):
  with pytest.raises(ValueError, match="group_size"):
    QuantSpec(granularity="group", axis=0, group_size=group_size)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_group_size_without_group_granularity_raises_naming_group_size(granularity):
  with pytest.raises(ValueError, match="group_size"):
    QuantSpec(granularity=granularity, group_size=4)


def test_group_with_a_tuple_axis_raises_naming_axis():
  with pytest.raises(ValueError, match="axis"):
    QuantSpec(granularity="group", axis=(0, 1), group_size=2)


@pytest.mark.parametrize("axis", [(), 1.0, True, (0, True), (0, 1.0), "0", None])
def test_axis_that_is_not_an_int_or_non_empty_int_tuple_raises_naming_axis(axis):
  with pytest.raises(ValueError, match="axis"):
    QuantSpec(granularity="channel", axis=axis)


def test_valid_group_spec_keeps_its_fields():
  spec = QuantSpec(granularity="group", axis=0, group_size=32)
  assert (spec.granularity, spec.axis, spec.group_size) == ("group", 0, 32)


def test_channel_spec_accepts_a_tuple_of_axes():
  assert QuantSpec(granularity="channel", axis=(0, -1)).axis == (0, -1)


def test_fields_are_keyword_only():
  with pytest.raises(TypeError):
    QuantSpec(8)  # type: ignore[misc]


def test_spec_is_frozen_hashable_and_compared_by_value():
  # fake_quant passes the spec as a static (nondiff) argument, so it must hash by value.
  a, b = QuantSpec(bits=4, narrow=True), QuantSpec(bits=4, narrow=True)
  assert a == b and hash(a) == hash(b)
  assert a != QuantSpec(bits=4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.bits = 8  # type: ignore[misc]


# --- grid bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("bits", "signed", "narrow", "qmin", "qmax"),
  [
    (2, True, False, -2, 1),
    (2, True, True, -1, 1),
    (2, False, False, 0, 3),
    (3, True, False, -4, 3),
    (4, True, False, -8, 7),
    (4, True, True, -7, 7),
    (4, False, False, 0, 15),
    (8, True, False, -128, 127),
    (8, True, True, -127, 127),
    (8, False, False, 0, 255),
    (16, True, False, -32768, 32767),
    (16, True, True, -32767, 32767),
    (16, False, False, 0, 65535),
  ],
)
def test_qmin_qmax(bits, signed, narrow, qmin, qmax):
  spec = QuantSpec(bits=bits, signed=signed, narrow=narrow)
  assert (spec.qmin, spec.qmax) == (qmin, qmax)
  assert isinstance(spec.qmin, int) and isinstance(spec.qmax, int)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 16), kind=st.sampled_from(["signed", "narrow", "unsigned"]))
def test_number_of_levels_is_2_to_the_bits_minus_one_if_narrow(bits, kind):
  spec = QuantSpec(bits=bits, signed=kind != "unsigned", narrow=kind == "narrow")
  levels = spec.qmax - spec.qmin + 1
  assert levels == 2**bits - (kind == "narrow")
  if kind == "unsigned":
    assert spec.qmin == 0
  else:
    # Signed grids are centred: qmax == 2^(b-1) - 1, and narrow ones are symmetric.
    assert spec.qmax == 2 ** (bits - 1) - 1
    assert (spec.qmin == -spec.qmax) == (kind == "narrow")


def test_symmetric_and_learnable_do_not_change_the_grid():
  base = QuantSpec(bits=5)
  for other in (QuantSpec(bits=5, symmetric=False), QuantSpec(bits=5, learnable=False)):
    assert (other.qmin, other.qmax) == (base.qmin, base.qmax)


# --- presets ----------------------------------------------------------------------------------


def test_defaults():
  spec = QuantSpec()
  assert spec == QuantSpec(
    bits=8,
    signed=True,
    narrow=False,
    symmetric=True,
    granularity="tensor",
    axis=-1,
    group_size=None,
    learnable=True,
  )


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_for_weights_is_signed_narrow_symmetric_per_output_channel(bits):
  spec = QuantSpec.for_weights(bits)
  assert spec == QuantSpec(
    bits=bits, signed=True, narrow=True, symmetric=True, granularity="channel", axis=-1
  )
  assert spec.qmin == -spec.qmax == -(2 ** (bits - 1) - 1)
  assert spec.learnable


def test_for_weights_docstring_example():
  assert (QuantSpec.for_weights(4).qmin, QuantSpec.for_weights(4).qmax) == (-7, 7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_for_activations_is_unsigned_asymmetric_per_tensor(bits):
  spec = QuantSpec.for_activations(bits)
  assert spec == QuantSpec(bits=bits, signed=False, symmetric=False, granularity="tensor")
  assert (spec.qmin, spec.qmax) == (0, 2**bits - 1)
  assert not spec.narrow and spec.learnable and spec.group_size is None


def test_preset_overrides_replace_defaults():
  spec = QuantSpec.for_weights(4, granularity="group", axis=0, group_size=8, learnable=False)
  assert (spec.granularity, spec.axis, spec.group_size, spec.learnable) == ("group", 0, 8, False)
  assert spec.narrow and spec.signed
  act = QuantSpec.for_activations(8, signed=True, symmetric=True)
  assert (act.qmin, act.qmax, act.symmetric) == (-128, 127, True)


def test_preset_overrides_are_validated():
  with pytest.raises(ValueError, match="narrow"):
    QuantSpec.for_activations(8, narrow=True)
  with pytest.raises(ValueError, match="bits"):
    QuantSpec.for_weights(1)
  with pytest.raises(ValueError, match="group_size"):
    QuantSpec.for_weights(4, group_size=8)


def test_numpy_integer_bits_are_accepted_and_stored_as_int():
  spec = QuantSpec(bits=np.int64(8))
  assert spec.bits == 8 and type(spec.bits) is int
