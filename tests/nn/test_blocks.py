"""Blocks found by module path, and a block's input and output recorded and fed in from
outside, through nn.scan and nn.remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.nn.blocks import block_io, find_blocks, recorded_io, with_block_input

LAYERS = ["stem", "Res_0/Dense_0", "Res_0/Dense_1", "Res_1/Dense_0", "Res_1/inner/Dense_0", "head"]


class Body(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(4)(nn.relu(nn.Dense(4)(x))), None


class Stacked(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="stem")(x)
    stack = nn.scan(
      nn.remat(Body), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


def paths(blocks):
  return [(b.path, b.layers) for b in blocks]


def test_auto_blocks_are_the_top_level_modules_and_layers_are_blocks_of_their_own():
  assert paths(find_blocks(LAYERS, "auto")) == [
    ("stem", ("stem",)),
    ("Res_0", ("Res_0/Dense_0", "Res_0/Dense_1")),
    ("Res_1", ("Res_1/Dense_0", "Res_1/inner/Dense_0")),
    ("head", ("head",)),
  ]
  assert [b.path for b in find_blocks(LAYERS, "layers")] == LAYERS
  # A regex names some blocks; the layers outside them are blocks alone, in call order.
  assert paths(find_blocks(LAYERS, r"Res_1/inner")) == [
    ("stem", ("stem",)),
    ("Res_0/Dense_0", ("Res_0/Dense_0",)),
    ("Res_0/Dense_1", ("Res_0/Dense_1",)),
    ("Res_1/Dense_0", ("Res_1/Dense_0",)),
    ("Res_1/inner", ("Res_1/inner/Dense_0",)),
    ("head", ("head",)),
  ]
  # An NNX list of modules (paths "blocks/0/...") is a container: its items are the blocks.
  nnx_layers = ["patches", "blocks/0/attn/query", "blocks/0/up", "blocks/1/up", "head"]
  assert [b.path for b in find_blocks(nnx_layers, "auto")] == [
    "patches", "blocks/0", "blocks/1", "head",
  ]  # fmt: skip


@pytest.mark.parametrize(
  "pattern, message",
  [
    ("Block_\\d+", r"^cfg\.blocks = 'Block_\\\\d\+' matches no module holding a quantized layer; those modules are \['stem', 'Res_0', "),
    ("Res_1|Res_1/inner", r"^cfg\.blocks = 'Res_1\|Res_1/inner' matches 'Res_1/inner' inside 'Res_1': blocks nest$"),
    ("Res_(", r"^cfg\.blocks = 'Res_\(' is not a valid regex"),
  ],
)  # fmt: skip
def test_bad_block_patterns_are_one_line_errors_naming_the_field(pattern, message):
  with pytest.raises(ValueError, match=message) as error:
    find_blocks(LAYERS, pattern, field="cfg.blocks")
  assert "\n" not in str(error.value)


def test_a_scanned_block_is_recorded_per_unit_and_fed_inputs_from_outside():
  model = Stacked()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  variables = model.init(jax.random.key(1), x)
  shapes = []
  with block_io("blocks", record=True, traced_shapes=shapes):
    y, state = model.apply(variables, x, mutable=["params"])
  inputs, outputs = recorded_io(state["params"], "blocks")
  assert [a.shape for a in inputs] == [(3, 5, 4)]  # one input per unit of the stack
  assert [a.shape for a in outputs] == [(3, 5, 4)]  # the carry; the None output has no leaf
  assert shapes[-1] == ([(5, 4)], [(5, 4)])  # one unit's shapes
  np.testing.assert_allclose(outputs[0][-1] @ variables["params"]["head"]["kernel"]
                             + variables["params"]["head"]["bias"], y, rtol=1e-5, atol=1e-6)  # fmt: skip
  # Fed its own recorded inputs, every unit gives its recorded output again.
  fed = with_block_input(variables["params"], "blocks", inputs)
  with block_io("blocks", record=True, feed=True):
    _, state = model.apply({"params": fed}, x, mutable=["params"])
  np.testing.assert_allclose(recorded_io(state["params"], "blocks")[1][0], outputs[0], rtol=1e-6)
  # Fed zeros, every unit computes its body on zeros: its own bias path only.
  zeros = with_block_input(variables["params"], "blocks", [jnp.zeros((3, 5, 4))])
  with block_io("blocks", record=True, feed=True):
    _, state = model.apply({"params": zeros}, x, mutable=["params"])
  body = variables["params"]["blocks"]
  expected = jax.vmap(lambda p: Body().apply({"params": p}, jnp.zeros((5, 4)), None)[0])(body)
  np.testing.assert_allclose(recorded_io(state["params"], "blocks")[1][0], expected, atol=1e-6)


def test_recording_needs_mutable_params():
  model = Stacked()
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.key(1), x)
  with pytest.raises(ValueError, match="block_io needs apply"), block_io("stem", record=True):
    model.apply(variables, x)
