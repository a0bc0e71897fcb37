"""Block-replacement QAT: boundaries by module path, branches that become the full-precision
model when nothing is low-precision, and a partner with no gradient, optimizer state or
weight-gradient op in the compiled step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import freeze_unselected, restrict_backward, select, set_trainable
from efqat_jax.models import SmallCNN
from efqat_jax.nn import quantized_layers
from efqat_jax.qat.block_replacement import (
  Boundary,
  Replacement,
  all_logits,
  block_replacement_loss,
  distillation,
  find_boundaries,
  partner_apply,
)
from efqat_jax.train import create_train_state, make_mesh, make_train_step, replicate, shard_batch
from tests.built_model import BuiltModel

RULE = QuantRule(".*", weight=QuantSpec.for_weights(2), input=QuantSpec.for_activations(2))


class Body(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(6)(nn.relu(nn.Dense(6)(x))), None


class Stacked(nn.Module):
  """A stem, three scanned and rematerialised residual units, and a head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(6, name="stem")(x)
    stack = nn.scan(
      nn.remat(Body), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    x, _ = stack(name="units")(x, None)
    return nn.Dense(5, name="head")(x)


def _layers(model, x):
  qmodel = quantize(model, RULE)
  variables = jax.jit(qmodel.init)(jax.random.key(0), x)
  return qmodel, variables, quantized_layers(qmodel, variables, x)


STACKED_X = jax.random.normal(jax.random.key(1), (4, 6))
CNN_X = jax.random.uniform(jax.random.key(2), (8, 12, 12, 1))


def test_boundaries_by_module_path_expand_a_stack_into_its_units():
  _, _, layers = _layers(Stacked(), STACKED_X)
  assert find_boundaries(layers, "units,head") == (
    Boundary("units", (0,), (3,)),
    Boundary("units", (1,), (3,)),
    Boundary("units", (2,), (3,)),
    Boundary("head"),
  )
  assert find_boundaries(layers, "auto") == find_boundaries(layers, "units, head")
  np.testing.assert_array_equal(Boundary("units", (1,), (3,)).units(), [False, True, False])


@pytest.mark.parametrize(
  "names, message",
  [
    ("units,Block_9", r"^br\.boundaries = 'units,Block_9': 'Block_9' is no module holding a quantized layer; those modules are \['stem', 'units', 'units/Dense_1', 'units/Dense_0', 'head'\]$"),
    ("head,units", r"^br\.boundaries = 'head,units': 'units' does not come after 'head' in call order; "),
    ("units,units/Dense_1", r"^br\.boundaries = 'units,units/Dense_1': 'units/Dense_1' does not come after 'units' "),
    ("stem,head", r"^br\.boundaries = 'stem,head': 'stem' starts at the model's first layer, so block 1 would be empty"),
    (" , ", r"^br\.boundaries = ' , ' names no boundary: the model needs two blocks or more"),
  ],
)  # fmt: skip
def test_bad_boundaries_are_one_line_errors_naming_the_field(names, message):
  _, _, layers = _layers(Stacked(), STACKED_X)
  with pytest.raises(ValueError, match=message) as error:
    find_boundaries(layers, names, field="br.boundaries")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("reading", ["prefix", "swap"])
@pytest.mark.parametrize(
  "model, x, names",
  [(Stacked(), STACKED_X, "units,head"), (SmallCNN(features=(4, 8)), CNN_X, "Conv_1,Dense_0")],
  ids=["scan_remat", "cnn"],
)
def test_branches_equal_the_full_precision_model_when_no_block_is_low_precision(
  model, x, names, reading
):
  _, _, layers = _layers(model, x)
  variables = jax.jit(model.init)(jax.random.key(3), x)
  settings = Replacement(find_boundaries(layers, names), reading=reading)
  fp = partner_apply(model, variables)
  batch = {"inputs": x}
  lp, teacher, branches = all_logits(settings, fp, fp, batch, None, False)
  assert len(branches) == settings.branches
  for z in [lp, *branches]:
    np.testing.assert_allclose(z, teacher, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reading, branches", [("prefix", 4), ("swap", 5)])
def test_branch_logits_have_the_shapes_of_the_low_precision_logits_and_differ_from_them(
  reading, branches
):
  qmodel, qvariables, layers = _layers(Stacked(), STACKED_X)
  model = Stacked()
  variables = jax.jit(model.init)(jax.random.key(0), STACKED_X)
  settings = Replacement(find_boundaries(layers, "units,head"), reading=reading)
  lp_apply = partner_apply(qmodel, qvariables)
  lp, teacher, out = all_logits(
    settings, lp_apply, partner_apply(model, variables), {"inputs": STACKED_X}, None, False
  )
  assert len(out) == branches
  assert all(z.shape == lp.shape == (4, 5) for z in out)
  # 2-bit prefixes: each branch is between the LP network and the partner, equal to neither.
  for z in out:
    assert not np.allclose(z, lp, atol=1e-4) and not np.allclose(z, teacher, atol=1e-4)


def test_distillation_is_zero_for_equal_logits_and_scales_with_the_temperature_squared():
  t = jax.random.normal(jax.random.key(0), (3, 7))
  s = jax.random.normal(jax.random.key(1), (3, 7))
  assert float(distillation(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
  p, log_q = jax.nn.softmax(t), jax.nn.log_softmax(s)
  kl = jnp.mean(jnp.sum(p * (jnp.log(p) - log_q), -1))
  assert float(distillation(t, s, 1.0)) == pytest.approx(float(kl), rel=1e-5)
  masked = distillation(t, s, 1.0, jnp.array([True, False, False]))
  assert float(masked) == pytest.approx(float(distillation(t[:1], s[:1], 1.0)), rel=1e-5)
  # Per token (a language model's [batch, time, vocab]) with a mask of examples.
  per_token = distillation(jnp.stack([t, s]), jnp.stack([s, s]), 1.0, jnp.array([True, False]))
  assert float(per_token) == pytest.approx(float(kl), rel=1e-5)


# SmallCNN: Conv_0..2, Dense_0; boundaries at Conv_1 and Conv_2 (prefix: two branches).
CNN = SmallCNN(features=(8, 16, 16))
QCNN = quantize(CNN, RULE)
BUILT_QCNN = BuiltModel(QCNN, CNN_X)
CNN_Y = jnp.arange(8) % 10


@pytest.fixture(scope="module")
def cnn_setup():
  mesh, tx = make_mesh(), freeze_unselected(optax.adam(1e-2))
  fp_variables = jax.jit(CNN.init)(jax.random.key(0), CNN_X)
  qvariables = BUILT_QCNN.variables
  settings = Replacement(find_boundaries(BUILT_QCNN.layers, "Conv_1,Conv_2"))
  loss_fn = block_replacement_loss(CNN, fp_variables, settings)
  step = make_train_step(QCNN, tx, mesh, loss_fn, param_context=restrict_backward)
  state = replicate(create_train_state(qvariables, tx), mesh)
  batch = shard_batch({"inputs": CNN_X, "labels": CNN_Y}, mesh)
  return fp_variables, tx, step, state, batch


def _op_counts(step, state, batch, trainable):
  hlo = step.lower(state, batch, jax.random.key(0), trainable).compile().as_text()
  return len(re.findall(r" convolution\(", hlo)), len(re.findall(r" dot\(", hlo))


# LP forward 3 conv + 1 dot and its input gradients 3 + 1 (test_backward.py); the partner's
# logits 3 + 1 (no backward); branch at Conv_1: forward 2 + 1 and input gradients 2 + 1; branch
# at Conv_2: 1 + 1 and 1 + 1. Weight gradients: the LP layers that train, none of the partner's.
@pytest.mark.parametrize(
  "mode, convolutions, dots",
  [("qat", 3 + 3 + 3 + 4 + 2 + 3, 1 + 1 + 1 + 2 + 2 + 1), ("ptq", 3 + 3 + 3 + 4 + 2, 1 + 1 + 1 + 2 + 2)],
)  # fmt: skip
def test_the_partner_has_no_weight_gradient_op_and_efqat_frozen_layers_none_either(
  cnn_setup, mode, convolutions, dots
):
  _, _, step, state, batch = cnn_setup
  trainable = select(state.params, BUILT_QCNN.layers, mode, 1.0 if mode == "qat" else 0.0)
  assert _op_counts(step, state, batch, trainable) == (convolutions, dots)


def test_the_partner_is_an_input_of_the_step_with_no_gradient_and_no_optimizer_state(cnn_setup):
  fp_variables, tx, step, state, batch = cnn_setup
  lowered = step.lower(state, batch, jax.random.key(0), None)
  partner_leaves = jax.tree.leaves(fp_variables)
  assert len(jax.tree.leaves(lowered.args_info)) >= len(partner_leaves) + len(
    jax.tree.leaves(state)
  )
  assert 'dense<"0x' not in lowered.as_text()  # no weights baked in as constants
  before = jax.tree.map(np.asarray, fp_variables)
  trainable = select(state.params, BUILT_QCNN.layers, "cwpl", 0.5)
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
  frozen_before = np.asarray(state.params["Conv_1"]["kernel"])
  losses = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(i), trainable)
    losses.append(float(metrics["loss"]))
  assert set(metrics) == {"loss", "accuracy", "task_loss", "distill_loss", "branch_loss"}
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, fp_variables, before)  # the partner never moves
  # Its optimizer state is the LP params' alone.
  lp_structure = jax.tree.structure(tx.init(state.params))
  assert jax.tree.structure(state.opt_state) == lp_structure
  # EfQAT's frozen channels stay frozen with block replacement on.
  frozen = ~np.asarray(trainable.channel_mask("Conv_1"))
  assert frozen.any()
  np.testing.assert_array_equal(
    np.asarray(state.params["Conv_1"]["kernel"])[..., frozen], frozen_before[..., frozen]
  )
