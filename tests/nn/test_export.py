"""Integer export and the integer reference path against the fake-quantized model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.models import SmallCNN, Transformer
from efqat_jax.nn import (
  Mode,
  QuantConv,
  QuantRule,
  export_integer,
  integer_apply,
  quantize,
  with_mode,
)
from efqat_jax.nn.rewrite import is_quantized
from efqat_jax.quant import QuantSpec, apply_integer, fake_quant, integer_layer_arrays

KEY = jax.random.key(0)
IMAGES = jax.random.uniform(jax.random.key(1), (4, 12, 12, 1))
TOKENS = jax.random.randint(jax.random.key(2), (2, 10), 0, 32)


def _rules(bits):
  return [
    QuantRule(".*", weight=QuantSpec.for_weights(bits), input=QuantSpec.for_activations(bits))
  ]


def _close_to_float_rounding(a, b):
  scale = float(jnp.max(jnp.abs(b))) + 1e-6
  np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5)


MODELS = [
  (SmallCNN(num_classes=10, features=(8, 16, 16)), IMAGES),
  (Transformer(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, max_len=16), TOKENS),
]


def _layer_inputs_and_outputs(model, variables, x):
  """Input and output of every quantized layer in a fake-quantized forward pass, by path."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    quantized = is_quantized(context.module) or isinstance(context.module, nn.Embed)
    if context.method_name == "__call__" and quantized:
      seen["/".join(context.module.scope.path)] = (args[0], out)
    return out

  with nn.intercept_methods(record):
    model.apply(variables, x)
  return seen


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("model, x", MODELS, ids=["cnn", "transformer"])
def test_every_exported_layer_reproduces_its_fake_quantized_layer(model, x, bits):
  qmodel = quantize(model, _rules(bits))
  variables = qmodel.init(KEY, x)
  exported = export_integer(qmodel, variables, x)
  seen = _layer_inputs_and_outputs(qmodel, variables, x)
  assert set(exported) == set(seen)
  for path, layer in exported.items():
    layer_in, layer_out = seen[path]
    y, acc_max = apply_integer(layer, layer_in)
    _close_to_float_rounding(y, layer_out)
    if layer.op != "take":  # an embedding lookup accumulates nothing
      assert 0 < int(acc_max) < 2**31 - 1, path


@pytest.mark.parametrize("model, x", MODELS, ids=["cnn", "transformer"])
def test_integer_model_reproduces_fake_quantized_model_at_8_bits(model, x):
  # At 2-4 bits an intermediate value can sit on a rounding tie of the next quantizer, and the
  # two paths (equal up to float rounding) may then round it differently; the per-layer test
  # above covers those widths.
  qmodel = quantize(model, _rules(8))
  variables = qmodel.init(KEY, x)
  out_int, accumulators = integer_apply(qmodel, variables, x)
  _close_to_float_rounding(out_int, qmodel.apply(variables, x))
  maxima = [int(a) for a in jax.tree.leaves(accumulators)]
  assert maxima and all(m > 0 for m in maxima)


def test_exported_layer_reproduces_quantized_conv_with_bias_and_reports_accumulator():
  spec_w, spec_a = QuantSpec.for_weights(4), QuantSpec.for_activations(4)
  layer = QuantConv(6, (3, 3), strides=2, weight_spec=spec_w, input_spec=spec_a)
  x = jax.random.normal(jax.random.key(3), (2, 9, 9, 3))
  variables = layer.init(KEY, x)
  variables["params"]["bias"] = jnp.linspace(-1, 1, 6)
  exported = export_integer(layer, variables, x)
  (only,) = exported.values()
  assert only.weight.dtype == np.int8 and only.weight.shape == (3, 3, 3, 6)
  assert np.all(np.abs(only.weight) <= spec_w.qmax)
  y, acc_max = apply_integer(only, x)
  _close_to_float_rounding(y, layer.apply(variables, x))
  p = variables["params"]
  w_int = np.round(np.asarray(p["kernel"]) / np.asarray(p["kernel_scale"])).astype(np.int64)
  np.testing.assert_array_equal(only.weight, np.clip(w_int, spec_w.qmin, spec_w.qmax))
  zero_point = float(jnp.round(p["input_zero_point"]))
  x_int = np.clip(np.round(np.asarray(x) / p["input_scale"]) + zero_point, 0, 15)
  x_padded = np.pad(x_int, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=zero_point)
  acc = jax.lax.conv_general_dilated(
    jnp.asarray(x_padded),
    jnp.asarray(only.weight, jnp.float32),
    (2, 2),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision="highest",
  )
  assert int(acc_max) == int(np.max(np.abs(np.asarray(acc))))


