"""Reference ResNet and MobileNetV2: shapes, structure, BatchNorm behaviour and quantization."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import efqat_jax
from efqat_jax.models.mobilenet import MobileNetV2
from efqat_jax.models.resnet import ResNet, resnet20
from efqat_jax.quant import QuantSpec, fake_quant

# The "rbg" PRNG compiles much faster than threefry on CPU, which dominates init time here.
KEY = jax.random.key(0, impl="rbg")
MNIST = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
DIGITS = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
LABELS = jnp.array([3, 7])
QUANT_PARAMS = {"kernel_scale", "input_scale", "input_zero_point"}
ALL_W4A4 = efqat_jax.QuantRule(
  ".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4)
)

TINY_MOBILENET = dict(blocks=((1, 8, 1, 1), (4, 16, 2, 2)), stem_features=8, last_features=16)
# Small models for the numerical tests: 8x8 inputs keep compilation short.
MODELS = {
  "resnet": ResNet(num_classes=10, depth=8, width_multiplier=0.25),
  "mobilenet": MobileNetV2(num_classes=10, **TINY_MOBILENET),
}


def _layer_paths(params, leaf):
  return {"/".join(path[:-1]) for path in flatten_dict(params) if path[-1] == leaf}


def _kernel_shapes(model, x):
  params = jax.eval_shape(model.init, KEY, x)["params"]
  return {"/".join(p[:-1]): v.shape for p, v in flatten_dict(params).items() if p[-1] == "kernel"}


def _without_quant_params(params):
  flat = flatten_dict(params)
  return unflatten_dict({k: v for k, v in flat.items() if k[-1] not in QUANT_PARAMS})


@functools.cache
def _quantized(name):
  """(float model, quantized model, quantized variables, float variables), initialised once."""
  model = MODELS[name]
  qmodel = efqat_jax.quantize(model, ALL_W4A4)
  qvars = jax.jit(qmodel.init)(KEY, DIGITS)
  fvars = {"params": _without_quant_params(qvars["params"]), "batch_stats": qvars["batch_stats"]}
  return model, qmodel, qvars, fvars


def _apply(model, variables, x, train):
  """Returns (output, batch stats after the call)."""
  out, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
  return out, updates["batch_stats"]


def _fake_quantized_reference(model, qvars, x, train):
  """``_apply`` of the float ``model`` with every Conv/Dense computing on fake-quantized operands,
  written out independently of the rewrite: the kernels are fake-quantized beforehand (W4 per
  output channel, the last axis of HWIO and Dense kernels) and an interceptor fake-quantizes each
  Conv/Dense input (A4) with that layer's ``input_scale`` and ``input_zero_point``."""
  flat = flatten_dict(qvars["params"])
  params = {}
  for path, value in flat.items():
    if path[-1] == "kernel":
      params[path] = fake_quant(value, flat[(*path[:-1], "kernel_scale")], spec=ALL_W4A4.weight)
    elif path[-1] not in QUANT_PARAMS:
      params[path] = value

  def quantize_inputs(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
      layer = tuple(module.scope.path)
      scale, zero_point = flat[(*layer, "input_scale")], flat[(*layer, "input_zero_point")]
      args = (fake_quant(args[0], scale, zero_point, spec=ALL_W4A4.input), *args[1:])
    return next_fun(*args, **kwargs)

  variables = {"params": unflatten_dict(params), "batch_stats": qvars["batch_stats"]}
  with nn.intercept_methods(quantize_inputs):
    return _apply(model, variables, x, train)


@pytest.mark.parametrize("depth", [8, 20])
@pytest.mark.parametrize("x", [MNIST, DIGITS, jnp.ones((2, 32, 32, 3))], ids=["28", "8", "32"])
def test_resnet_output_shape(depth, x):
  model = ResNet(num_classes=10, depth=depth, width_multiplier=0.25)
  variables = jax.eval_shape(model.init, KEY, x)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)


