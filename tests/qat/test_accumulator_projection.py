"""The accumulator projection: after it, every output channel and tile fits its P-bit
accumulator in the integers the export produces; what already fits is left bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax.nn import QuantRule, export_integer, quantize, quantized_layers
from efqat_jax.qat import project_params
from efqat_jax.quant import AccumulatorSpec, QuantSpec, check_accumulators
from efqat_jax.train import create_train_state, make_mesh, make_train_step

W4, A8 = QuantSpec.for_weights(4), QuantSpec.for_activations(8)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(32)(x)), None


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(32)(x))
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(10)(x)


def model_and_variables():
  x = jax.random.normal(jax.random.key(0), (16, 48))
  qmodel = quantize(Net(), QuantRule(".*", weight=W4, input=A8))
  variables = jax.jit(qmodel.init)(jax.random.key(1), x)
  return qmodel, variables, x


def reports(qmodel, variables, x, accumulator):
  return check_accumulators(export_integer(qmodel, variables, x), accumulator)


@pytest.mark.parametrize("tile, bits", [(None, 15), (16, 13)])
def test_projected_weights_fit_and_fitting_ones_are_untouched(tile, bits):
  qmodel, variables, x = model_and_variables()
  accumulator = AccumulatorSpec(bits=bits, tile=tile)
  layers = quantized_layers(qmodel, variables, x)
  before = reports(qmodel, variables, x, accumulator)
  assert not all(r.fits for r in before.values())
  specs = {path: accumulator for path in layers}
  params = jax.jit(lambda p: project_params(p, layers, specs))(variables["params"])
  after = reports(qmodel, {**variables, "params": params}, x, accumulator)
  assert all(r.fits for r in after.values()), after
  assert set(after) == {"Dense_0", "Dense_1", "blocks/Dense_0[0]", "blocks/Dense_0[1]"}
  again = jax.jit(lambda p: project_params(p, layers, specs))(params)
  jax.tree.map(np.testing.assert_array_equal, again, params)  # idempotent, bit for bit
  wide = {path: AccumulatorSpec(bits=32, tile=tile) for path in layers}
  untouched = jax.jit(lambda p: project_params(p, layers, wide))(variables["params"])
  jax.tree.map(np.testing.assert_array_equal, untouched, variables["params"])


def test_training_with_the_projection_keeps_the_guarantee_and_without_it_loses_it():
  qmodel, variables, x = model_and_variables()
  accumulator = AccumulatorSpec(bits=16)
  layers = quantized_layers(qmodel, variables, x)
  specs = {path: accumulator for path in layers}
  params = project_params(variables["params"], layers, specs)
  labels = jnp.arange(16) % 10
  batch = {"inputs": x, "labels": labels}
  tx = optax.adam(0.05)
  results = {}
  for constrained in (True, False):
    constrain = (lambda p: project_params(p, layers, specs)) if constrained else None
    step = make_train_step(qmodel, tx, make_mesh(), constrain=constrain)
    state = create_train_state({**variables, "params": params}, tx)
    for i in range(8):
      state, _ = step(state, batch, jax.random.key(i))
    results[constrained] = reports(qmodel, state.variables, x, accumulator)
  assert all(r.fits for r in results[True].values())
  assert not all(r.fits for r in results[False].values())
