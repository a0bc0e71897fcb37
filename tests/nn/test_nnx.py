"""The NNX front end. quantize() on Flax NNX models written the way NNX codebases write them:
the same quantized numbers as the Linen front end, stacks built with nnx.vmap and run with
nnx.scan over nnx.remat, gradients through nnx.jit, the user's mistakes named. as_linen: the
same model through the Linen-based library gives what the Linen model gives (calibration,
layers, an EfQAT step, export), layer-wise PTQ works on an nnx.scan stack as on the same layers
unstacked, and to_nnx brings the results back. (More NNX models, each through calibration, QAT,
EfQAT and export: tests/test_flax_codebases.py.)"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efqat_jax import Mode, QuantRule, QuantSpec, export_integer, quantize
from efqat_jax.efqat import freeze_unselected, restrict_backward, select, set_trainable
from efqat_jax.fields import to_config
from efqat_jax.nn import as_linen, quantized_layers, to_nnx, with_mode
from efqat_jax.ptq import PTQ_METHODS, calibrate, quantize_weights
from efqat_jax.qat.block_replacement import Replacement, block_replacement_loss, find_boundaries
from efqat_jax.train import create_train_state, make_mesh, make_train_step, replicate, shard_batch
from efqat_jax.train.checkpoint import Checkpointer

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
  # Linen creates the quantization params from the given float params and batch, as init does
  # (compiled, as quantize runs the NNX model: the same program gives the same bits).
  apply = jax.jit(functools.partial(linen.apply, mutable=["params"]))
  out, variables = apply({"params": _params(model)}, IMAGES, TOKENS)
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

    self.inp = nnx.Linear(d, d, rngs=rngs)
    self.blocks = make(rngs)
    self.out = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(x, block):
      return block(x)

    return self.out(body(self.inp(x), self.blocks))


class LoopStack(nnx.Module):
  """ScannedStack with its blocks unstacked, in a Python list."""

  def __init__(self, stacked: ScannedStack, depth: int):
    graphdef, state = nnx.split(stacked.blocks)
    self.blocks = nnx.List(
      [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(depth)]
    )
    self.inp, self.out = stacked.inp, stacked.out

  def __call__(self, x):
    x = self.inp(x)
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


def test_linen_entry_points_given_an_nnx_model_point_to_as_linen_in_one_line():
  from efqat_jax.nn import quantized_layers
  from efqat_jax.ptq import calibrate
  from efqat_jax.ptq.capture import captured_inputs
  from efqat_jax.train import make_mesh, make_train_step

  x = jnp.ones((2, 8))
  qmodel = quantize(ScannedStack(8, 2, nnx.Rngs(0)), W4A8, x)
  cases = [
    (ValueError, "for an NNX model itself, got CALIBRATE", lambda: calibrate(qmodel, {}, [x], 1)),
    (ValueError, "for an NNX model itself, got INTEGER", lambda: with_mode(qmodel, Mode.INTEGER)),
    (
      ValueError,
      "for an NNX model itself, got CALIBRATE",
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
    assert "\n" not in str(raised.value) and "as_linen" in str(raised.value)


BATCHES = [(IMAGES * (1 + i), TOKENS) for i in range(3)]


def _assert_trees_equal(got, want, **tolerance):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  compare = np.testing.assert_allclose if tolerance else np.testing.assert_array_equal
  jax.tree.map(lambda a, b: compare(np.asarray(a), np.asarray(b), **tolerance), got, want)


def _loss(apply, batch, rng, train):
  logits, tied = apply(batch["images"], batch["tokens"])
  return jnp.mean(logits**2) + jnp.mean(tied**2), {}


def _calibrated_and_stepped(qmodel, variables):
  """Calibrated variables, the layers, and the params after one EfQAT step (CWPL, rho 0.5);
  a second step after re-selection must not retrace."""
  calibrated = calibrate(qmodel, variables, BATCHES, 3)
  variables = {k: v for k, v in calibrated.items() if k != "quant_stats"}
  layers = quantized_layers(qmodel, variables, IMAGES, TOKENS)
  trainable = select(variables["params"], layers, "cwpl", 0.5)
  mesh, tx = make_mesh(), freeze_unselected(optax.sgd(0.1))
  state = replicate(create_train_state(variables, tx), mesh)
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
  step = make_train_step(qmodel, tx, mesh, _loss, param_context=restrict_backward)
  batch = shard_batch({"images": IMAGES, "tokens": TOKENS}, mesh)
  state, _ = step(state, batch, jax.random.key(0), trainable)
  stepped = jax.device_get(state.params)
  # Re-selecting on the new weights (same counts, other channels) is data: no retrace.
  reselected = select(state.params, layers, "cwpl", 0.5)
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, reselected))
  step(state, batch, jax.random.key(1), reselected)
  assert step.jitted._cache_size() == 1
  return calibrated, layers, trainable, stepped


def test_the_same_model_in_linen_and_nnx_calibrates_trains_an_efqat_step_and_exports_the_same():
  model = NnxNet(nnx.Rngs(0))
  module, variables = as_linen(quantize(model, RULES, IMAGES, TOKENS))
  linen = quantize(LinenNet(), RULES)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _, linen_variables = linen.apply({"params": params}, IMAGES, TOKENS, mutable=["params"])

  nnx_run = _calibrated_and_stepped(module, variables)
  linen_run = _calibrated_and_stepped(linen, linen_variables)
  _assert_trees_equal(nnx_run[0], linen_run[0])  # calibrated params and running ranges
  assert nnx_run[1] == linen_run[1]  # the same layers: shapes, formats, ops
  assert nnx_run[2].counts == linen_run[2].counts
  _assert_trees_equal(nnx_run[3], linen_run[3], rtol=1e-6, atol=1e-7)  # one EfQAT step
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), nnx_run[3], nnx_run[0]["params"])
  assert moved["proj"]["kernel"] and moved["embed"]["embedding"]

  stepped = {"params": nnx_run[3]}
  exported = export_integer(module, stepped, IMAGES, TOKENS)
  linen_exported = export_integer(linen, {"params": linen_run[3]}, IMAGES, TOKENS)
  assert exported.keys() == linen_exported.keys() == {"conv", "embed", "mix", "proj"}
  for unit, layer in exported.items():
    np.testing.assert_array_equal(layer.weight, linen_exported[unit].weight, err_msg=unit)

  # Back in NNX: the trained model computes what the Linen-side variables compute.
  trained = to_nnx(quantize(model, RULES, IMAGES, TOKENS), stepped)
  for got, want in zip(trained(IMAGES, TOKENS), module.apply(stepped, IMAGES, TOKENS), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_optq_on_an_nnx_scan_stack_equals_optq_on_the_same_layers_unstacked():
  x = jax.random.normal(jax.random.key(3), (32, 8))
  stacked = ScannedStack(8, 3, nnx.Rngs(0))
  optq = PTQ_METHODS.get("optq")
  settings = to_config(optq.fields)
  results = {}
  for name, model in {"stacked": stacked, "loop": LoopStack(stacked, 3)}.items():
    module, variables = as_linen(quantize(model, W4A8, x))
    calibrated = calibrate(module, variables, [x], 1)["params"]
    layers = quantized_layers(module, {"params": calibrated}, x)
    capture = optq.capture_for(module, {"params": calibrated}, [x], settings)
    rtn = quantize_weights(PTQ_METHODS.get("rtn"), calibrated, layers)
    results[name] = (quantize_weights(optq, calibrated, layers, settings, capture), rtn)
  (stacked_optq, stacked_rtn), (loop_optq, _) = results["stacked"], results["loop"]
  for i in range(3):
    for name in ("up", "down"):
      got = np.asarray(stacked_optq["blocks"][name]["kernel"][i])
      # OPTQ did not degenerate to round to nearest.
      rtn = np.asarray(stacked_rtn["blocks"][name]["kernel"][i])
      assert np.mean(got != rtn) > 0.05, f"{name}[{i}]"
      if i > 0:
        # A stack is quantized one path at a time (all of blocks/up, then all of blocks/down),
        # the loop one layer at a time, so from the second block on their inputs differ.
        continue
      want = np.asarray(loop_optq["blocks"]["0"][name]["kernel"])
      step = np.asarray(stacked_optq["blocks"][name]["kernel_scale"][i])
      # The first block sees the same inputs either way: the same weights, up to rounding ties
      # that float noise in H can flip (one grid step, in a few weights).
      assert np.mean(got != want) <= 0.03, name
      assert np.all(np.abs(got - want) <= 1.01 * step), name


def test_an_nnx_models_variables_round_trip_through_an_orbax_checkpoint(tmp_path):
  class DropoutMLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(8, 16, rngs=rngs)
      self.norm = nnx.BatchNorm(16, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(self.norm(jax.nn.relu(self.hidden(x)))))

  x = jax.random.normal(jax.random.key(4), (6, 8))
  qmodel = quantize(DropoutMLP(nnx.Rngs(0)), W4A8, x)
  module, variables = as_linen(qmodel)
  # Train mode: dropout draws from the model's own RNG stream, batch statistics update.
  _, updated = module.apply(variables, x, train=True, mutable=["batch_stats", "rng_count"])
  assert int(updated["rng_count"]["drop"]["rngs"]["count"]) == 1
  assert not np.allclose(updated["batch_stats"]["norm"]["mean"], 0.0)
  state = create_train_state({**variables, **updated}, optax.sgd(0.1))
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(1, state, wait=True)
  restored = checkpointer.restore_latest(state)
  _assert_trees_equal(jax.device_get(restored.variables), jax.device_get(state.variables))
  back = to_nnx(qmodel, jax.device_get(restored.variables))
  np.testing.assert_array_equal(back.norm.mean[...], updated["batch_stats"]["norm"]["mean"])
  assert int(back.drop.rngs.count[...]) == 1
  back.eval()
  np.testing.assert_allclose(back(x), module.apply(restored.variables, x, train=False), rtol=1e-6)


def test_attention_round_on_an_nnx_scan_stack_rounds_on_the_grid_and_beats_round_to_nearest():
  """Attention Round's block reconstruction (block inputs recorded and fed inside nnx.scan, its
  own weight rounding in every layer) through as_linen."""
  x = jax.random.normal(jax.random.key(5), (64, 8))
  stacked = ScannedStack(8, 3, nnx.Rngs(0))
  module, variables = as_linen(quantize(stacked, W4A8, x))
  calibrated = {"params": calibrate(module, variables, [x], 1)["params"]}
  layers = quantized_layers(module, calibrated, x)
  method = PTQ_METHODS.get("attention_round")
  settings = to_config(method.fields)
  settings.update(steps=60)
  capture = method.capture_for(module, calibrated, [x], settings)
  rounded = quantize_weights(method, calibrated["params"], layers, settings, capture)
  rtn = quantize_weights(PTQ_METHODS.get("rtn"), calibrated["params"], layers)
  up, scale = rounded["blocks"]["up"]["kernel"], rounded["blocks"]["up"]["kernel_scale"]
  grid = np.asarray(up) / np.asarray(scale)[:, None, :]
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
  assert np.mean(np.asarray(up) != np.asarray(rtn["blocks"]["up"]["kernel"])) > 0.01
  error = lambda p: float(jnp.mean((module.apply({"params": p}, x) - stacked(x)) ** 2))
  assert error(rounded) < error(rtn)


def test_block_replacement_trains_an_nnx_stack_guided_by_its_float_nnx_partner():
  """Boundaries at every unit of an nnx.scan stack: the partner (the float NNX model, through
  as_linen too) is fed the LP blocks' inputs inside the scan; the loss falls."""
  x = jax.random.normal(jax.random.key(6), (16, 8))
  labels = jnp.argmax(x[:, :3], -1)
  float_model = ScannedStack(8, 3, nnx.Rngs(0))
  partner, partner_variables = as_linen(float_model)
  module, variables = as_linen(quantize(float_model, W4A8, x))
  variables = {"params": calibrate(module, variables, [x], 1)["params"]}
  layers = quantized_layers(module, variables, x)
  settings = Replacement(find_boundaries(layers, "blocks"))
  assert len(settings.boundaries) == 3  # one per unit of the stack
  loss_fn = block_replacement_loss(partner, partner_variables, settings)
  mesh, tx = make_mesh(), optax.adam(1e-2)
  step = make_train_step(module, tx, mesh, loss_fn)
  state = replicate(create_train_state(variables, tx), mesh)
  batch = shard_batch({"inputs": x, "labels": labels}, mesh)
  losses = []
  for i in range(6):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
    assert np.isfinite(float(metrics["branch_loss"])) and float(metrics["branch_loss"]) > 0
  assert losses[-1] < losses[0], losses


