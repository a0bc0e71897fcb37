"""The optimizer builder: quantization params at a fraction of the learning rate, no decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax.train import make_optimizer, param_labels, quant_aware

PARAMS = {
  "Conv_0": {
    "kernel": jnp.full((3, 3, 1, 2), 2.0),
    "bias": jnp.full((2,), 1.0),
    "kernel_scale": jnp.full((2,), 0.5),
    "input_scale": jnp.array(0.25),
    "input_zero_point": jnp.array(1.0),
  }
}
QUANT = ("kernel_scale", "input_scale", "input_zero_point")


def _update(tx, grads, params=PARAMS):
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates["Conv_0"]


def test_labels_send_quantization_params_to_the_quant_optimizer():
  labels = param_labels(PARAMS)["Conv_0"]
  assert {k for k, v in labels.items() if v == "quant"} == set(QUANT)
  tx = quant_aware(optax.sgd(1.0), optax.sgd(0.5))
  updates = _update(tx, jax.tree.map(jnp.ones_like, PARAMS))
  for name, value in updates.items():
    np.testing.assert_allclose(value, -0.5 if name in QUANT else -1.0)


def test_sgd_step_moves_quant_params_at_lr_times_multiplier_without_decay():
  lr, mult, decay = 0.1, 0.01, 0.2
  tx, schedule = make_optimizer(
    "sgd", learning_rate=lr, steps=10, weight_decay=decay, quant_lr_multiplier=mult
  )
  assert schedule(0) == pytest.approx(lr)  # no warm-up: the first step is at the peak
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), PARAMS)
  updates = _update(tx, grads)
  for name, value in updates.items():
    param = PARAMS["Conv_0"][name]
    expected = -lr * mult * 3.0 if name in QUANT else -lr * (3.0 + decay * param)
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)


def test_adamw_decays_weights_but_not_quant_params():
  tx, _ = make_optimizer("adamw", learning_rate=0.1, steps=10, weight_decay=0.5)
  updates = _update(tx, jax.tree.map(jnp.zeros_like, PARAMS))  # zero grads: decay alone
  for name, value in updates.items():
    expected = 0.0 if name in QUANT else -0.1 * 0.5 * PARAMS["Conv_0"][name]
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)


def test_schedule_warms_up_linearly_then_decays_to_zero():
  _, schedule = make_optimizer(learning_rate=1.0, steps=10, warmup_steps=4)
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 4)], [0.0, 0.5, 1.0], atol=1e-6)
  assert 0 < schedule(7) < 1 and schedule(10) == pytest.approx(0.0, abs=1e-6)
  _, short = make_optimizer(learning_rate=1.0, steps=1, warmup_steps=5)  # warm-up capped
  assert short(0) == pytest.approx(1.0)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(name="lamb"), "name"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=float("inf")), "learning_rate"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(warmup_steps=-2), "warmup_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(quant_lr_multiplier=float("nan")), "quant_lr_multiplier"),
  ],
)
def test_bad_arguments_are_rejected_naming_the_argument(kwargs, name):
  args = {"learning_rate": 0.1, "steps": 10, **kwargs}
  with pytest.raises(ValueError, match=rf"^make_optimizer: {name} = .* is not allowed: ") as e:
    make_optimizer(**args)
  assert "\n" not in str(e.value)
