"""Quantize, calibrate, QAT, EfQAT and export Flax models written the way other codebases write
them: nn.scan over nn.remat (the big_vision / MaxText layout), a loop of nn.remat blocks,
nn.Einsum attention, tied embeddings, BatchNorm with dropout, a ``deterministic`` flag and two
inputs; and Flax NNX models (a ViT, a CNN with BatchNorm and dropout, a Transformer whose blocks
are built with nnx.vmap and run by nnx.scan over nnx.remat, with tied embeddings), quantized with
``quantize(model, rules, *inputs)`` and run through the same library via ``as_linen``. None of
these models knows about quantization; each brings its own call signature, which its own loss
function speaks."""

import dataclasses
import functools
import math
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from efqat_jax import QuantRule, QuantSpec, export_integer, integer_apply, quantize
from efqat_jax.efqat import freeze_unselected, restrict_backward, select, set_trainable
from efqat_jax.efqat.masking import trainable_masks
from efqat_jax.fields import to_config
from efqat_jax.nn import as_linen, quantized_layers
from efqat_jax.ptq import PTQ_METHODS, calibrate, quantize_weights
from efqat_jax.quant.accumulator import AccumulatorSpec
from efqat_jax.quant.overflow import check_accumulator
from efqat_jax.train import (
  create_train_state,
  cross_entropy,
  make_mesh,
  make_optimizer,
  make_train_step,
  replicate,
  shard_batch,
)

W8A8 = QuantRule(".*", weight=QuantSpec.for_weights(8), input=QuantSpec.for_activations(8))
KEY = jax.random.key(0)


class MLPBlock(nn.Module):
  """Pre-norm residual MLP block written as a scan body: ``(carry, x) -> (carry, y)``."""

  @nn.compact
  def __call__(self, h, _):
    y = nn.Dense(24)(nn.LayerNorm()(h))
    return h + nn.Dense(16)(nn.gelu(y)), None


class ScanOverRemat(nn.Module):
  """Three blocks stacked by nn.scan over nn.remat: params carry a leading layer axis."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16, name="embed")(x)
    blocks = nn.scan(
      nn.remat(MLPBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    h, _ = blocks(name="blocks")(h, None)
    return nn.Dense(5, name="head")(h)


class RematLoop(nn.Module):
  """A Python loop of nn.remat blocks, each with its own params."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16)(x)
    for i in range(3):
      h, _ = nn.remat(MLPBlock)(name=f"layer_{i}")(h, None)
    return nn.Dense(5)(h)


class EinsumAttention(nn.Module):
  """Self-attention whose projections are nn.Einsum layers (heads as a kernel axis)."""

  @nn.compact
  def __call__(self, x, train=False):
    q, k, v = (nn.Einsum((12, 2, 6), "btd,dhk->bthk", name=n)(x) for n in "qkv")
    weights = jax.nn.softmax(jnp.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(6.0), axis=-1)
    o = jnp.einsum("bhqt,bthk->bqhk", weights, v)
    o = nn.Einsum((2, 6, 12), "bqhk,hkd->bqd", name="out")(o)
    return nn.Dense(5)(nn.relu(o).mean(axis=1))


class TiedLM(nn.Module):
  """A token embedding whose table is also the output projection (``Embed.attend``)."""

  @nn.compact
  def __call__(self, tokens, train=False):
    embed = nn.Embed(24, 16)
    h = embed(tokens)
    h = h + nn.Dense(16)(nn.relu(nn.Dense(32)(h)))
    return embed.attend(nn.LayerNorm()(h))


class BatchNormDropoutCNN(nn.Module):
  """BatchNorm and Dropout, a depthwise and a grouped convolution."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8)(x))
    x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=2)(x))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


class DeterministicFlag(nn.Module):
  """The ``deterministic`` convention of many Flax codebases instead of ``train``."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    h = nn.Dropout(0.1, deterministic=deterministic)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(5)(h)