def test_export_keys_are_module_paths_and_biases_are_attached():
  qmodel = quantize(SmallCNN(num_classes=10, features=(8, 16)), _rules(8))
  variables = qmodel.init(KEY, IMAGES)
  exported = export_integer(qmodel, variables, IMAGES)
  assert set(exported) == {"Conv_0", "Conv_1", "Dense_0"}
  np.testing.assert_array_equal(exported["Dense_0"].bias, variables["params"]["Dense_0"]["bias"])
  assert exported["Conv_1"].window_strides == (2, 2)


def test_weight_only_layer_exports_and_runs_on_float_inputs():
  qmodel = quantize(
    SmallCNN(num_classes=10, features=(8,)),
    QuantRule(".*", weight=QuantSpec.for_weights(4), input=None),
  )
  variables = qmodel.init(KEY, IMAGES)
  out_int, _ = integer_apply(qmodel, variables, IMAGES)
  _close_to_float_rounding(out_int, qmodel.apply(variables, IMAGES))


def test_integer_mode_matches_manual_fake_quant_for_depthwise_conv():
  layer = QuantConv(
    4,
    (3, 3),
    feature_group_count=4,
    weight_spec=QuantSpec.for_weights(4),
    input_spec=QuantSpec.for_activations(8),
  )
  x = jax.random.normal(jax.random.key(4), (2, 7, 7, 4))
  variables = layer.init(KEY, x)
  out_int, _ = integer_apply(layer, variables, x)
  p = variables["params"]
  x_hat = fake_quant(x, p["input_scale"], p["input_zero_point"], spec=layer.input_spec)
  w_hat = fake_quant(p["kernel"], p["kernel_scale"], spec=QuantSpec.for_weights(4, axis=3))
  ref = nn.Conv(4, (3, 3), feature_group_count=4).apply(
    {"params": {"kernel": w_hat, "bias": p["bias"]}}, x_hat
  )
  _close_to_float_rounding(out_int, ref)


def _recorded_range(arrays, name):
  """The integer range the recorded ``<name>_bits`` / ``_signed`` / ``_narrow`` allow."""
  bits, signed, narrow = (int(arrays[f"{name}_{f}"]) for f in ("bits", "signed", "narrow"))
  if not signed:
    return 0, 2**bits - 1
  return -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1


def test_saved_arrays_record_the_bits_and_the_integers_fit_them(tmp_path):
  # 4-bit weights (stored in int8) and 4-bit inputs, 8-bit first and last layers, and one layer
  # with float inputs (no input fields).
  rules = [
    QuantRule("Conv_0|Dense_0", QuantSpec.for_weights(8), QuantSpec.for_activations(8)),
    QuantRule("Conv_2", QuantSpec.for_weights(4), None),
    QuantRule(".*", QuantSpec.for_weights(4), QuantSpec.for_activations(4)),
  ]
  qmodel = quantize(SmallCNN(num_classes=10, features=(8, 16, 16)), rules)
  variables = qmodel.init(KEY, IMAGES)
  exported = export_integer(qmodel, variables, IMAGES)
  saved = {
    f"{path}/{k}": v
    for path, layer in exported.items()
    for k, v in integer_layer_arrays(layer).items()
  }
  np.savez(tmp_path / "layers.npz", **saved)
  with np.load(tmp_path / "layers.npz") as f:
    loaded = {k: f[k] for k in f.files}
  assert loaded.keys() == saved.keys()
  bits = {"Conv_0": 8, "Conv_1": 4, "Conv_2": 4, "Dense_0": 8}
  for path, want_bits in bits.items():
    arrays = {k.split("/", 1)[1]: v for k, v in loaded.items() if k.startswith(path + "/")}
    np.testing.assert_array_equal(arrays["weight"], exported[path].weight)
    format_keys = {"weight_bits", "weight_signed", "weight_narrow"}
    if path != "Conv_2":
      format_keys |= {"input_bits", "input_signed", "input_narrow"}
    assert format_keys <= arrays.keys()
    assert all(arrays[k].shape == () and arrays[k].dtype.kind == "i" for k in format_keys)
    assert int(arrays["weight_bits"]) == want_bits and arrays["weight"].dtype == np.int8
    lo, hi = _recorded_range(arrays, "weight")
    assert lo <= arrays["weight"].min() and arrays["weight"].max() <= hi
    assert np.abs(arrays["weight"]).max() == hi  # min-max scales reach the end of the grid
    if path == "Conv_2":
      assert not {"input_scale", "input_zero_point", "input_bits"} & arrays.keys()
      continue
    assert int(arrays["input_bits"]) == want_bits and not arrays["input_signed"]
    lo, hi = _recorded_range(arrays, "input")
    assert lo <= int(arrays["input_zero_point"]) <= hi
    assert {"weight_scale", "input_scale", "bias"} <= arrays.keys()


def test_export_of_model_without_mode_field_raises():
  model = SmallCNN()
  variables = model.init(KEY, IMAGES)
  with pytest.raises(ValueError, match="no quantized layer"):
    export_integer(model, variables, IMAGES)
  with pytest.raises(ValueError, match="mode"):
    with_mode(model, Mode.INTEGER)
