"""quantize() on Flax NNX models written the way NNX codebases write them: the same quantized
numbers as the Linen front end, stacks built with nnx.vmap and run with nnx.scan over nnx.remat,
gradients through nnx.jit, and the user's mistakes named."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efqat_jax import Mode, QuantRule, QuantSpec, quantize
from efqat_jax.nn import with_mode

W4A8 = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(8))
RULES = [QuantRule.keep_float("head"), W4A8]
IMAGES = jax.random.uniform(jax.random.key(1), (3, 6, 6, 1))
TOKENS = jax.random.randint(jax.random.key(2), (3, 5), 0, 10)


class NnxNet(nnx.Module):
  """Every quantizable NNX kind: Conv, Embed (lookup and tied attend), Einsum, LinearGeneral,
  Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.mix = nnx.Einsum("btd,dhk->bthk", (4, 2, 3), (2, 3), rngs=rngs)
    self.proj = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(4, 5, rngs=rngs)

  def __call__(self, images, tokens):
    h = jnp.mean(jax.nn.relu(self.conv(images)), axis=(1, 2))
    p = self.proj(jax.nn.gelu(self.mix(self.embed(tokens) + h[:, None, :])))
    return self.head(p), self.embed.attend(p)


class LinenNet(nn.Module):
  """NnxNet in Linen, with the same module names and param shapes."""

  @nn.compact
  def __call__(self, images, tokens):
    embed = nn.Embed(10, 4, name="embed")
    h = jnp.mean(jax.nn.relu(nn.Conv(4, (3, 3), name="conv")(images)), axis=(1, 2))
    mix = nn.Einsum((4, 2, 3), "btd,dhk->bthk", name="mix")
    p = nn.DenseGeneral(4, axis=(-2, -1), name="proj")(
      jax.nn.gelu(mix(embed(tokens) + h[:, None, :]))
    )
    return nn.Dense(5, name="head")(p), embed.attend(p)