@pytest.mark.parametrize("model", [MobileNetV2(num_classes=10), MODELS["mobilenet"]])
def test_mobilenet_output_shape(model):
  variables = jax.eval_shape(model.init, KEY, MNIST)
  assert jax.eval_shape(model.apply, variables, MNIST).shape == (2, 10)


def test_resnet20_has_21_convs_and_1_dense():
  kernels = _kernel_shapes(resnet20(num_classes=10), MNIST)
  convs = {p: s for p, s in kernels.items() if len(s) == 4}
  dense = {p: s for p, s in kernels.items() if len(s) == 2}
  assert len(convs) == 21 and len(dense) == 1
  assert sum(s[:2] == (3, 3) for s in convs.values()) == 19
  projections = {p: s for p, s in convs.items() if s[:2] == (1, 1)}
  # the first blocks of stages 2 and 3, which halve the resolution and double the width
  assert projections == {
    "BasicBlock_3/Conv_2": (1, 1, 16, 32),
    "BasicBlock_6/Conv_2": (1, 1, 32, 64),
  }
  assert dense == {"Dense_0": (64, 10)}


def test_mobilenet_depthwise_convs_are_depthwise():
  kernels = _kernel_shapes(MODELS["mobilenet"], MNIST)
  blocks = {p: s for p, s in kernels.items() if p.startswith("InvertedResidual_")}
  depthwise = {p: s for p, s in blocks.items() if s[:2] == (3, 3)}
  assert depthwise == {
    "InvertedResidual_0/Conv_0": (3, 3, 1, 8),  # expansion 1: no expand conv
    "InvertedResidual_1/Conv_1": (3, 3, 1, 32),  # expansion 4 of 8 channels
    "InvertedResidual_2/Conv_1": (3, 3, 1, 64),  # expansion 4 of 16 channels
  }
  assert blocks["InvertedResidual_1/Conv_0"] == (1, 1, 8, 32)
  assert blocks["InvertedResidual_1/Conv_2"] == (1, 1, 32, 16)


def test_mobilenet_expansion_overrides_rows_above_1():
  kernels = _kernel_shapes(MobileNetV2(num_classes=10, expansion=2, **TINY_MOBILENET), MNIST)
  assert kernels["InvertedResidual_1/Conv_0"] == (1, 1, 8, 16)
  assert kernels["InvertedResidual_0/Conv_0"] == (3, 3, 1, 8)  # the row with expansion 1


def test_mobilenet_width_multiplier_scales_widths_to_multiples_of_8():
  kernels = _kernel_shapes(MobileNetV2(num_classes=10, width_multiplier=2.0), MNIST)
  assert kernels["Conv_0"] == (3, 3, 1, 64)
  assert kernels["InvertedResidual_1/Conv_2"] == (1, 1, 32 * 6, 48)
  assert kernels["Conv_1"][-1] == 512
  kernels = _kernel_shapes(MobileNetV2(num_classes=10, width_multiplier=0.25), MNIST)
  assert kernels["Conv_0"] == (3, 3, 1, 8)
  assert kernels["InvertedResidual_1/Conv_2"] == (1, 1, 8 * 6, 8)
  assert kernels["Conv_1"][-1] == 256  # the last conv is not narrowed


def test_resnet_width_multiplier_scales_stage_widths():
  kernels = _kernel_shapes(ResNet(num_classes=10, depth=8, width_multiplier=0.5), MNIST)
  assert kernels["Conv_0"] == (3, 3, 1, 8)
  assert kernels["BasicBlock_2/Conv_1"] == (3, 3, 32, 32)
  assert kernels["Dense_0"] == (32, 10)


@pytest.mark.parametrize("depth", [0, 7, 19, 21])
def test_invalid_resnet_depth_raises_naming_depth(depth):
  with pytest.raises(ValueError, match="depth"):
    jax.eval_shape(ResNet(depth=depth).init, KEY, DIGITS)


