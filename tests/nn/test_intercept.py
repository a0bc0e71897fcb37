"""quantize(model, rules) on models written with plain Flax layers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import efqat_jax
from efqat_jax.models import SmallCNN, Transformer
from efqat_jax.nn import Mode, QuantDense, QuantRule, quantize
from efqat_jax.quant import QuantSpec

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)
W8, A8 = QuantSpec.for_weights(8), QuantSpec.for_activations(8)
KEY = jax.random.key(0)
QUANT_PARAMS = {"kernel_scale", "input_scale", "input_zero_point"}
EMBED_PARAMS = {"embedding_scale"}  # the Transformer's token embedding, quantized per row


class MLPBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.width)(x)))


class NestedMLP(nn.Module):
  """Submodules defined inline with nn.compact, two levels deep."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x)
    for _ in range(2):
      x = MLPBlock(32)(x)
    return nn.Dense(3)(x)


IMAGES = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))
FEATURES = jax.random.normal(jax.random.key(2), (4, 8))
TOKENS = jax.random.randint(jax.random.key(3), (2, 10), 0, 32)

MODELS = {
  "cnn": (SmallCNN(num_classes=10, features=(8, 16)), IMAGES),
  "nested": (NestedMLP(), FEATURES),
  "attention": (
    Transformer(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, max_len=16),
    TOKENS,
  ),
}
ALL_W4A4 = QuantRule(".*", weight=W4, input=A4)


def _quantized_layer_paths(params):
  return {"/".join(path[:-1]) for path in flatten_dict(params) if path[-1] == "kernel_scale"}


@pytest.mark.parametrize("name", MODELS)
def test_params_are_original_params_plus_quantization_params(name):
  model, x = MODELS[name]
  float_params = flatten_dict(model.init(KEY, x)["params"])
  quant_params = flatten_dict(quantize(model, ALL_W4A4).init(KEY, x)["params"])
  extra = {k for k in quant_params if k not in float_params}
  assert {k[-1] for k in extra} == QUANT_PARAMS | (EMBED_PARAMS if name == "attention" else set())
  for k, v in float_params.items():
    np.testing.assert_array_equal(quant_params[k], v, err_msg=str(k))


@pytest.mark.parametrize("name", MODELS)
def test_float_mode_reproduces_original_model(name):
  model, x = MODELS[name]
  qmodel = quantize(model, ALL_W4A4)
  variables = qmodel.init(KEY, x)
  float_out = model.apply({"params": model.init(KEY, x)["params"]}, x)
  chex.assert_trees_all_close(qmodel.clone(mode=Mode.FLOAT).apply(variables, x), float_out)
  quant_out = qmodel.apply(variables, x)
  assert quant_out.shape == float_out.shape
  assert not np.allclose(quant_out, float_out, atol=1e-4)


def test_every_dense_conv_and_dense_general_is_intercepted():
  model, x = MODELS["attention"]
  params = quantize(model, ALL_W4A4).init(KEY, x)["params"]
  attention = {
    f"TransformerBlock_{i}/MultiHeadDotProductAttention_0/{p}"
    for i in range(2)
    for p in ("query", "key", "value", "out")
  }
  dense = {f"TransformerBlock_{i}/Dense_{j}" for i in range(2) for j in range(2)}
  assert _quantized_layer_paths(params) == attention | dense | {"Dense_0"}
  cnn, images = MODELS["cnn"]
  assert _quantized_layer_paths(quantize(cnn, ALL_W4A4).init(KEY, images)["params"]) == {
    "Conv_0",
    "Conv_1",
    "Dense_0",
  }


def test_intercepted_layer_computes_like_native_quant_layer():
  class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6)(x)

  qmodel = quantize(OneDense(), ALL_W4A4)
  variables = qmodel.init(KEY, FEATURES)
  native = QuantDense(6, weight_spec=W4, input_spec=A4)
  native_vars = {c: variables[c]["Dense_0"] for c in variables}
  chex.assert_trees_all_close(
    qmodel.apply(variables, FEATURES), native.apply(native_vars, FEATURES), rtol=1e-6
  )


def test_first_matching_rule_wins_and_keep_float_leaves_layer_in_float():
  model, x = MODELS["nested"]
  rules = [
    QuantRule.keep_float("Dense_0|Dense_1"),
    QuantRule("MLPBlock_0/.*", weight=W8, input=None),
    QuantRule(".*", weight=W4, input=A4),
  ]
  params = quantize(model, rules).init(KEY, x)["params"]
  assert "kernel_scale" not in params["Dense_0"] and "kernel_scale" not in params["Dense_1"]
  assert set(params["MLPBlock_0"]["Dense_0"]) == {"kernel", "bias", "kernel_scale"}
  assert set(params["MLPBlock_1"]["Dense_1"]) >= QUANT_PARAMS