def test_params_multiplied_directly_are_named_in_a_warning_whatever_their_name():
  """A matmul written on a param stays float (see efqat_jax.nn.direct_matmuls for why), and
  quantize (NNX) / calibrate (Linen) say so per param; layers, quantized or kept float by a
  rule, are not reported."""
  import flax.linen as nn

  class LinenMixer(nn.Module):
    @nn.compact
    def __call__(self, x):
      mixing = self.param("mixing", nn.initializers.lecun_normal(), (8, 8))
      h = nn.Dense(8, name="dense")(x @ mixing.T)
      scale = self.param("gains", nn.initializers.ones, (8,))  # not a matmul: not reported
      return nn.Dense(3, name="head")(
        jnp.einsum(
          "bd,de->be", h * scale, self.param("route", nn.initializers.lecun_normal(), (8, 8))
        )
      )

  class NnxMixer(nnx.Module):
    def __init__(self, rngs):
      self.mixing = nnx.Param(jax.random.normal(rngs.params(), (8, 8)))
      self.dense = nnx.Linear(8, 8, rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(self.dense(x @ self.mixing[...].T))

  x = jax.random.normal(jax.random.key(7), (4, 8))
  rules = [QuantRule.keep_float("head"), W4A8]

  def messages(fn):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      fn()
    return sorted(str(w.message) for w in caught if "feeds a" in str(w.message))

  linen = quantize(LinenMixer(), rules)
  found = messages(lambda: calibrate(linen, linen.init(jax.random.key(0), x), [x], 1))
  assert [m.split()[3] for m in found] == ["mixing", "route"], found
  assert "feeds a dot_general directly" in found[0] and "nn.Einsum / nnx.Einsum" in found[0]
  found = messages(lambda: quantize(NnxMixer(nnx.Rngs(0)), rules, x))
  assert [m.split()[3] for m in found] == ["mixing"], found
