"""The importances EfQAT ranks by: mean |w|, fan-in scaled, BatchNorm-folded, rounding error, PTQ
error against the float model (also stacked)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import IMPORTANCES, select, unit_scores, unit_weights
from efqat_jax.efqat.importance import BATCH_NORM_EPSILON
from efqat_jax.nn.layer_table import params_at
from efqat_jax.pipeline.qat_efqat import PIPELINE_IMPORTANCES
from efqat_jax.quant.fake_quant import fake_quant
from tests.built_model import BuiltModel

RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
X = jnp.ones((2, 6, 6, 1))


class ConvNorm(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x))
    return nn.relu(x), None


class StackedConvNet(nn.Module):
  """A conv + BatchNorm (fan-in 9), three scan-stacked ones (fan-in 72), a Dense without one."""

  @nn.compact
  def __call__(self, x):
    x, _ = ConvNorm()(x, None)
    stack = nn.scan(
      ConvNorm,
      variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True},
      length=3,
    )
    x, _ = stack(name="stack")(x, None)
    return nn.Dense(4)(x.mean(axis=(1, 2)))


MODEL = quantize(StackedConvNet(), RULE)
STACKED = BuiltModel(MODEL, X)


def _with_norm_statistics(variables, seed=1):
  """Random positive gammas and running variances in every BatchNorm."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))

  def randomise(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jax.random.uniform(next(keys), leaf.shape, minval=0.1, maxval=4.0)
    return leaf

  return jax.tree_util.tree_map_with_path(randomise, variables)


def _folded_channel_means(weight, gamma, var):
  """Brute force: fold gamma / sigma into the kernel's output axis, then mean |w| per channel."""
  folded = np.asarray(weight) * np.asarray(gamma) / np.sqrt(np.asarray(var) + BATCH_NORM_EPSILON)
  return np.abs(folded).reshape(-1, folded.shape[-1]).mean(axis=0)


def test_the_three_importances_against_brute_force_on_a_stacked_model():
  variables = _with_norm_statistics(STACKED.variables)
  params, stats = variables["params"], variables["batch_stats"]
  weights = unit_weights(params, STACKED.layers)
  assert set(weights) == {"ConvNorm_0/Conv_0", "Dense_0"} | {f"stack/Conv_0[{i}]" for i in range(3)}
  mean_abs = unit_scores(params, STACKED.layers)
  fan_in = unit_scores(params, STACKED.layers, "fan_in")
  folded = unit_scores(params, STACKED.layers, "bn_folded", stats)
  for unit, w in weights.items():
    w = np.asarray(w)
    plain = np.abs(w).reshape(-1, w.shape[-1]).mean(axis=0)
    np.testing.assert_allclose(mean_abs[unit], plain, rtol=1e-6)
    np.testing.assert_allclose(fan_in[unit], plain * math.sqrt(w.size / w.shape[-1]), rtol=1e-6)
  np.testing.assert_allclose(folded["Dense_0"], mean_abs["Dense_0"])  # no norm follows it
  first = "ConvNorm_0/BatchNorm_0"
  np.testing.assert_allclose(
    folded["ConvNorm_0/Conv_0"],
    _folded_channel_means(
      weights["ConvNorm_0/Conv_0"],
      params_at(params, first)["scale"],
      params_at(stats, first)["var"],
    ),
    rtol=1e-5,
  )
  for i in range(3):  # each stacked layer folds its own slice of the stacked norm
    gamma = params["stack"]["BatchNorm_0"]["scale"][i]
    var = stats["stack"]["BatchNorm_0"]["var"][i]
    np.testing.assert_allclose(
      folded[f"stack/Conv_0[{i}]"],
      _folded_channel_means(weights[f"stack/Conv_0[{i}]"], gamma, var),
      rtol=1e-5,
    )


def test_fan_in_scaling_stops_cwpn_from_taking_only_the_small_fan_in_layer():
  """At init (std ~ 1/sqrt(fan_in)) mean |w| ranks the channels of the fan-in-8 and -9 layers
  above those of the fan-in-72 stack, so cwpn trains none of the stack; fan-in scaling ranks
  them on one scale."""
  params = STACKED.params
  plain = select(params, STACKED.layers, "cwpn", 0.2)
  scaled = select(params, STACKED.layers, "cwpn", 0.2, importance="fan_in")
  stack = [f"stack/Conv_0[{i}]" for i in range(3)]
  assert not any(plain.count(unit) for unit in stack)
  assert sum(bool(scaled.count(unit)) for unit in stack) >= 2
  assert sum(k for _, k in plain.counts) == sum(k for _, k in scaled.counts)


def test_bn_folded_ranks_layers_by_their_norm_gain():
  """A stacked layer whose norm multiplies by 100 is the one lwpn trains under bn_folded, and
  not under mean |w|; its channels with the largest gamma are the ones cwpl picks."""
  variables = jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      leaf.at[1].set(jnp.linspace(50.0, 150.0, leaf.shape[-1]))
      if "stack" in str(path) and path[-1].key == "scale"
      else leaf
    ),
    STACKED.variables,
  )
  params, stats = variables["params"], variables["batch_stats"]
  folded = select(params, STACKED.layers, "lwpn", 0.2, importance="bn_folded", batch_stats=stats)
  plain = select(params, STACKED.layers, "lwpn", 0.2)
  assert {unit for unit, k in folded.counts if k} == {"stack/Conv_0[1]"}
  assert {unit for unit, k in plain.counts if k} != {"stack/Conv_0[1]"}
  cwpl = select(params, STACKED.layers, "cwpl", 0.25, importance="bn_folded", batch_stats=stats)
  assert set(np.asarray(cwpl.channels["stack/Conv_0[1]"]).tolist()) == {6, 7}