def _params(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _numpy_state(model: nnx.Module) -> dict:
  """Every variable of ``model`` as NumPy (RNG keys as their key data)."""
  as_numpy = lambda a: np.asarray(
    jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  )
  return jax.tree.map(as_numpy, nnx.to_pure_dict(nnx.state(model)))


def test_the_same_model_in_linen_and_nnx_gets_the_same_quantization_params_and_outputs():
  model = NnxNet(nnx.Rngs(0))
  qmodel = quantize(model, RULES, IMAGES, TOKENS)
  linen = quantize(LinenNet(), RULES)
  # Linen creates the quantization params from the given float params and batch, as init does.
  out, variables = linen.apply({"params": _params(model)}, IMAGES, TOKENS, mutable=["params"])
  linen_params, nnx_params = variables["params"], _params(qmodel)
  assert jax.tree.structure(linen_params) == jax.tree.structure(nnx_params)
  assert {"kernel_scale", "input_scale", "input_zero_point"} <= set(nnx_params["proj"])
  assert "embedding_scale" in nnx_params["embed"] and "kernel_scale" not in nnx_params["head"]
  np.testing.assert_equal(
    jax.tree.map(np.asarray, nnx_params), jax.tree.map(np.asarray, linen_params)
  )
  for got, want in zip(qmodel(IMAGES, TOKENS), out, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Quantization changes the outputs; FLOAT gives the float model's back; the float model and
  # its state were left as they were.
  assert float(jnp.max(jnp.abs(qmodel(IMAGES, TOKENS)[1] - model(IMAGES, TOKENS)[1]))) > 1e-3
  for got, want in zip(
    with_mode(qmodel, Mode.FLOAT)(IMAGES, TOKENS), model(IMAGES, TOKENS), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert type(model.proj) is nnx.LinearGeneral and "kernel_scale" not in _params(model)["proj"]
  assert type(qmodel.proj).__name__ == "LinearGeneral" and isinstance(
    qmodel.proj, nnx.LinearGeneral
  )
  # The quantized model splits and merges like any NNX model, and keeps its formats.
  graphdef, state = nnx.split(qmodel)
  for got, want in zip(nnx.merge(graphdef, state)(IMAGES, TOKENS), out, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


class Block(nnx.Module):
  def __init__(self, d: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.relu(self.up(self.norm(x))))


class ScannedStack(nnx.Module):
  """Blocks built with nnx.vmap and run with nnx.scan over nnx.remat, the NNX idiom."""

  def __init__(self, d: int, depth: int, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, rngs)

    self.blocks = make(rngs)
    self.out = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(x, block):
      return block(x)

    return self.out(body(x, self.blocks))


class LoopStack(nnx.Module):
  """ScannedStack with its blocks unstacked, in a Python list."""

  def __init__(self, stacked: ScannedStack, depth: int):
    graphdef, state = nnx.split(stacked.blocks)
    self.blocks = nnx.List(
      [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(depth)]
    )
    self.out = stacked.out

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.out(x)


def test_a_scanned_remat_stack_quantizes_each_layer_as_the_same_layers_unstacked():
  x = jax.random.normal(jax.random.key(3), (4, 8))
  stacked = ScannedStack(8, 3, nnx.Rngs(0))
  qstacked = quantize(stacked, W4A8, x)
  # The loop's layers see the inputs of the stack's layers, so their input scales match.
  qloop = quantize(LoopStack(stacked, 3), W4A8, x)
  params, loop_params = _params(qstacked), _params(qloop)
  assert params["blocks"]["up"]["kernel_scale"].shape == (3, 16)
  assert params["blocks"]["up"]["input_scale"].shape == (3,)
  for i in range(3):
    for name in ("up", "down"):
      for key, value in loop_params["blocks"][i][name].items():
        np.testing.assert_allclose(params["blocks"][name][key][i], value, rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(qstacked(x), qloop(x), rtol=1e-5, atol=1e-6)

  @nnx.jit
  def grads(model, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

  g = nnx.to_pure_dict(grads(qstacked, x))
  for name in ("kernel", "kernel_scale", "input_scale"):
    value = np.asarray(g["blocks"]["up"][name])
    assert np.all(np.isfinite(value)) and np.all(np.abs(value).reshape(3, -1).max(1) > 0), name

  with pytest.raises(ValueError, match=r"addresses one layer of 'blocks/up'.*nnx.vmap"):
    quantize(stacked, [QuantRule.keep_float("blocks/0/up"), W4A8], x)


def test_example_call_side_effects_are_undone_and_mistakes_are_named():
  class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.drop(self.bn(self.conv(x)))

  model = WithBatchNorm(nnx.Rngs(0))
  before = _numpy_state(model)
  qmodel = quantize(model, W4A8, IMAGES)  # train mode: updates batch stats, draws dropout
  after = _numpy_state(qmodel)
  np.testing.assert_equal(after["bn"], before["bn"])
  np.testing.assert_equal(after["drop"], before["drop"])
  np.testing.assert_equal(_numpy_state(model), before)

  with pytest.raises(ValueError, match=r"'conv2' matched no .* layers are \['conv'\]"):
    quantize(model, [QuantRule.keep_float("conv2"), W4A8], IMAGES)

  class OwnWeight(nnx.Module):
    def __init__(self, rngs):
      self.custom = nnx.Linear(4, 4, dot_general=lambda *a, **k: jax.lax.dot_general(*a), rngs=rngs)
      self.w = nnx.Param(jnp.ones((4, 4)))
      self.plain = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      return self.plain(self.custom(x) @ self.w[...])

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    qmodel = quantize(OwnWeight(nnx.Rngs(0)), W4A8, jnp.ones((2, 4)))
  messages = "\n".join(str(w.message) for w in caught)
  assert "custom stays in float: it already sets a custom dot_general" in messages
  assert "weights ['w'] belong to no quantizable layer kind" in messages
  assert set(_params(qmodel)["plain"]) > {"kernel", "kernel_scale"}
  assert set(_params(qmodel)["custom"]) == {"kernel", "bias"}


def test_what_is_linen_only_so_far_says_so_in_one_line():
  from efqat_jax.nn import quantized_layers
  from efqat_jax.ptq import calibrate
  from efqat_jax.ptq.capture import captured_inputs
  from efqat_jax.train import make_mesh, make_train_step

  x = jnp.ones((2, 8))
  qmodel = quantize(ScannedStack(8, 2, nnx.Rngs(0)), W4A8, x)
  cases = [
    (ValueError, "for an NNX model, got CALIBRATE", lambda: calibrate(qmodel, {}, [x], 1)),
    (ValueError, "for an NNX model, got INTEGER", lambda: with_mode(qmodel, Mode.INTEGER)),
    (
      ValueError,
      "for an NNX model, got CALIBRATE",
      lambda: quantize(qmodel, W4A8, x, mode=Mode.CALIBRATE),
    ),
    (TypeError, "^quantized_layers takes a Linen model", lambda: quantized_layers(qmodel, {}, x)),
    (TypeError, "^captured_inputs takes a Linen model", lambda: captured_inputs(qmodel, {}, x)),
    (
      TypeError,
      "^make_train_step takes a Linen model",
      lambda: make_train_step(qmodel, None, make_mesh()),
    ),
  ]
  for error, message, call in cases:
    with pytest.raises(error, match=message) as raised:
      call()
    assert "\n" not in str(raised.value)
