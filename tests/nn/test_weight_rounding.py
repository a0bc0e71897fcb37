"""weight_rounding: how quantized layers round their weights, set from outside the model."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efqat_jax
from efqat_jax.nn import (
  Mode,
  QuantRule,
  RoundingContext,
  current_weight_rounding,
  integer_apply,
  round_to_nearest,
  weight_rounding,
  with_mode,
)
from efqat_jax.ptq import calibrate
from efqat_jax.quant import QuantSpec, fake_quant, lsq_grad_scale

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)
X = jax.random.normal(jax.random.key(1), (5, 6)) + 0.3


class Heads(nn.Module):
  """Two Dense layers on the same input, so each layer's output can be compared on its own."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x), nn.Dense(3)(x)


def _quantized():
  qmodel = efqat_jax.quantize(Heads(), QuantRule(".*", weight=W4, input=A4))
  return qmodel, qmodel.init(jax.random.key(0), X)


def _layer_ref(p, x, rounding=None):
  """One Dense layer by hand: fake-quantized input times the weight rounded by ``rounding``
  (the input's LSQ gradient scale counts one example, as the layers do)."""
  grad_scale = lsq_grad_scale(A4, x.size // x.shape[0])
  xq = fake_quant(x, p["input_scale"], p["input_zero_point"], spec=A4, grad_scale=grad_scale)
  spec = dataclasses.replace(W4, axis=1)
  return xq @ fake_quant(p["kernel"], p["kernel_scale"], spec=spec, rounding=rounding) + p["bias"]


def _attention_round(sigma):
  """Attention Round's variant A: the expected grid level under a Gaussian attention over all
  levels (Diao et al., arXiv 2207.03088), differentiable in the weight."""

  def rounding(u, ctx: RoundingContext):
    levels = jnp.arange(ctx.spec.qmin, ctx.spec.qmax + 1, dtype=u.dtype)
    attention = jax.nn.softmax(-((u[..., None] - levels) ** 2) / (2 * sigma**2), axis=-1)
    return attention @ levels

  return rounding


def _floor(u, ctx):
  return jnp.floor(u)


def test_default_rounding_is_round_to_nearest_and_the_context_restores_it():
  assert current_weight_rounding("Dense_0") is round_to_nearest
  with weight_rounding(_floor, paths={"Dense_0"}):
    assert current_weight_rounding("Dense_0") is _floor
    assert current_weight_rounding("Dense_1") is round_to_nearest
    with weight_rounding(None):  # an inner context replaces the outer one
      assert current_weight_rounding("Dense_0") is round_to_nearest
    assert current_weight_rounding("Dense_0") is _floor
  assert current_weight_rounding("Dense_0") is round_to_nearest


@pytest.mark.parametrize("rounding", [None, round_to_nearest])
def test_default_rounding_leaves_forward_and_grads_bit_identical(rounding):
  qmodel, variables = _quantized()
  loss = lambda v: sum(jnp.sum(y**2) for y in qmodel.apply(v, X))

  def with_context(v):
    with weight_rounding(rounding):
      return jax.value_and_grad(loss)(v)

  chex.assert_trees_all_equal(
    jax.jit(with_context)(variables), jax.jit(jax.value_and_grad(loss))(variables)
  )
  # ... and the layers compute what the quantizer computed before the hook existed (the
  # quantizer's own bit-identity to that is tests/quant/test_fake_quant_rounding.py).
  y0, _ = jax.jit(qmodel.apply)(variables, X)
  np.testing.assert_array_equal(y0, jax.jit(_layer_ref)(variables["params"]["Dense_0"], X))


def test_custom_rounding_changes_exactly_the_layers_it_is_applied_to():
  qmodel, variables = _quantized()
  default = jax.jit(qmodel.apply)(variables, X)

  @jax.jit
  def floored(v):
    with weight_rounding(_floor, paths=["Dense_0"]):
      return qmodel.apply(v, X)

  y0, y1 = floored(variables)
  np.testing.assert_array_equal(y1, default[1])
  assert not np.allclose(y0, default[0], atol=1e-3)
  want = jax.jit(lambda p: _layer_ref(p, X, jnp.floor))(variables["params"]["Dense_0"])
  np.testing.assert_allclose(y0, want, rtol=1e-6, atol=1e-6)


def test_rounding_sees_only_weights_with_their_layer_and_format():
  qmodel, variables = _quantized()
  seen = {}

  def spy(u, ctx):
    seen[ctx.path] = (u.shape, u.dtype, ctx.weight_name, ctx.spec, set(ctx.params))
    return jnp.round(u)

  with weight_rounding(spy):
    jax.jit(qmodel.apply)(variables, X)
  assert seen.keys() == {"Dense_0", "Dense_1"}
  assert seen["Dense_0"] == (
    (6, 4),
    jnp.float32,
    "kernel",
    dataclasses.replace(W4, axis=1),
    {"kernel", "bias", "kernel_scale", "input_scale", "input_zero_point"},
  )


def test_integer_calibrate_and_float_modes_ignore_the_rounding():
  qmodel, variables = _quantized()
  calls = []

  def counting(u, ctx):
    calls.append(ctx.path)
    return jnp.floor(u)

  for mode in (Mode.FLOAT, Mode.INTEGER):
    want = with_mode(qmodel, mode).apply(variables, X)
    with weight_rounding(counting):
      got = with_mode(qmodel, mode).apply(variables, X)
    chex.assert_trees_all_equal(got, want)
  with weight_rounding(counting):
    integer_apply(qmodel, variables, X)
    calibrate(qmodel, variables, [X], num_batches=1)
  assert calls == []


def test_gradient_reaches_a_per_weight_offset_through_a_jitted_apply():
  # AdaRound-style soft rounding, floor(u) + sigmoid(offset), with the offsets of Dense_0 held
  # outside the model (a dict path -> array, closed over); the gradient matches the hand layer.
  qmodel, variables = _quantized()
  p0 = variables["params"]["Dense_0"]
  offsets = {"Dense_0": jax.random.normal(jax.random.key(3), p0["kernel"].shape)}
  cot = jax.random.normal(jax.random.key(4), (5, 4))

  def loss(offsets, v):
    def soft(u, ctx):
      return jnp.floor(u) + jax.nn.sigmoid(offsets[ctx.path])

    with weight_rounding(soft, paths=offsets):
      y0, y1 = qmodel.apply(v, X)
    return jnp.sum(y0 * cot) + jnp.sum(y1)

  def ref_loss(offsets, p):
    soft = lambda u: jnp.floor(u) + jax.nn.sigmoid(offsets["Dense_0"])
    return jnp.sum(_layer_ref(p, X, soft) * cot)

  grads = jax.jit(jax.grad(loss))(offsets, variables)
  want = jax.jit(jax.grad(ref_loss))(offsets, p0)
  # Non-zero exactly where the soft-rounded weight lies inside the grid (the clip stops the rest).
  v = np.floor(p0["kernel"] / p0["kernel_scale"]) + jax.nn.sigmoid(offsets["Dense_0"])
  np.testing.assert_array_equal(grads["Dense_0"] == 0, (v < W4.qmin) | (v > W4.qmax))
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-7)