def test_importance_errors_name_the_argument():
  with pytest.raises(ValueError, match="importance must be one of"):
    select(STACKED.params, STACKED.layers, "cwpl", 0.1, importance="grad")
  with pytest.raises(ValueError, match="batch_stats"):
    select(STACKED.params, STACKED.layers, "cwpl", 0.1, importance="bn_folded")
  with pytest.raises(ValueError, match="rounding_error.*batch_stats"):
    select(STACKED.params, STACKED.layers, "cwpl", 0.1, importance="rounding_error")
  assert IMPORTANCES == ("mean_abs", "fan_in", "bn_folded", "rounding_error", "ptq_error")
  # A model without BatchNorm: bn_folded is mean |w|.
  no_norm = {"params": STACKED.params}
  a = select(no_norm["params"], STACKED.layers, "cwpn", 0.3, importance="bn_folded", batch_stats={})
  b = select(no_norm["params"], STACKED.layers, "cwpn", 0.3)
  assert a.counts == b.counts


def _rounding_error_norms(weight, scale, spec):
  """Brute force: the layer's own fake quantizer, then the error's norm per output channel."""
  error = np.asarray(weight - fake_quant(weight, scale, spec=spec))
  return np.sqrt(np.square(error).reshape(-1, error.shape[-1]).sum(axis=0))


def test_rounding_error_against_the_layers_quantizer_folded_and_stacked():
  variables = _with_norm_statistics(STACKED.variables)
  params, stats = variables["params"], variables["batch_stats"]
  plain = unit_scores(params, STACKED.layers, "rounding_error", {})
  folded = unit_scores(params, STACKED.layers, "rounding_error", stats)
  for layer in STACKED.layers.values():
    own = params_at(params, layer.path)
    for index in layer.indices():
      unit = layer.unit(index)
      norms = _rounding_error_norms(
        own[layer.weight_name][index], own[layer.scale_name][index], layer.weight_spec
      )
      np.testing.assert_allclose(plain[unit], norms, rtol=1e-5, atol=1e-7)
      gain = folded[unit] / plain[unit]  # the norm's gamma / sigma, where a norm follows
      bn_gain = unit_scores(params, STACKED.layers, "bn_folded", stats)[unit] / np.mean(
        np.abs(np.asarray(own[layer.weight_name][index]).reshape(-1, len(norms))), axis=0
      )
      np.testing.assert_allclose(gain, bn_gain, rtol=1e-4)


def test_rounding_error_ranks_an_on_grid_channel_last_where_mean_abs_ranks_it_first():
  """A Dense channel whose weights lie on its grid loses nothing to rounding: rounding_error
  leaves it frozen, though it has the largest mean |w|, and trains the channel that rounding
  perturbs most."""
  params = STACKED.params
  dense = dict(params["Dense_0"])
  kernel = np.asarray(dense["kernel"]).copy()
  scale = np.abs(np.asarray(dense["kernel_scale"])).reshape(-1)
  kernel[:, 0] = 7 * scale[0]  # on the grid (4-bit weights reach +-7 steps): the largest
  kernel[:, 1] = 0.5 * scale[1] * np.sign(kernel[:, 1] + 1e-9)  # each weight halfway: most error
  dense["kernel"] = jnp.asarray(kernel)
  params = {**params, "Dense_0": dense}
  assert np.argmax(unit_scores(params, STACKED.layers)["Dense_0"]) == 0
  errors = unit_scores(params, STACKED.layers, "rounding_error", {})["Dense_0"]
  assert errors[0] == 0 and np.argmax(errors) == 1
  cwpl = select(params, STACKED.layers, "cwpl", 0.25, importance="rounding_error", batch_stats={})
  assert np.asarray(cwpl.channels["Dense_0"]).tolist() == [1]


def _on_grid(params):
  """``params`` with every quantized weight replaced by its layer's Q(w), as PTQ writes them."""
  on_grid = jax.tree_util.tree_map(lambda leaf: leaf, params)
  for layer in STACKED.layers.values():
    own = params_at(on_grid, layer.path)
    own[layer.weight_name] = jnp.stack(
      [
        fake_quant(own[layer.weight_name][i], own[layer.scale_name][i], spec=layer.weight_spec)
        for i in layer.indices()
      ]
    ).reshape(own[layer.weight_name].shape)
  return on_grid


