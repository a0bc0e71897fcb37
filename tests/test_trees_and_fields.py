"""The small shared pieces: tree merging, field declarations and the component registry."""

import ml_collections
import pytest

from efqat_jax import fields
from efqat_jax.errors import ConfigError
from efqat_jax.registry import Registry
from efqat_jax.trees import all_finite, merge_trees


def test_merge_trees_writes_new_leaves_over_old_and_keeps_the_rest():
  old = {"params": {"a": 1, "b": {"x": 2}}, "batch_stats": {}}
  new = {"params": {"b": {"y": 3}}, "quant_stats": {"c": 4}}
  assert merge_trees(old, new) == {
    "params": {"a": 1, "b": {"x": 2, "y": 3}},
    "batch_stats": {},
    "quant_stats": {"c": 4},
  }
  assert merge_trees({"p": {"a": {"x": 1}}}, {"p": {"a": {}}}) == {"p": {"a": {"x": 1}}}
  assert merge_trees({"p": {"a": {}}}, {"p": {"a": {"x": 1}}}) == {"p": {"a": {"x": 1}}}
  assert old == {"params": {"a": 1, "b": {"x": 2}}, "batch_stats": {}}  # inputs untouched


def test_all_finite_looks_at_float_leaves_only():
  assert all_finite({"a": [1.0, 2.0], "i": 3})
  assert not all_finite({"a": [1.0, float("nan")]})
  assert not all_finite({"b": {"c": float("inf")}})


SCHEMA = {
  "steps": fields.Field(10, "training steps", fields.integer(0)),
  "opt": {
    "name": fields.Field("adamw", "optimizer", fields.one_of("adamw", "sgd")),
    "lr": fields.Field(0.1, "learning rate", fields.number(0, lo_open=True)),
  },
  "kwargs": fields.Field({}, "free keywords", fields.mapping(), free=True),
}


def test_a_config_built_from_a_schema_holds_the_defaults_and_validates():
  config = fields.to_config(SCHEMA)
  assert config.steps == 10 and config.opt.lr == 0.1
  config.kwargs.anything = (1, 2)  # a free mapping takes any key
  fields.validate(config, SCHEMA)


@pytest.mark.parametrize(
  "dotted, value, message",
  [
    ("steps", -1, "config.steps = -1 is not allowed: an integer >= 0"),
    ("steps", 2.0, "config.steps = 2.0 is not allowed: an integer >= 0"),
    ("steps", True, "config.steps = True is not allowed: an integer >= 0"),
    ("opt.name", "adam", "config.opt.name = 'adam' is not allowed: one of ['adamw', 'sgd']"),
    ("opt.lr", 0.0, "config.opt.lr = 0.0 is not allowed: a finite number > 0"),
    ("opt.lr", float("inf"), "config.opt.lr = inf is not allowed: a finite number > 0"),
  ],
)
def test_a_bad_value_names_the_field_and_what_is_allowed(dotted, value, message):
  config = ml_collections.ConfigDict(fields.to_config(SCHEMA).to_dict(), type_safe=False)
  section, _, name = dotted.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError) as error:
    fields.validate(config, SCHEMA)
  assert str(error.value) == message


def test_an_unknown_field_names_the_nearest_ones():
  config = fields.to_config(SCHEMA)
  with config.opt.unlocked():
    config.opt.rl = 0.3
  with pytest.raises(
    ConfigError, match=r"config\.opt\.rl is not a config field \(did you mean 'opt\.lr'\?\)"
  ):
    fields.validate(config, SCHEMA)
  with config.unlocked():
    config.zzz = 1
  error = fields.unknown_field_error("zzz", SCHEMA)
  assert "fields here: steps, kwargs" in str(error)


def test_the_listing_shows_each_field_once_with_value_and_meaning():
  config = fields.to_config(SCHEMA)
  config.opt.lr = 0.5
  lines = fields.describe(SCHEMA, config).splitlines()
  assert [line.split()[0] for line in lines] == ["steps", "opt.name", "opt.lr", "kwargs"]
  assert "0.5" in lines[2] and "learning rate" in lines[2]


def test_a_registry_names_its_field_and_the_registered_names_for_an_unknown_one():
  methods = Registry("ptq.method")
  methods.register("rtn", object())
  with pytest.raises(ValueError, match="registered twice"):
    methods.register("rtn", object())
  with pytest.raises(
    ConfigError,
    match=r"config\.ptq\.method = 'rnt' is not allowed: one of \['rtn'\] \(did you mean 'rtn'\?\)",
  ):
    methods.get("rnt")
  assert list(methods) == ["rtn"] and "rtn" in methods