class VmapEnsemble(nn.Module):
  """Four Dense heads made by nn.vmap over params (an ensemble), averaged."""

  @nn.compact
  def __call__(self, x, train=False):
    heads = nn.vmap(
      nn.Dense,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=None,
      out_axes=0,
      axis_size=4,
    )
    return heads(5, name="heads")(nn.relu(nn.Dense(16)(x))).mean(axis=0)


class TwoTower(nn.Module):
  """Two inputs, one tower each, joined before the head."""

  @nn.compact
  def __call__(self, a, b):
    ha, hb = nn.relu(nn.Dense(16)(a)), nn.relu(nn.Dense(16)(b))
    return nn.Dense(5)(jnp.concatenate([ha, hb], -1))


class NnxBatchNormDropoutCNN(nnx.Module):
  """BatchNorm and Dropout switched by ``model.train()`` / ``model.eval()`` (no train flag)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
    self.head = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(jax.nn.relu(self.norm(self.conv1(x))))
    return self.head(jax.nn.relu(self.conv2(x)).mean(axis=(1, 2)))


class NnxBlock(nnx.Module):
  def __init__(self, d: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, h, mask):
    h = h + self.attention(self.norm(h), mask=mask)
    return h + self.down(jax.nn.gelu(self.up(h)))


class NnxViT(nnx.Module):
  """A small ViT in NNX: patches by a strided Conv, a learned position embedding, then
  attention (nnx.MultiHeadAttention: LinearGeneral projections) and MLP blocks in an nnx.List."""

  def __init__(self, rngs: nnx.Rngs, d: int = 16):
    self.patches = nnx.Conv(3, d, (4, 4), strides=(4, 4), rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (4, d)))
    self.blocks = nnx.List([NnxBlock(d, rngs) for _ in range(2)])
    self.head = nnx.Linear(d, 5, rngs=rngs)

  def __call__(self, images):
    h = self.patches(images)
    h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.position[...]
    for block in self.blocks:
      h = block(h, None)
    return self.head(h.mean(axis=1))


class NnxScannedLM(nnx.Module):
  """A causal LM: blocks built with nnx.vmap, run by nnx.scan over nnx.remat; the token
  embedding is also the output projection (``attend``)."""

  def __init__(self, rngs: nnx.Rngs, d: int = 16, depth: int = 3):
    self.embed = nnx.Embed(24, d, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(d, rngs)

    self.blocks = make(rngs)

  def __call__(self, tokens):
    mask = nnx.make_causal_mask(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
    @nnx.remat
    def body(h, block, mask):
      return block(h, mask)

    return self.embed.attend(body(self.embed(tokens), self.blocks, mask))


def _classify(inputs: Callable, kwargs_for: Callable = lambda train: {}):
  """A loss function for a classifier called as ``apply(*inputs(batch), **kwargs_for(train))``."""

  def loss_fn(apply, batch, rng, train):
    kwargs = kwargs_for(train)
    logits = apply(*inputs(batch), **kwargs, rngs={"dropout": rng} if train else None)
    return cross_entropy(logits, batch["labels"]), {}

  return loss_fn


def _next_token(apply, batch, rng, train):
  logits = apply(batch["tokens"][:, :-1])
  return cross_entropy(logits, batch["tokens"][:, 1:]), {}


@dataclasses.dataclass(frozen=True)
class Case:
  model: nn.Module
  batch: dict
  inputs: Callable  # batch -> positional model inputs
  eval_kwargs: dict
  loss_fn: Callable


def _features(shape, classes=5):
  x = jax.random.normal(jax.random.key(1), shape)
  return {"x": x, "labels": jnp.argmax(x.reshape(shape[0], -1)[:, :classes], -1)}


# Each case is built on first use: building models and batches compiles, and a test process
# builds only the cases of the tests it runs (not every case while collecting).
CASES: dict[str, Callable[[], Case]] = {
  "scan_over_remat": lambda: Case(
    ScanOverRemat(), _features((8, 10)), lambda b: (b["x"],), {}, None
  ),
  "remat_loop": lambda: Case(RematLoop(), _features((8, 10)), lambda b: (b["x"],), {}, None),
  "vmap_ensemble": lambda: Case(VmapEnsemble(), _features((8, 10)), lambda b: (b["x"],), {}, None),
  "einsum": lambda: Case(EinsumAttention(), _features((8, 6, 12)), lambda b: (b["x"],), {}, None),
  "tied_embeddings": lambda: Case(
    TiedLM(),
    {"tokens": jax.random.randint(jax.random.key(2), (8, 9), 0, 24)},
    lambda b: (b["tokens"][:, :-1],),
    {},
    _next_token,
  ),
  "batchnorm_dropout": lambda: Case(
    BatchNormDropoutCNN(), _features((8, 8, 8, 3)), lambda b: (b["x"],), {"train": False}, None
  ),
  "deterministic_flag": lambda: Case(
    DeterministicFlag(), _features((8, 10)), lambda b: (b["x"],), {"deterministic": True}, None
  ),
  "two_inputs": lambda: Case(
    TwoTower(),
    {**_features((8, 10)), "b": jax.random.normal(jax.random.key(3), (8, 7))},
    lambda b: (b["x"], b["b"]),
    {},
    None,
  ),
  "nnx_vit": lambda: Case(
    NnxViT(nnx.Rngs(0)), _features((8, 8, 8, 3)), lambda b: (b["x"],), {}, None
  ),
  "nnx_batchnorm_dropout": lambda: Case(
    NnxBatchNormDropoutCNN(nnx.Rngs(0)),
    _features((8, 8, 8, 3)),
    lambda b: (b["x"],),
    {"train": False},  # as_linen turns it into model.eval() / model.train()
    None,
  ),
  "nnx_scan_remat_tied": lambda: Case(
    NnxScannedLM(nnx.Rngs(0)),
    {"tokens": jax.random.randint(jax.random.key(2), (8, 9), 0, 24)},
    lambda b: (b["tokens"][:, :-1],),
    {},
    _next_token,
  ),
}
NNX_CASES = [name for name in CASES if name.startswith("nnx_")]


@functools.cache
def built(name: str) -> Case:
  """The case ``name`` (one instance per process, shared by the tests that use it)."""
  case = CASES[name]()
  assert isinstance(case.model, nnx.Module) == (name in NNX_CASES), name
  return case


def _loss_fn(case: Case):
  if case.loss_fn is not None:
    return case.loss_fn
  if "deterministic" in case.eval_kwargs:
    return _classify(case.inputs, lambda train: {"deterministic": not train})
  if "train" in case.eval_kwargs:
    return _classify(case.inputs, lambda train: {"train": train})
  return _classify(case.inputs)


def _dot_and_conv_shapes(hlo: str) -> list[tuple[int, ...]]:
  """Sorted output dims of every dot and convolution of a compiled step."""
  found = re.findall(r"= f32\[([0-9,]*)\][^=\n]* (?:convolution|dot)\(", hlo)
  return [tuple(sorted(int(d) for d in dims.split(",") if d)) for dims in found]


def _count(shapes, layer, k):
  """How many dots/convolutions could be ``layer``'s weight gradient over k output channels:
  output size (input axes x k; times the stack for one batched nn.vmap op) with an axis of k.
  XLA may permute or merge the contracted axes, so shapes are compared by size."""
  rest = math.prod(n for a, n in enumerate(layer.weight_shape) if a not in layer.out_axes)
  sizes = {rest * k, rest * k * math.prod(layer.stack_shape)}
  return sum(math.prod(shape) in sizes and k in shape for shape in shapes)


def _trained_units(params, layers, trainable):
  """Per unit, (frozen entries equal?, trainable entries, whole-weight mask) helpers."""
  masks = trainable_masks(params, trainable)
  for layer in layers.values():
    node = tuple(layer.path.split("/"))
    yield layer, flatten_dict(masks)[(*node, layer.weight_name)]


LWPN_CASES = (
  "scan_over_remat",
  "tied_embeddings",
  "nnx_scan_remat_tied",
)  # whole layers frozen; cwpl: every case
SIGNATURE_ONLY_CASES = ("deterministic_flag", "two_inputs")


@pytest.mark.parametrize("name", CASES)
def test_quantize_calibrate_qat_efqat_and_export(name):
  case = built(name)
  inputs = case.inputs(case.batch)
  if isinstance(case.model, nnx.Module):
    # NNX: quantized with the inputs of one call, then the same library through as_linen.
    qmodel, initial = as_linen(quantize(case.model, W8A8, *inputs))
  else:
    qmodel = quantize(case.model, W8A8)
    # One compiled init (eager init compiles each of its operations on its own).
    initial = jax.jit(functools.partial(qmodel.init, **case.eval_kwargs))(KEY, *inputs)
  calibrated = calibrate(qmodel, initial, [inputs, inputs], 2, **case.eval_kwargs)
  variables = {k: v for k, v in calibrated.items() if k != "quant_stats"}
  assert not jax.tree.all(jax.tree.map(np.array_equal, calibrated["params"], initial["params"]))
  layers = quantized_layers(qmodel, variables, *inputs, **case.eval_kwargs)
  assert all(layer.macs_per_weight > 0 for layer in layers.values())  # what rho_unit=work weighs
  mesh = make_mesh()
  batch = shard_batch(case.batch, mesh)
  loss_fn = _loss_fn(case)

  # QAT: every param trains; the loss falls.
  tx, _ = make_optimizer("adamw", learning_rate=1e-2, steps=8, quant_lr_multiplier=0.1)
  state = replicate(create_train_state(variables, tx), mesh)
  qat_step = make_train_step(qmodel, tx, mesh, loss_fn)
  losses = []
  for i in range(8):
    state, metrics = qat_step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  assert all(np.isfinite(losses))

  # EfQAT: frozen entries stay bit-identical, selected ones move, and the compiled step's
  # weight-gradient ops are narrowed (cwpl) or gone (lwpn). (Cases that differ from a plain
  # model only by their call signature skip this: the step is the same code.)
  modes = (("cwpl", 0.25), ("lwpn", 0.3)) if name in LWPN_CASES else (("cwpl", 0.25),)
  modes = () if name in SIGNATURE_ONLY_CASES else modes
  # The QAT step just run computes every weight gradient whole: it is the reference the
  # restricted steps' weight-gradient ops are counted against (its program comes from the
  # compilation cache).
  rng = jax.random.key(0)
  full_hlo = qat_step.lower(state, batch, rng).compile().as_text() if modes else ""
  full_shapes = _dot_and_conv_shapes(full_hlo)
  tx = freeze_unselected(optax.sgd(0.1))
  step = make_train_step(qmodel, tx, mesh, loss_fn, param_context=restrict_backward)
  fresh = replicate(create_train_state(variables, tx), mesh)
  for mode, rho in modes:
    # cwpl ranks by BatchNorm-folded magnitude (mean |w| where no norm follows), lwpn by
    # fan-in scaled magnitude with rho counting weight-gradient work: every importance and the
    # work each layout records meet the other codebases' layouts.
    importance, unit = ("bn_folded", "blocks") if mode == "cwpl" else ("fan_in", "work")
    stats = variables.get("batch_stats", {})
    trainable = select(
      variables["params"], layers, mode, rho, importance=importance, batch_stats=stats,
      rho_unit=unit,
    )  # fmt: skip
    if unit == "work":  # within rho, unless the top layer alone exceeds it
      assert (
        trainable.summary()["work_fraction"] <= rho or sum(k > 0 for _, k in trainable.counts) == 1
      )
    state = fresh.replace(opt_state=set_trainable(fresh.opt_state, fresh.params, trainable))
    compiled = step.lower(state, batch, rng, trainable).compile()
    shapes = _dot_and_conv_shapes(compiled.as_text())
    before = jax.device_get(state.params)
    after, _ = compiled(jax.tree.map(jnp.copy, state), batch, rng, trainable, step.loss_fn)
    after = jax.device_get(after.params)
    for layer, mask in _trained_units(before, layers, trainable):
      node = tuple(layer.path.split("/"))
      w0 = np.asarray(flatten_dict(before)[(*node, layer.weight_name)])
      w1 = np.asarray(flatten_dict(after)[(*node, layer.weight_name)])
      mask = np.asarray(mask)
      np.testing.assert_array_equal(w1[~mask], w0[~mask], err_msg=f"{mode} {layer.path}")
      counts = [trainable.count(u) for u in layer.units()]
      if max(counts):
        assert np.any(w1[mask] != w0[mask]), f"{mode} {layer.path} did not train"
      op = dict(layer.op)
      if op["op"] == "take" or op.get("feature_group_count", 1) > 1:
        continue  # a lookup's dW is a scatter; grouped convs: tests/efqat/test_backward.py
      c, k = layer.num_channels, max(counts)
      if k < c:  # the full weight gradient is gone, replaced by a k-channel one (if k > 0)
        assert _count(shapes, layer, c) < _count(full_shapes, layer, c), f"{mode} {layer.path}"
        assert k == 0 or _count(shapes, layer, k) > 0, f"{mode} {layer.path} not narrowed"

  # Export: every unit (each layer of a stack too) as integers; the integer path agrees.
  exported = export_integer(qmodel, variables, *inputs, **case.eval_kwargs)
  assert set(exported) == {unit for layer in layers.values() for unit in layer.units()}
  assert all(isinstance(e.weight, np.ndarray) for e in exported.values())
  out_int, accumulators = integer_apply(qmodel, variables, *inputs, **case.eval_kwargs)
  out = qmodel.apply(variables, *inputs, **case.eval_kwargs)
  scale = float(jnp.max(jnp.abs(out))) + 1e-6
  np.testing.assert_allclose(np.asarray(out_int) / scale, np.asarray(out) / scale, atol=2e-3)
  assert accumulators and all(int(a["max_abs"]) > 0 for a in accumulators.values())


@pytest.mark.parametrize("name", NNX_CASES)
def test_nnx_models_take_every_ptq_method(name):
  """Every registered PTQ method on every NNX model (through as_linen): weights on their grid,
  AXE's accumulators within their bound (the overflow proof), and each layer-wise method off
  round to nearest."""
  case = built(name)
  inputs = case.inputs(case.batch)
  qmodel, initial = as_linen(quantize(case.model, W8A8, *inputs))
  calibrated = calibrate(qmodel, initial, [inputs], 1, **case.eval_kwargs)
  variables = {k: v for k, v in calibrated.items() if k != "quant_stats"}
  layers = quantized_layers(qmodel, variables, *inputs, **case.eval_kwargs)
  results = {}
  for method_name in PTQ_METHODS.names():
    method = PTQ_METHODS.get(method_name)
    settings = to_config(method.fields) if method.fields else None
    if method_name == "attention_round":
      settings.update(steps=5)
    if method_name.startswith("axe"):
      settings.update(accumulator_bits=20)
    capture = method.capture_for(qmodel, variables, [inputs], settings, **case.eval_kwargs)
    params = quantize_weights(method, variables["params"], layers, settings, capture)
    results[method_name] = params
    for layer in layers.values():
      node = tuple(layer.path.split("/"))
      weight = np.asarray(flatten_dict(params)[(*node, layer.weight_name)])
      assert np.all(np.isfinite(weight)), f"{method_name} {layer.path}"
    exported = export_integer(qmodel, {**variables, "params": params}, *inputs, **case.eval_kwargs)
    if method_name.startswith("axe"):
      for unit, layer in exported.items():
        if layer.input_spec is not None:
          assert check_accumulator(layer, AccumulatorSpec(20)).fits, f"{method_name} {unit}"
  rtn = flatten_dict(results["rtn"])
  for method_name in ("optq", "gpfq", "axe_optq", "axe_gpfq"):
    moved = [
      np.any(np.asarray(flatten_dict(results[method_name])[key]) != np.asarray(rtn[key]))
      for key in (
        (*layer.path.split("/"), layer.weight_name)
        for layer in layers.values()
        if dict(layer.op)["op"] != "take"
      )
    ]
    assert any(moved), f"{method_name} gave round to nearest's weights"