def test_rounding_error_refuses_weights_that_all_lie_on_their_grid():
  """Every PTQ method, round-to-nearest included, leaves every weight on its grid: with no
  rounding error anywhere, rounding_error refuses to rank (not by channel index, not silently by
  another importance), and the pipeline does not offer it."""
  variables = _with_norm_statistics(STACKED.variables)
  params, stats = variables["params"], variables["batch_stats"]
  on_grid = _on_grid(params)
  with pytest.raises(ValueError, match="rounding_error.*every weight lies on its grid"):
    unit_scores(on_grid, STACKED.layers, "rounding_error", stats)
  with pytest.raises(ValueError, match="every weight lies on its grid"):
    select(on_grid, STACKED.layers, "cwpn", 0.1, importance="rounding_error", batch_stats=stats)
  assert "rounding_error" not in PIPELINE_IMPORTANCES
  assert any(
    np.any(s) for s in unit_scores(params, STACKED.layers, "rounding_error", stats).values()
  )


def test_ptq_error_against_the_float_weights_minus_the_layers_quantizer_folded_and_stacked():
  """ptq_error is || v - Q(w) || per channel, v the float model's weight, Q the layer's own
  quantizer, times gamma / sigma of a following norm; on PTQ's on-grid weights and on a QAT
  model's latent (off-grid) ones alike. On the PTQ model of the float weights themselves it is
  their rounding error."""
  variables = _with_norm_statistics(STACKED.variables)
  floats, stats = variables["params"], variables["batch_stats"]
  ptq = _on_grid(floats)
  latent = jax.tree_util.tree_map(lambda w: w * 1.1, ptq)  # as after some QAT steps: off grid
  rounding = unit_scores(floats, STACKED.layers, "rounding_error", stats)
  np.testing.assert_allclose(
    np.concatenate(list(unit_scores(ptq, STACKED.layers, "ptq_error", stats, floats).values())),
    np.concatenate(list(rounding.values())),
    rtol=1e-5,
    atol=1e-7,
  )
  plain = unit_scores(latent, STACKED.layers, "ptq_error", {}, floats)
  folded = unit_scores(latent, STACKED.layers, "ptq_error", stats, floats)
  bn = unit_scores(latent, STACKED.layers, "bn_folded", stats)
  mean_abs = unit_scores(latent, STACKED.layers)
  for layer in STACKED.layers.values():
    own, reference = params_at(latent, layer.path), params_at(floats, layer.path)
    for index in layer.indices():
      unit, spec = layer.unit(index), layer.weight_spec
      w = own[layer.weight_name][index]
      error = np.asarray(
        reference[layer.weight_name][index] - fake_quant(w, own[layer.scale_name][index], spec=spec)
      )
      norms = np.sqrt(np.square(error).reshape(-1, error.shape[-1]).sum(axis=0))
      np.testing.assert_allclose(plain[unit], norms, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(folded[unit], norms * bn[unit] / mean_abs[unit], rtol=1e-4)


def test_ptq_error_trains_the_channel_ptq_moved_most_and_refuses_without_the_float_model():
  """The Dense channel whose quantized weights PTQ moved furthest from the float ones is the
  one cwpl trains, though mean |w| ranks it last; without the float params, with params of
  another shape, or with the quantized model as its own reference (nothing to rank by), a
  one-line error."""
  floats = STACKED.params
  ptq = _on_grid(floats)
  dense = dict(ptq["Dense_0"])
  kernel = np.asarray(dense["kernel"]).copy()
  kernel[:, 2] = 0.0  # what a method that zeroes a channel leaves: the smallest mean |w|
  dense["kernel"] = jnp.asarray(kernel)
  ptq = {**ptq, "Dense_0": dense}
  assert np.argmin(unit_scores(ptq, STACKED.layers)["Dense_0"]) == 2
  cwpl = select(ptq, STACKED.layers, "cwpl", 0.25, importance="ptq_error", batch_stats={},
                reference=floats)  # fmt: skip
  assert np.asarray(cwpl.channels["Dense_0"]).tolist() == [2]
  with pytest.raises(ValueError, match="ptq_error.*needs the float model's params"):
    select(ptq, STACKED.layers, "cwpn", 0.1, importance="ptq_error", batch_stats={})
  wrong = {**floats, "Dense_0": {**floats["Dense_0"], "kernel": floats["Dense_0"]["kernel"][:3]}}
  with pytest.raises(ValueError, match="reference Dense_0/kernel has shape"):
    unit_scores(ptq, STACKED.layers, "ptq_error", {}, wrong)
  with pytest.raises(ValueError, match="reference has no Dense_0/kernel"):
    unit_scores(ptq, STACKED.layers, "ptq_error", {}, {**floats, "Dense_0": {}})
  with pytest.raises(ValueError, match="ptq_error.*every channel scores 0"):
    unit_scores(ptq, STACKED.layers, "ptq_error", {}, ptq)
  assert "ptq_error" in PIPELINE_IMPORTANCES
