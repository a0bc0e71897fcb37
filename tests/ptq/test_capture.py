"""Capture of H = X~^T X~ and G = X~^T X, layer by layer, through Flax models written the way
other codebases write them (grouped convolutions, Einsum projections, nn.scan stacks)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.fields import to_config
from efqat_jax.nn import QuantRule, quantize, quantized_layers
from efqat_jax.ptq import PTQ_METHODS, calibrate, quantize_weights, statistics_capture
from efqat_jax.ptq import capture as capture_module
from efqat_jax.quant import QuantSpec, fake_quant
from efqat_jax.quant.rows import kernel_axes, to_rows

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)


class ConvEinsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x)
    x = nn.relu(x).reshape(x.shape[0], -1, 8).mean(axis=1)
    y = nn.Einsum((8, 2, 4), "bd,dhk->bhk", name="proj")(x)
    return y.reshape(y.shape[0], -1)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(8)(x)) + x, None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="stem")(x)
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = stack(name="blocks")(x, None)
    return x


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="stem")(x)
    for i in range(3):
      x, _ = Block(name=f"block{i}")(x, None)
    return x


def calibrated(model, rules, x):
  qmodel = quantize(model, rules)
  variables = calibrate(qmodel, jax.jit(qmodel.init)(jax.random.key(0), x), [x], 1)
  return qmodel, {k: v for k, v in variables.items() if k != "quant_stats"}


def test_h_reproduces_each_layers_output_energy_for_grouped_conv_and_einsum():
  """For outputs Y = X W^T of any layer, Y^T Y / rows = W H W^T (per conv group): an identity
  that needs neither patches nor reshapes of our own to check."""
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 4))
  qmodel, variables = calibrated(ConvEinsum(), QuantRule(".*", weight=W4, input=None), x)
  layers = quantized_layers(qmodel, variables, x)
  capture = statistics_capture(qmodel, variables, [x], ("h", "g"))
  stats = capture(variables["params"], layers["grouped"])
  assert stats["h"].shape == (2, 18, 18)  # 2 groups of 2 input channels x 3 x 3
  np.testing.assert_allclose(stats["g"], stats["h"], rtol=1e-5, atol=1e-6)  # first layer: X~ = X
  kernel = variables["params"]["grouped"]["kernel"]
  out_axes, in_axes = kernel_axes(
    *[dict(layers["grouped"].op)[k] for k in ("op", "dimension_numbers")], 4
  )
  rows = to_rows(kernel, out_axes, in_axes).reshape(2, 4, 18)
  y = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
  ).reshape(-1, 2, 4)
  energy = jnp.einsum("rgo,rgp->gop", y, y) / y.shape[0]
  np.testing.assert_allclose(
    jnp.einsum("gok,gkl,gpl->gop", rows, stats["h"], rows), energy, rtol=1e-4, atol=1e-5
  )
  # The Einsum projection "bd,dhk->bhk": K = d = 8, the quantized model's input to it.
  proj = capture(variables["params"], layers["proj"])
  assert proj["h"].shape == (1, 8, 8)
  quantized = jax.lax.stop_gradient(qmodel.apply(variables, x))  # the layer's output, rows b
  kernel = variables["params"]["proj"]["kernel"].reshape(8, 8)
  scale = variables["params"]["proj"]["kernel_scale"].reshape(8)
  w = fake_quant(kernel, scale, spec=QuantSpec.for_weights(4, axis=1))
  np.testing.assert_allclose(
    w.T @ proj["h"][0] @ w, quantized.T @ quantized / x.shape[0], rtol=1e-4, atol=1e-5
  )


def test_quantized_inputs_enter_h_and_float_inputs_enter_g():
  x = 2.0 * jax.random.normal(jax.random.key(2), (32, 6))
  qmodel, variables = calibrated(nn.Dense(5), QuantRule(".*", weight=W4, input=A4), x)
  layer = quantized_layers(qmodel, variables, x)[""]
  stats = statistics_capture(qmodel, variables, [x, x + 1], ("h", "g"))(variables["params"], layer)
  p = variables["params"]
  xq = [fake_quant(b, p["input_scale"], p["input_zero_point"], spec=A4) for b in (x, x + 1)]
  h = sum(q.T @ q for q in xq) / 64
  g = sum(q.T @ b for q, b in zip(xq, (x, x + 1), strict=True)) / 64
  np.testing.assert_allclose(stats["h"][0], h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["g"][0], g, rtol=1e-5, atol=1e-5)
  assert not np.allclose(stats["g"], stats["h"], atol=1e-3)


def test_a_scan_stack_is_captured_per_layer_like_the_same_layers_unrolled():
  x = jax.random.normal(jax.random.key(3), (16, 5))
  rules = QuantRule(".*", weight=W4, input=A4)
  scanned, variables = calibrated(Scanned(), rules, x)
  unrolled = quantize(Unrolled(), rules)
  params = {"stem": variables["params"]["stem"]}
  for i in range(3):
    params[f"block{i}"] = jax.tree.map(lambda a, i=i: a[i], variables["params"]["blocks"])
  layers_s = quantized_layers(scanned, variables, x)
  layers_u = quantized_layers(unrolled, {"params": params}, x)
  stacked = statistics_capture(scanned, variables, [x], ("h", "g"))(
    variables["params"], layers_s["blocks/Dense_0"]
  )
  assert stacked["h"].shape == (3, 1, 8, 8)
  capture_u = statistics_capture(unrolled, {"params": params}, [x], ("h", "g"))
  for i in range(3):
    one = capture_u(params, layers_u[f"block{i}/Dense_0"])
    for name in ("h", "g"):
      np.testing.assert_allclose(stacked[name][i], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["optq", "gpfq"])
def test_each_layer_is_captured_with_the_layers_before_it_already_quantized(method):
  x = jax.random.normal(jax.random.key(4), (16, 5))
  qmodel, variables = calibrated(Scanned(), QuantRule(".*", weight=W4, input=A4), x)
  layers = quantized_layers(qmodel, variables, x)
  inner = statistics_capture(qmodel, variables, [x], PTQ_METHODS.get(method).statistics)
  seen = {}

  def capture(params, layer):
    seen[layer.path] = jax.tree.map(np.asarray, params)
    return inner(params, layer)

  m = PTQ_METHODS.get(method)
  params = quantize_weights(m, variables["params"], layers, to_config(m.fields), capture)
  stem = np.asarray(params["stem"]["kernel"])
  assert not np.allclose(stem, variables["params"]["stem"]["kernel"])
  np.testing.assert_array_equal(seen["blocks/Dense_0"]["stem"]["kernel"], stem)
  np.testing.assert_array_equal(
    seen["stem"]["stem"]["kernel"], np.asarray(variables["params"]["stem"]["kernel"])
  )


def test_repeated_layers_compile_one_program_each_and_still_get_their_own_weights(monkeypatch):
  """The three identical blocks share one traced program for the capture's sums and one for the
  method (the stem has its own); each block still gets the weights of its own statistics."""
  x = jax.random.normal(jax.random.key(5), (16, 5))
  qmodel, variables = calibrated(Unrolled(), QuantRule(".*", weight=W4, input=A4), x)
  layers = quantized_layers(qmodel, variables, x)
  optq = PTQ_METHODS.get("optq")
  traced = {"method": [], "grams": []}

  def counting_method(weight, scale, layer, stats, settings):
    traced["method"].append(layer.path)
    return optq.quantize_weight(weight, scale, layer, stats, settings)

  grams = capture_module.grams

  def counting_grams(quantized, float_, layer):
    traced["grams"].append(layer.path)
    return grams(quantized, float_, layer)

  monkeypatch.setattr(capture_module, "grams", counting_grams)
  method = dataclasses.replace(optq, quantize_weight=counting_method)
  settings = to_config(optq.fields)
  capture = statistics_capture(qmodel, variables, [x], optq.statistics)
  seen = {}

  def recording_capture(params, layer):
    seen[layer.path] = stats = capture(params, layer)
    return stats

  params = quantize_weights(method, variables["params"], layers, settings, recording_capture)
  assert traced == {"method": ["stem", "block0/Dense_0"], "grams": ["stem", "block0/Dense_0"]}
  for i in range(3):  # each block's weights: its own float weights under its own statistics
    path = f"block{i}/Dense_0"
    node = variables["params"][f"block{i}"]["Dense_0"]
    layer = layers[path]
    expected = optq.quantize_weight(
      node["kernel"], node["kernel_scale"], layer, seen[path], settings
    )
    np.testing.assert_array_equal(params[f"block{i}"]["Dense_0"]["kernel"], expected)
  blocks = [np.asarray(params[f"block{i}"]["Dense_0"]["kernel"]) for i in range(3)]
  assert not np.array_equal(blocks[0], blocks[1]) and not np.array_equal(blocks[1], blocks[2])


def test_a_statistics_method_without_capture_is_an_error():
  x = jnp.ones((2, 3))
  qmodel, variables = calibrated(nn.Dense(2), QuantRule(".*", weight=W4, input=A4), x)
  with pytest.raises(ValueError, match="needs statistics"):
    quantize_weights(
      PTQ_METHODS.get("optq"), variables["params"], quantized_layers(qmodel, variables, x)
    )