def test_rule_matching_no_layer_raises_naming_it():
  model, x = MODELS["cnn"]
  rules = [QuantRule("Conv_9", weight=W4, input=A4), ALL_W4A4]
  with pytest.raises(ValueError, match="Conv_9"):
    quantize(model, rules).init(KEY, x)


def test_invalid_rules_raise():
  with pytest.raises(ValueError, match="module_path"):
    QuantRule("Dense_(", weight=W4, input=A4)
  with pytest.raises(ValueError, match="QuantRule"):
    quantize(SmallCNN(), [("Dense_0", W4)])


def test_what_is_not_a_module_instance_or_mixes_up_the_two_apis_raises_one_line():
  from flax import nnx

  class NnxMLP(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 2, rngs=rngs)

  cases = {
    (TypeError, "the class SmallCNN: pass an instance"): (SmallCNN, ()),
    (TypeError, "the class NnxMLP: pass an instance"): (NnxMLP, ()),
    (TypeError, "flax.linen.Module or a flax.nnx.Module instance; got builtins.function"): (
      lambda x: x,
      (),
    ),
    (ValueError, "an NNX model needs the inputs of one call"): (NnxMLP(nnx.Rngs(0)), ()),
    (ValueError, "a Linen model takes its inputs at init"): (SmallCNN(), (FEATURES,)),
  }
  for (error, message), (model, inputs) in cases.items():
    with pytest.raises(error, match=message) as raised:
      quantize(model, ALL_W4A4, *inputs)
    assert "\n" not in str(raised.value)
  for keywords, field in [
    (dict(mode="quantize"), "mode"),
    (dict(weight_estimator="max"), "weight_estimator"),
  ]:
    with pytest.raises(ValueError, match=f"^{field} must be"):
      quantize(SmallCNN(), ALL_W4A4, **keywords)


def test_quantized_model_composes_into_a_larger_model_under_jit_and_grad():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8)(x)  # outside the quantized part: stays float
      return quantize(NestedMLP(), ALL_W4A4)(x)

  variables = Outer().init(KEY, FEATURES)
  params = variables["params"]
  assert "kernel_scale" not in params["Dense_0"]
  assert _quantized_layer_paths(params) and all(
    p.startswith("NestedMLP_0/") for p in _quantized_layer_paths(params)
  )
  loss = jax.jit(jax.grad(lambda p: jnp.sum(Outer().apply({"params": p}, FEATURES) ** 2)))
  grads = loss(params)
  assert float(jnp.abs(grads["NestedMLP_0"]["Dense_0"]["input_scale"])) > 0


def test_top_level_exports():
  assert efqat_jax.quantize is quantize
  assert efqat_jax.QuantRule is QuantRule


def test_layer_that_bypasses_its_op_is_reported_instead_of_silently_left_in_float():
  class OwnMatmulDense(nn.Dense):
    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
      return x @ kernel

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return OwnMatmulDense(4)(x)

  with pytest.raises(ValueError, match="never called"):
    quantize(Model(), ALL_W4A4).init(KEY, FEATURES)


class ScannedBlocks(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.Dense(8)(h), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="blocks")(nn.Dense(8)(x), None)[0]


@pytest.mark.parametrize(
  "pattern", ["blocks/Dense_0\\[1\\]", "blocks_1/Dense_0", "blocks/1/Dense_0"]
)
def test_a_rule_for_one_layer_of_a_scanned_stack_raises_saying_why_and_what_to_do(pattern):
  rules = [QuantRule(pattern, weight=W8, input=A8), ALL_W4A4]
  with pytest.raises(ValueError, match="stacked by nn.scan.*one format.*unstacked"):
    quantize(ScannedBlocks(), rules).init(KEY, FEATURES)


def test_a_rule_for_the_whole_stack_gives_every_layer_of_it_that_format():
  rules = [QuantRule("blocks/Dense_0", weight=W8, input=A8), ALL_W4A4]
  variables = quantize(ScannedBlocks(), rules).init(KEY, FEATURES)
  stacked = variables["params"]["blocks"]["Dense_0"]
  assert stacked["kernel"].shape == (3, 8, 8) and stacked["kernel_scale"].shape == (3, 8)
  layers = efqat_jax.nn.quantized_layers(quantize(ScannedBlocks(), rules), variables, FEATURES)
  assert layers["blocks/Dense_0"].weight_spec.bits == 8 and layers["Dense_0"].weight_spec.bits == 4
  assert layers["blocks/Dense_0"].units() == [f"blocks/Dense_0[{i}]" for i in range(3)]


