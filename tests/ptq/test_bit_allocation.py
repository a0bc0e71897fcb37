"""Bit allocation: within the budget, on the candidates, greedy to the end, more bits where the
importance is larger, and clear errors."""

import itertools
import math
from fractions import Fraction

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from efqat_jax.ptq.bit_allocation import allocate_bits, average_bits, memory_bits

CANDIDATES = st.lists(st.integers(2, 16), min_size=1, max_size=5)


@st.composite
def problems(draw):
  n = draw(st.integers(1, 6))
  names = [f"l{i}" for i in range(n)]
  importance = {k: draw(st.floats(0.0, 1e6)) for k in names}
  sizes = {k: draw(st.integers(1, 5000)) for k in names}
  candidates = draw(CANDIDATES)
  fixed = {k: draw(st.integers(2, 16)) for k in names if draw(st.booleans())}
  budget = draw(st.floats(min(candidates), max(candidates) + 1.0))
  return importance, sizes, candidates, budget, fixed


def next_width(candidates, b):
  return min((c for c in candidates if c > b), default=None)


@settings(deadline=None, max_examples=200)
@given(problems())
def test_within_budget_on_candidates_fixed_kept_and_greedy_to_the_end(problem):
  importance, sizes, candidates, budget, fixed = problem
  bits = allocate_bits(importance, sizes, candidates, budget, fixed)
  assert list(bits) == list(importance)
  free = {k: b for k, b in bits.items() if k not in fixed}
  assert all(bits[k] == b for k, b in fixed.items())
  assert all(b in candidates for b in free.values())
  used = memory_bits(free, sizes)
  limit = math.floor(Fraction(repr(budget)) * sum(sizes[k] for k in free))
  assert used <= limit
  for k, b in free.items():  # no single raise still fits: the greedy did not stop early
    nb = next_width(candidates, b)
    if nb is not None:
      assert used + sizes[k] * (nb - b) > limit


def test_more_important_layer_of_equal_size_gets_more_bits():
  for big, small in itertools.permutations(["a", "b"]):
    bits = allocate_bits({big: 100.0, small: 1.0}, {"a": 64, "b": 64}, range(2, 9), 4)
    assert bits == {big: 6, small: 2}  # 100 * 4^-5 > 4^-2: raising 5 -> 6 beats 2 -> 3
    assert memory_bits(bits, {"a": 64, "b": 64}) == 4 * 128


def test_importance_order_is_monotone_at_equal_sizes():
  importance = {f"l{i}": v for i, v in enumerate([5.0, 0.1, 80.0, 3.0, 3.0, 0.0, 1e4])}
  sizes = dict.fromkeys(importance, 100)
  bits = allocate_bits(importance, sizes, [2, 3, 4, 5, 6, 8], 4)
  for a, b in itertools.permutations(importance, 2):
    if importance[a] > importance[b]:
      assert bits[a] >= bits[b]
  assert average_bits(bits, sizes) == 4


def test_ties_go_to_the_layer_listed_first():
  for order in itertools.permutations("abc"):
    importance = dict.fromkeys(order, 1.0)
    bits = allocate_bits(importance, dict.fromkeys(order, 10), [2, 3], 2.4)  # room for 1 raise
    assert bits == {k: 3 if k == order[0] else 2 for k in order}


@pytest.mark.parametrize("budget", [2, 3, 4, 8])
def test_a_single_layer_gets_exactly_a_candidate_budget(budget):
  assert allocate_bits({"w": 1.0}, {"w": 999}, [8, 2, 4, 3, 3], budget) == {"w": budget}


def test_fixed_layers_are_outside_the_budget():
  importance = {"first": 1.0, "mid": 1.0, "last": 1.0}
  sizes = {"first": 10, "mid": 1000, "last": 10}
  bits = allocate_bits(importance, sizes, [2, 4], 2, fixed={"first": 8, "last": 8})
  assert bits == {"first": 8, "mid": 2, "last": 8}


def test_a_float_budget_is_the_decimal_it_prints_as():
  # 4.1 * 10 weights is 41 bits exactly (the float 4.1 is a little below 41/10)
  assert allocate_bits({"w": 1.0}, {"w": 10}, [4, 5], 4.1) == {"w": 4}
  bits = allocate_bits({"a": 1.0, "b": 1.0}, {"a": 1, "b": 9}, [4, 5], 4.1)
  assert bits == {"a": 5, "b": 4}  # 5 + 36 = 41 bits


def test_a_budget_below_the_smallest_candidate_names_budget_bits():
  with pytest.raises(ValueError, match=r"^budget_bits = 1\.5 is below the smallest candidate 2"):
    allocate_bits({"a": 1.0}, {"a": 10}, [2, 4], 1.5)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(candidates=[]), r"^candidates = \[\]"),
    (dict(candidates=[1, 4]), r"^candidate = 1: .* in 2\.\.16"),
    (dict(candidates=[4, 32]), r"^candidate = 32"),
    (dict(candidates=[4.0]), r"^candidate = 4\.0: bit widths must be integers"),
    (dict(importance={"a": -1.0}), r"^importance\['a'\] = -1\.0"),
    (dict(importance={"a": float("nan")}), r"^importance\['a'\] = nan"),
    (dict(importance={"a": 1.0, "z": 1.0}), r"^layer 'z' has an importance but no size"),
    (dict(sizes={"a": 0}), r"^sizes\['a'\] = 0"),
    (dict(fixed={"z": 8}), r"^fixed layer 'z' is not among"),
    (dict(fixed={"a": 17}), r"^fixed\['a'\] = 17"),
    (dict(budget_bits=float("inf")), r"^budget_bits = inf"),
  ],
)
def test_invalid_inputs_raise_a_one_line_value_error(kwargs, message):
  args = dict(importance={"a": 1.0}, sizes={"a": 10}, candidates=[2, 4], budget_bits=4)
  with pytest.raises(ValueError, match=message) as info:
    allocate_bits(**{**args, **kwargs})
  assert "\n" not in str(info.value)
