"""Importance (mean |w|) and the CWPL / CWPN / LWPN selections."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import channel_importance, select, unit_weights
from efqat_jax.models import ResNet, SmallCNN, Transformer
from efqat_jax.nn import quantized_layers
from tests.built_model import BuiltModel

RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
CNN = BuiltModel(quantize(SmallCNN(features=(8, 16)), RULE), jnp.ones((2, 12, 12, 1)))
TFM = BuiltModel(
  quantize(Transformer(vocab_size=16, d_model=8, num_heads=2, mlp_dim=16, max_len=8), RULE),
  jnp.ones((2, 8), jnp.int32),
)


def _brute_force_channel_scores(params, layers):
  scores = {}
  for path, w in unit_weights(params, layers).items():
    out_axes = layers[path].out_axes
    w = np.moveaxis(np.asarray(w), out_axes, range(-len(out_axes), 0))
    w = w.reshape(-1, int(np.prod(w.shape[w.ndim - len(out_axes) :])))
    scores[path] = [float(np.mean(np.abs(w[:, c]))) for c in range(w.shape[1])]
  return scores


def test_channel_importance_is_mean_abs_weight_per_output_channel():
  w = jnp.arange(24.0).reshape(2, 3, 4) - 12.0
  np.testing.assert_allclose(channel_importance(w, (2,)), np.abs(np.asarray(w)).mean(axis=(0, 1)))
  np.testing.assert_allclose(
    channel_importance(w, (1, 2)), np.abs(np.asarray(w)).mean(axis=0).reshape(-1)
  )
  np.testing.assert_allclose(channel_importance(w, (0,)), np.abs(np.asarray(w)).mean(axis=(1, 2)))


def test_quantized_layers_are_found_with_their_output_channels():
  assert set(CNN.layers) == {"Conv_0", "Conv_1", "Dense_0"}
  tset = select(TFM.params, TFM.layers, "qat")
  query = "TransformerBlock_0/MultiHeadDotProductAttention_0/query"
  assert tset.size(query) == 8  # heads x head_dim
  assert tset.size("Embed_0") == 16  # an embedding table's channels are its rows


def test_modules_without_a_quantized_weight_go_with_the_layer_run_before_them():
  resnet = quantize(ResNet(num_classes=10, depth=8), RULE)
  x = jnp.ones((2, 8, 8, 1))
  variables = jax.eval_shape(lambda: resnet.init(jax.random.key(0), x, train=False))
  layers = quantized_layers(resnet, variables, x, train=False)
  assert layers["Conv_0"].attached == ("BatchNorm_0",)
  assert layers["BasicBlock_0/Conv_1"].attached == ("BasicBlock_0/BatchNorm_1",)
  assert layers["Dense_0"].attached == ()
  # Pre-LN Transformer with a quantized token embedding: the position embedding (the model's
  # own param) goes with the first layer; a block's norms with the block's layers (the first
  # before the attention, the second before the MLP); the final norm with the last layer.
  attention = "TransformerBlock_0/MultiHeadDotProductAttention_0"
  assert TFM.layers["Embed_0"].attached == ("",)
  assert TFM.layers[f"{attention}/query"].attached == ("TransformerBlock_0/LayerNorm_0",)
  assert TFM.layers[f"{attention}/out"].attached == ("TransformerBlock_0/LayerNorm_1",)
  last = [path for path in TFM.layers if path.startswith("TransformerBlock")][-1]
  assert TFM.layers[last].attached == ("LayerNorm_0",)
  attached = [m for layer in TFM.layers.values() for m in layer.attached]
  assert len(attached) == len(set(attached))
  with pytest.raises(ValueError, match="cheap_params"):
    select(CNN.params, CNN.layers, "cwpl", 0.1, cheap_params="some_layers")


@pytest.mark.parametrize("rho", [0.05, 0.25, 0.5, 1.0])
def test_cwpl_takes_the_top_ceil_rho_channels_of_every_layer(rho):
  tset = select(TFM.params, TFM.layers, "cwpl", rho)
  for path, scores in _brute_force_channel_scores(TFM.params, TFM.layers).items():
    k = math.ceil(rho * len(scores))
    assert tset.count(path) == k
    chosen = set(np.asarray(tset.channels[path]).tolist())
    assert chosen == set(np.argsort(scores)[::-1][:k].tolist())


@pytest.mark.parametrize("rho", [0.1, 0.3])
def test_cwpn_takes_the_global_top_channels(rho):
  tset = select(TFM.params, TFM.layers, "cwpn", rho)
  scores = _brute_force_channel_scores(TFM.params, TFM.layers)
  pooled = sorted(((s, p, c) for p, ss in scores.items() for c, s in enumerate(ss)), reverse=True)
  k = math.ceil(rho * len(pooled))
  expected = {(p, c) for _, p, c in pooled[:k]}
  got = {(p, int(c)) for p, cs in tset.channels.items() for c in np.asarray(cs)}
  assert got == expected
  assert len({tset.count(p) / tset.size(p) for p in scores}) > 1  # counts differ by layer


def test_cwpn_bucket_rounds_counts_up():
  tset = select(TFM.params, TFM.layers, "cwpn", 0.2, bucket=4)
  plain = select(TFM.params, TFM.layers, "cwpn", 0.2)
  for path, k in plain.counts:
    assert tset.count(path) == min(tset.size(path), -(-k // 4) * 4)


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("built, unit", [(TFM, "params"), (CNN, "work")], ids=["tfm", "cnn"])
def test_cwpn_buckets_are_paid_for_within_rho(built, unit, rho):
  """Counting weights or work, CWPN's counts are multiples of the bucket (or the layer's size)
  and cost no more than rho; no layer could take one more bucket within the budget."""
  per_channel = _channel_costs(built, unit)
  total = sum(per_channel[p] * n for p, n in select(built.params, built.layers, "qat").counts)
  tset = select(built.params, built.layers, "cwpn", rho, bucket=4, rho_unit=unit)
  spent = sum(per_channel[p] * k for p, k in tset.counts)
  assert spent <= rho * total * (1 + 1e-9)
  room = rho * total - spent
  for path, k in tset.counts:
    size = tset.size(path)
    assert k % 4 == 0 or k == size, (path, k)
    assert k == size or min(4, size - k) * per_channel[path] > room, path
  scores = _brute_force_channel_scores(built.params, built.layers)
  for path, channels in tset.channels.items():  # a layer's paid channels are its top ones
    top = np.argsort(-np.asarray(scores[path]), kind="stable")[: tset.count(path)]
    assert set(np.asarray(channels).tolist()) == set(top.tolist())
  fraction = "param_fraction" if unit == "params" else "work_fraction"
  assert tset.summary()[fraction] == pytest.approx(spent / total)


def test_lwpn_trains_the_top_layers_whole():
  tset = select(CNN.params, CNN.layers, "lwpn", 0.3)  # ceil(0.3 * 3 layers) = 1
  weights = unit_weights(CNN.params, CNN.layers)
  means = {p: float(np.abs(np.asarray(w)).mean()) for p, w in weights.items()}
  top = max(means, key=means.get)
  assert {p for p, k in tset.counts if k} == {top}
  assert tset.count(top) == tset.size(top)


def _fit_in_order(blocks, sizes, budget):
  """The blocks, in order, that still fit in ``budget`` (the first alone if none does)."""
  taken, room = [], budget * (1 + 1e-9)
  for block in blocks:
    if sizes[block] <= room:
      taken.append(block)
      room -= sizes[block]
  return taken or blocks[:1]


def _output_positions(built) -> dict[str, float]:
  """Per layer, its output elements per output channel in ``built``'s call, read from the
  module's own output (Flax's captured intermediates)."""
  _, state = built.model.apply(
    built.variables, built.x, capture_intermediates=True, mutable=["intermediates"]
  )
  positions = {}
  for path, layer in built.layers.items():
    node = state["intermediates"]
    for name in path.split("/"):
      node = node[name]
    positions[path] = node["__call__"][0].size / layer.num_channels
  return positions


def _channel_costs(built, unit: str) -> dict[str, float]:
  """Per layer, what one output channel weighs when rho counts ``unit``: its weights, each
  counted (work) at the output positions it is used at."""
  positions = _output_positions(built) if unit == "work" else dict.fromkeys(built.layers, 1.0)
  return {
    p: math.prod(layer.weight_shape) // layer.num_channels * positions[p]
    for p, layer in built.layers.items()
  }


@pytest.mark.parametrize("rho", [0.02, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("built, unit", [(TFM, "params"), (CNN, "work")], ids=["tfm", "cnn"])
def test_rho_in_params_or_work_takes_the_top_blocks_that_fit_in_rho_of_the_total(built, unit, rho):
  per_channel = _channel_costs(built, unit)
  fraction = f"{unit[:-1] if unit == 'params' else unit}_fraction"
  total = sum(per_channel[p] * n for p, n in select(built.params, built.layers, "qat").counts)
  scores = _brute_force_channel_scores(built.params, built.layers)
  # cwpn: channels of all layers ranked together, each weighing its fan-in (times its positions)
  pooled = sorted(((s, p, c) for p, ss in scores.items() for c, s in enumerate(ss)), reverse=True)
  want = _fit_in_order(
    [(p, c) for _, p, c in pooled], {(p, c): per_channel[p] for _, p, c in pooled}, rho * total
  )
  tset = select(built.params, built.layers, "cwpn", rho, rho_unit=unit)
  got = {(p, int(c)) for p, cs in tset.channels.items() for c in np.asarray(cs)}
  assert got == set(want)
  trained = tset.summary()[fraction]
  assert trained == pytest.approx(sum(per_channel[p] for p, _ in want) / total)
  assert trained <= rho + 1e-9 or len(want) == 1
  if rho < 1 and len(want) > 1:  # the budget was used up: no channel left out would have fit
    left = total * (rho - trained)
    assert all(per_channel[p] > left for _, p, c in pooled if (p, c) not in got)
  # lwpn: whole layers by mean score, each weighing all its channels
  ranked = sorted(scores, key=lambda p: -np.mean(scores[p]))
  want = _fit_in_order(ranked, {p: per_channel[p] * len(scores[p]) for p in ranked}, rho * total)
  tset = select(built.params, built.layers, "lwpn", rho, rho_unit=unit)
  assert {p for p, k in tset.counts if k} == set(want)
  assert all(tset.count(p) == tset.size(p) for p in want)
  # cwpl: a layer's channels weigh the same, so every unit gives one selection
  assert select(built.params, built.layers, "cwpl", rho, rho_unit=unit).counts == (
    select(built.params, built.layers, "cwpl", rho).counts
  )


def test_rho_in_work_weighs_a_weight_by_the_output_positions_it_is_used_at():
  """The CNN on a batch of two 12x12 images: a Conv_0 weight is used at 2 x 12 x 12 output
  pixels, a Conv_1 weight (stride 2) at 2 x 6 x 6, a Dense_0 weight (after global pooling) at
  2. So Conv_0's 72 weights are a fifth of the weight-gradient work (20,736 of 104,000
  multiply-adds) though only 5% of the weights; at rho = 0.2 of the work Conv_0 fits and
  Dense_0 (320) no longer does, where counted in weights both fit."""
  assert {p: layer.macs_per_weight for p, layer in CNN.layers.items()} == {
    "Conv_0": 288.0, "Conv_1": 72.0, "Dense_0": 2.0
  }  # fmt: skip
  assert _output_positions(CNN) == {"Conv_0": 288.0, "Conv_1": 72.0, "Dense_0": 2.0}
  work = select(CNN.params, CNN.layers, "lwpn", 0.2, rho_unit="work")
  assert [p for p, k in work.counts if k] == ["Conv_0"]
  assert work.summary()["work_fraction"] == 20736 / 104000
  params = select(CNN.params, CNN.layers, "lwpn", 0.2, rho_unit="params")
  assert [p for p, k in params.counts if k] == ["Conv_0", "Dense_0"]
  # traced on another batch, the same layers (equal, as jit's static arguments) cost more
  bigger = quantized_layers(CNN.model, CNN.variables, jnp.ones((6, 12, 12, 1)))
  assert bigger == CNN.layers and hash(bigger["Conv_0"]) == hash(CNN.layers["Conv_0"])
  assert bigger["Conv_0"].macs_per_weight == 3 * CNN.layers["Conv_0"].macs_per_weight
  stripped = {p: dataclasses.replace(layer, macs_per_weight=0.0) for p, layer in CNN.layers.items()}
  with pytest.raises(ValueError, match="macs_per_weight"):
    select(CNN.params, stripped, "lwpn", 0.2, rho_unit="work")


def test_rho_in_params_never_trains_more_than_rho_of_the_weights():
  """The CNN's layers rank Conv_0 (72 weights, the largest mean |w|), Dense_0 (160), Conv_1
  (1,152). LWPN's top third in blocks is Conv_0 alone, 5% of the weights. In params, a third is
  461 weights: Conv_0 and Dense_0 fit, Conv_1 does not and is passed over (taking the block that
  crosses the budget would train all of them). A budget below the smallest layer trains the top
  one alone."""
  sizes = {p: math.prod(layer.weight_shape) for p, layer in CNN.layers.items()}
  assert sizes == {"Conv_0": 72, "Conv_1": 1152, "Dense_0": 160}
  blocks = select(CNN.params, CNN.layers, "lwpn", 0.3)
  assert [p for p, k in blocks.counts if k] == ["Conv_0"]
  params = select(CNN.params, CNN.layers, "lwpn", 1 / 3, rho_unit="params")
  assert [p for p, k in params.counts if k] == ["Conv_0", "Dense_0"]
  assert params.summary()["param_fraction"] == 232 / 1384
  tiny = select(CNN.params, CNN.layers, "lwpn", 0.01, rho_unit="params")
  assert [p for p, k in tiny.counts if k] == ["Conv_0"]
  for mode in ("cwpn", "lwpn"):
    assert select(CNN.params, CNN.layers, mode, 0.0, rho_unit="params").counts == (
      select(CNN.params, CNN.layers, "ptq").counts
    )


def test_qat_and_ptq_are_the_two_ends():
  assert all(
    k == select(CNN.params, CNN.layers, "qat").size(p)
    for p, k in select(CNN.params, CNN.layers, "qat").counts
  )
  assert all(k == 0 for _, k in select(CNN.params, CNN.layers, "ptq").counts)
  assert all(k == 0 for _, k in select(CNN.params, CNN.layers, "cwpl", 0.0).counts)


def test_reselection_after_training_keeps_cwpl_counts_static():
  moved = jax.tree.map(lambda w: w * jax.random.uniform(jax.random.key(1), w.shape), CNN.params)
  a, b = select(CNN.params, CNN.layers, "cwpl", 0.25), select(moved, CNN.layers, "cwpl", 0.25)
  assert jax.tree.structure(a) == jax.tree.structure(b)  # same static counts: no recompile
  assert any(not np.array_equal(a.channels[p], b.channels[p]) for p in a.channels)


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(mode="random"), "mode"),
    (dict(mode="cwpl", rho=1.5), "rho"),
    (dict(mode="cwpn", rho=0.1, bucket=0), "bucket"),
    (dict(mode="lwpn", rho=0.1, rho_unit="layers"), "rho_unit"),
  ],
)
def test_bad_selection_arguments_raise(kwargs, field):
  with pytest.raises(ValueError, match=field):
    select(CNN.params, CNN.layers, **kwargs)


def test_a_model_without_quantized_layers_raises():
  with pytest.raises(ValueError, match="no quantized layer"):
    select({"Dense_0": {"kernel": jnp.ones((2, 2))}}, {}, "cwpl", 0.5)