def test_a_catch_all_rule_warns_for_a_layer_it_cannot_quantize():
  class WithTransposedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.ConvTranspose(4, (3, 3))(x).mean(axis=(1, 2)))

  with pytest.warns(UserWarning, match="ConvTranspose_0.*stays in float"):
    params = quantize(WithTransposedConv(), ALL_W4A4).init(KEY, IMAGES)["params"]
  assert "kernel_scale" in params["Dense_0"] and "kernel_scale" not in params["ConvTranspose_0"]


def test_a_layer_with_its_own_dot_general_warns_and_stays_float():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, dot_general=jax.lax.dot_general)(x)

  with pytest.warns(UserWarning, match="Dense_0 stays in float: it already sets a custom"):
    params = quantize(Model(), ALL_W4A4).init(KEY, FEATURES)["params"]
  assert set(params["Dense_0"]) == {"kernel", "bias"}


def test_einsum_and_tied_embedding_are_quantized_by_a_rule_that_names_them():
  class TiedEinsum(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(32, 8)
      h = nn.Einsum((8, 2, 4), "btd,dhk->bthk")(embed(tokens)).reshape(*tokens.shape, 8)
      return embed.attend(h)

  model = quantize(TiedEinsum(), [QuantRule("Embed_0|Einsum_0", weight=W4, input=A8)])
  variables = model.init(KEY, TOKENS)
  p = variables["params"]
  assert p["Embed_0"]["embedding_scale"].shape == (32,)  # one scale per row
  assert p["Einsum_0"]["kernel_scale"].shape == (2, 4)  # per output channel (heads x features)
  out = model.apply(variables, TOKENS)
  float_out = model.clone(mode=Mode.FLOAT).apply(variables, TOKENS)
  assert out.shape == float_out.shape == (*TOKENS.shape, 32)
  assert not np.allclose(out, float_out, atol=1e-4)
  w_hat = efqat_jax.fake_quant(
    p["Embed_0"]["embedding"],
    p["Embed_0"]["embedding_scale"],
    spec=QuantSpec.for_weights(4, axis=0),
  )
  lookup = nn.Embed(32, 8).apply({"params": {"embedding": w_hat}}, TOKENS)
  embed = {k: p["Embed_0"][k] for k in ("embedding", "embedding_scale")}
  quantized_lookup = quantize(nn.Embed(32, 8), QuantRule(".*", weight=W4, input=None))
  chex.assert_trees_all_close(quantized_lookup.apply({"params": embed}, TOKENS), lookup)


@pytest.mark.parametrize(
  "equation, x_shape, w_shape",
  [
    ("...d,dhk->...hk", (2, 5, 8), (8, 2, 4)),  # leading axes by ellipsis (nnx/Linen docs style)
    ("...d,dk->...k", (8,), (8, 3)),  # the ellipsis standing for no axis
    ("b...d,de->b...e", (2, 3, 4, 8), (8, 5)),  # in the middle
    ("...hk,hkd->...d", (2, 5, 2, 4), (2, 4, 8)),
  ],
)
def test_einsum_with_an_ellipsis_in_the_input_is_one_dot_general(equation, x_shape, w_shape):
  from efqat_jax.nn.einsum import einsum_plan

  x = jax.random.normal(KEY, x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  plan = einsum_plan(equation, x.ndim, w.ndim)
  got = jnp.transpose(jax.lax.dot_general(x, w, plan.dimension_numbers), plan.output_perm)
  np.testing.assert_allclose(got, jnp.einsum(equation, x, w), rtol=1e-5, atol=1e-5)
  layer = nn.Einsum(w_shape, equation, use_bias=False)
  qlayer = quantize(layer, ALL_W4A4)
  variables = qlayer.init(KEY, x)
  float_out = qlayer.clone(mode=Mode.FLOAT).apply(variables, x)
  np.testing.assert_allclose(float_out, layer.apply(variables, x), rtol=1e-5, atol=1e-5)
  assert variables["params"]["kernel_scale"].size > 1  # quantized per output channel


def test_an_ellipsis_in_the_kernel_is_a_one_line_error():
  from efqat_jax.nn.einsum import einsum_plan

  with pytest.raises(ValueError, match=r"^einsum kernel spec '\.\.\.k': an ellipsis in the kernel"):
    einsum_plan("bd,...k->bk", 2, 2)
