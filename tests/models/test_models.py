"""Reference ResNet and MobileNetV2: shapes, structure, BatchNorm behaviour and quantization."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import efqat_jax
from efqat_jax.models.mobilenet import MobileNetV2
from efqat_jax.models.resnet import ResNet, resnet20
from efqat_jax.quant import QuantSpec

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
def test_quantize_every_layer_and_float_mode_reproduces_model(name):
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
      ),
      "train": (
        _apply(model, fvars, DIGITS, train=True),
        _apply(fmodel, qvars, DIGITS, train=True),
        _apply(qmodel, qvars, DIGITS, train=True),
      ),
    }

  out = run(qvars, fvars)
  expected, float_mode, quantized = out["eval"]
  chex.assert_trees_all_close(float_mode, expected, rtol=1e-5, atol=1e-6)
  assert quantized.shape == expected.shape and np.all(np.isfinite(quantized))
  assert not np.allclose(quantized, expected, atol=1e-4)
  expected, float_mode, quantized = out["train"]  # (output, updated batch stats) each
  chex.assert_trees_all_close(float_mode, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal_shapes(quantized, expected)
  assert np.all(np.isfinite(quantized[0]))


def test_jitted_train_step_through_quantized_resnet_has_finite_quant_grads():
  _, qmodel, variables, _ = _quantized("resnet")

  @jax.jit
  def grad_step(params, batch_stats):
    def loss_fn(p):
      logits, stats = _apply(qmodel, {"params": p, "batch_stats": batch_stats}, DIGITS, True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), stats

    return jax.grad(loss_fn, has_aux=True)(params)

  grads, new_stats = grad_step(variables["params"], variables["batch_stats"])
  layers = _layer_paths(grads, "kernel")
  flat = flatten_dict(grads)
  for leaf in ("kernel_scale", "input_scale"):
    leaves = {k: v for k, v in flat.items() if k[-1] == leaf}
    assert len(leaves) == len(layers) == 10  # 7 trunk convs, 2 projections, the head
    for k, v in leaves.items():
      assert np.all(np.isfinite(v)), k
    assert any(np.any(v != 0) for v in leaves.values()), leaf
  chex.assert_trees_all_equal_shapes(new_stats, variables["batch_stats"])