def test_gradient_flows_to_the_weights_through_a_differentiable_rounding():
  # Attention Round (variant A): no straight-through estimator; d w_hat / d w is the derivative
  # of the soft rounding, so the kernel gradient differs from the STE's and matches the hand layer.
  qmodel, variables = _quantized()
  cot = jax.random.normal(jax.random.key(5), (5, 4))

  def loss(params, rounding):
    with weight_rounding(rounding, paths=["Dense_0"]):
      return jnp.sum(qmodel.apply({"params": params}, X)[0] * cot)

  soft = _attention_round(0.4)
  grads = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], soft)["Dense_0"]
  ste = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], None)["Dense_0"]
  ctx = RoundingContext("Dense_0", "kernel", W4, {})
  ref = lambda p: jnp.sum(_layer_ref(p, X, lambda u: soft(u, ctx)) * cot)
  want = jax.jit(jax.grad(ref))(variables["params"]["Dense_0"])
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(grads["kernel"], ste["kernel"], rtol=1e-2)


class ScannedBlocks(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.Dense(6)(h), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="blocks")(x, None)[0]


def test_per_unit_variables_of_a_scanned_stack_ride_in_the_params():
  # Inside nn.scan the layers of a stack share one path; a variable stored next to the weight
  # (stacked like it) reaches the rounding as one unit's slice. round(u) + offset with a zero
  # offset: the forward is RTN and d/d offset = scale * d/d w_hat = that unit's scale * dw.
  qmodel = efqat_jax.quantize(ScannedBlocks(), QuantRule(".*", weight=W4, input=None))
  params = qmodel.init(jax.random.key(0), X)["params"]
  layer = params["blocks"]["Dense_0"]
  params = {"blocks": {"Dense_0": {**layer, "offset": jnp.zeros_like(layer["kernel"])}}}
  seen = []

  def offset_rounding(u, ctx):
    seen.append(ctx.params["offset"].shape)
    return round_to_nearest(u) + ctx.params["offset"]

  def loss(params, rounding):
    with weight_rounding(rounding):
      return jnp.sum(jnp.sin(qmodel.apply({"params": params}, X)))

  grads = jax.jit(jax.grad(loss), static_argnums=1)(params, offset_rounding)["blocks"]["Dense_0"]
  ste = jax.jit(jax.grad(loss), static_argnums=1)(params, None)["blocks"]["Dense_0"]
  assert set(seen) == {(6, 6)}  # one unit's slice of the (3, 6, 6) stack
  scale = layer["kernel_scale"][:, None, :]  # (3, 6): one scale per unit and output channel
  chex.assert_trees_all_close(grads["offset"], ste["kernel"] * scale, rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(grads["offset"]).sum(axis=(1, 2)) > 0)
  np.testing.assert_allclose(
    jax.jit(loss, static_argnums=1)(params, offset_rounding),
    jax.jit(loss, static_argnums=1)(params, None),
    rtol=1e-6,
  )