def _np_conv_same(x, w):
  """float64 NHWC x HWIO convolution, stride 1, SAME padding (odd kernel)."""
  kh, kw = w.shape[:2]
  xp = np.pad(x.astype(np.float64), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  n, h, wd, _ = x.shape
  out = np.zeros((n, h, wd, w.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      out += np.einsum("nhwc,ck->nhwk", xp[:, a : a + h, b : b + wd], w[a, b].astype(np.float64))
  return out


@pytest.mark.parametrize("name", MODELS)
def test_batch_stats_update_in_train_mode_only(name):
  model, _, _, variables = _quantized(name)

  @jax.jit
  def run(variables):
    return (
      _apply(model, variables, DIGITS, train=True),
      _apply(model, variables, DIGITS[:1], train=True)[0],
      _apply(model, variables, DIGITS, train=False),
      model.apply(variables, DIGITS[:1]),  # eval mode needs no mutable collection
    )

  (train_out, train_stats), train_first, (eval_out, eval_stats), eval_first = run(variables)
  stats = variables["batch_stats"]
  assert jax.tree.structure(train_stats) == jax.tree.structure(stats)
  # The first BatchNorm normalises the stem conv (3x3, SAME, no bias): its running statistics
  # move by momentum 0.9 towards the batch mean and (biased) variance of that conv's output.
  stem = _np_conv_same(np.asarray(DIGITS), np.asarray(variables["params"]["Conv_0"]["kernel"]))
  mean, var = stem.mean(axis=(0, 1, 2)), stem.var(axis=(0, 1, 2))
  old, new = stats["BatchNorm_0"], train_stats["BatchNorm_0"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-4, atol=1e-5)
  # every BatchNorm moves its running variance (some batch means are exactly 0: a BN output
  # fed through a residual sum and a bias-free 1x1 conv keeps a zero batch mean)
  for path, old in flatten_dict(stats).items():
    new = flatten_dict(train_stats)[path]
    assert path[-1] == "mean" or not np.allclose(old, new), path
  chex.assert_trees_all_equal(eval_stats, stats)
  # eval mode normalises with the running statistics, so each example independently of the
  # batch; train mode with the batch statistics.
  chex.assert_trees_all_close(eval_first, eval_out[:1], atol=1e-5)
  assert not np.allclose(train_first, train_out[:1], atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_quantize_every_layer_float_mode_reproduces_model_and_quantize_mode_fake_quantizes(name):
  model, qmodel, qvars, fvars = _quantized(name)
  params = qvars["params"]
  assert _layer_paths(params, "kernel_scale") == _layer_paths(params, "kernel")
  assert _layer_paths(params, "input_scale") == _layer_paths(params, "kernel")
  float_shapes = jax.eval_shape(model.init, KEY, DIGITS)
  chex.assert_trees_all_equal_shapes_and_dtypes(fvars, float_shapes)
  fmodel = qmodel.clone(mode=efqat_jax.Mode.FLOAT)

  @jax.jit
  def run(qvars, fvars):
    return {
      "eval": (
        model.apply(fvars, DIGITS),
        fmodel.apply(qvars, DIGITS),
        qmodel.apply(qvars, DIGITS),
        _fake_quantized_reference(model, qvars, DIGITS, train=False)[0],
      ),
      "train": (
        _apply(model, fvars, DIGITS, train=True),
        _apply(fmodel, qvars, DIGITS, train=True),
        _apply(qmodel, qvars, DIGITS, train=True),
        _fake_quantized_reference(model, qvars, DIGITS, train=True),
      ),
    }

  out = run(qvars, fvars)
  expected, float_mode, quantized, reference = out["eval"]
  chex.assert_trees_all_close(float_mode, expected, rtol=1e-5, atol=1e-6)
  # Quantize mode is the float model on fake-quantized kernels and Conv/Dense inputs...
  chex.assert_trees_all_close(quantized, reference, rtol=1e-5, atol=1e-5)
  # ... which is not the float model.
  assert not np.allclose(quantized, expected, atol=1e-4)
  expected, float_mode, quantized, reference = out["train"]  # (output, updated batch stats) each
  chex.assert_trees_all_close(float_mode, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(quantized, reference, rtol=1e-5, atol=1e-5)
  assert not np.allclose(quantized[0], expected[0], atol=1e-4)


def test_jitted_train_step_through_quantized_resnet_gives_lsq_scale_grads():
  _, qmodel, variables, _ = _quantized("resnet")

  @jax.jit
  def grad_step(params, batch_stats, x):
    def loss_fn(p, x):
      logits, stats = _apply(qmodel, {"params": p, "batch_stats": batch_stats}, x, True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), stats

    return jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(params, x)

  (grads, x_grad), new_stats = grad_step(variables["params"], variables["batch_stats"], DIGITS)
  params = flatten_dict(variables["params"])
  layers = _layer_paths(grads, "kernel")
  flat = flatten_dict(grads)
  for leaf in ("kernel_scale", "input_scale"):
    leaves = {k: v for k, v in flat.items() if k[-1] == leaf}
    assert len(leaves) == len(layers) == 10  # 7 trunk convs, 2 projections, the head
    for k, v in leaves.items():
      assert np.all(np.isfinite(v)), k
    assert any(np.any(v != 0) for v in leaves.values()), leaf
  # LSQ (Esser et al. 2020) by hand, per layer. The kernel scales start at min-max, so no kernel
  # entry is clipped and the kernel gradient is dL/dw_hat everywhere; then, per output channel c
  # (the last axis), dL/ds_c = sum_c(dL/dw_hat * (round(w / s) - w / s)) / sqrt(n_c * qmax).
  qmax = ALL_W4A4.weight.qmax
  for layer in {tuple(p.split("/")) for p in layers}:
    w = np.asarray(params[(*layer, "kernel")], np.float64)
    s = np.asarray(params[(*layer, "kernel_scale")], np.float64)
    w_grad = np.asarray(flat[(*layer, "kernel")], np.float64)
    u = w / s
    assert np.abs(np.round(u)).max() <= qmax, layer  # nothing clipped
    axes = tuple(range(w.ndim - 1))
    gs = 1 / math.sqrt(w.size // w.shape[-1] * qmax)
    want = gs * np.sum(w_grad * (np.round(u) - u), axis=axes)
    atol = 1e-5 * gs * np.sum(np.abs(w_grad), axis=axes).max()
    np.testing.assert_allclose(flat[(*layer, "kernel_scale")], want, rtol=1e-4, atol=atol)
  # The stem conv's input is the batch itself, whose range its input scale and zero point were
  # initialised from: nothing clips, the input gradient is dL/dx_hat, the zero point gets no
  # gradient, and the scale's uses the activation grad scale 1 / sqrt(per-example size * qmax).
  s = float(params[("Conv_0", "input_scale")])
  z = float(params[("Conv_0", "input_zero_point")])
  x, g = np.asarray(DIGITS, np.float64), np.asarray(x_grad, np.float64)
  u = x / s
  assert np.all((np.round(u) + z >= 0) & (np.round(u) + z <= 15))  # nothing clipped
  gs = 1 / math.sqrt(8 * 8 * 1 * ALL_W4A4.input.qmax)
  want = gs * np.sum(g * (np.round(u) - u))
  np.testing.assert_allclose(
    flat[("Conv_0", "input_scale")], want, rtol=1e-4, atol=1e-5 * gs * np.abs(g).sum()
  )
  assert float(flat[("Conv_0", "input_zero_point")]) == 0.0
  chex.assert_trees_all_equal_shapes(new_stats, variables["batch_stats"])
