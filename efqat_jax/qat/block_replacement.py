"""Block-replacement QAT (BWRF, arXiv 2412.15846): the low-precision network trains guided by
its frozen full-precision partner, as a loss for the generic train step.

The model is cut at boundaries: module paths, in call order. Block 1 runs from the input to the
first boundary, block i + 1 from boundary i to the next, the last block to the output; a module
that an ``nn.scan`` stack runs is a boundary at each of its units. Besides the low-precision
(LP) logits ``z_Q`` and the partner's ``z_F``, each mixed-precision branch gives logits ``z_M``:

- ``prefix`` (the default reading): branch i runs the LP blocks 1..i, then the partner's
  blocks i+1..n. The partner is called with the LP input of boundary i fed in
  (``efqat_jax.nn.blocks.block_io``): what it would compute before the boundary is dead code,
  which jit removes (inside a stack, the units before the fed one still run).
- ``swap``: branch i runs the partner's blocks with block i alone low-precision, fed the
  partner's input of that block (branch 1 equals the prefix reading's first).

  loss = CE(z_Q) + beta KD(z_F || z_Q) + gamma * sum (or mean) over branches of
         [CE(z_M) + KD(z_F || z_M)],  KD = tau^2 KL(softmax(z_F / tau) || softmax(z / tau)).

The partner's variables are bound into the loss as a ``jax.tree_util.Partial``: inputs of the
compiled step (not constants in it), never differentiated, so the partner has no gradient, no
optimizer state and no weight-gradient op; its BatchNorm runs on its running statistics and its
dropout is off. Gradients reach the LP blocks through the partner's exact float blocks.
Inference uses the LP network alone.

Example:
  >>> layers = quantized_layers(qmodel, variables, images, train=False)
  >>> settings = Replacement(find_boundaries(layers, "BasicBlock_3,BasicBlock_6"))
  >>> loss_fn = block_replacement_loss(model, fp_variables, settings)
  >>> step = make_train_step(qmodel, tx, mesh, loss_fn)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from efqat_jax.nn.blocks import (
  AUTO,
  block_io,
  contains,
  module_paths,
  recorded_io,
  with_block_input,
)
from efqat_jax.nn.layer_table import QuantizedLayer
from efqat_jax.train.losses import Apply, accuracy, cross_entropy, masked_mean

READINGS = ("prefix", "swap")
REDUCTIONS = ("sum", "mean")
# ``forward(apply, batch, rng, train) -> logits``: how the loss calls a model on a batch.
Forward = Callable[[Apply, Mapping[str, Any], Any, bool], jax.Array]


def model_logits(apply: Apply, batch: Mapping[str, Any], rng: Any, train: bool) -> jax.Array:
  """``apply(batch["inputs"], train=train)`` with dropout rng ``rng`` (the library's models)."""
  return apply(batch["inputs"], train=train, rngs={"dropout": rng} if rng is not None else None)


@dataclasses.dataclass(frozen=True)
class Boundary:
  """Where a block starts: the call of the module at ``path`` (of unit ``unit`` of its stack).

  Attributes:
    path: the module path.
    unit: the unit's index inside the stack the module runs in (``()`` outside a stack).
    stack_shape: that stack's shape (``()`` outside a stack).
  """

  path: str
  unit: tuple[int, ...] = ()
  stack_shape: tuple[int, ...] = ()

  @property
  def name(self) -> str:
    return f"{self.path}[{','.join(map(str, self.unit))}]" if self.unit else self.path

  def units(self) -> jax.Array | None:
    """The bool mask over the stack that is True at this unit (None outside a stack)."""
    if not self.stack_shape:
      return None
    return jnp.zeros(self.stack_shape, bool).at[self.unit].set(True)


@dataclasses.dataclass(frozen=True)
class Replacement:
  """The settings of block replacement.

  Attributes:
    boundaries: where blocks 2..n start, in call order (``find_boundaries``).
    reading: ``"prefix"`` (LP blocks 1..i, then the partner's) or ``"swap"`` (only block i LP).
    distill_weight: beta, the weight of KD(z_F || z_Q).
    branch_weight: gamma, the weight of the branches' CE + KD.
    temperature: tau of every distillation term.
    branch_reduction: ``"sum"`` (the paper's formula) or ``"mean"`` over the branches.
  """

  boundaries: tuple[Boundary, ...]
  reading: str = "prefix"
  distill_weight: float = 1.0
  branch_weight: float = 1.0
  temperature: float = 1.0
  branch_reduction: str = "sum"

  def __post_init__(self):
    if not self.boundaries:
      raise ValueError("block replacement needs at least one boundary (two blocks)")
    if self.reading not in READINGS:
      raise ValueError(f"reading = {self.reading!r} is not allowed: one of {list(READINGS)}")
    if self.branch_reduction not in REDUCTIONS:
      raise ValueError(
        f"branch_reduction = {self.branch_reduction!r} is not allowed: one of {list(REDUCTIONS)}"
      )

  @property
  def branches(self) -> int:
    return len(self.boundaries) + (self.reading == "swap")


def find_boundaries(
  layers: Mapping[str, QuantizedLayer], names: str, field: str = "boundaries"
) -> tuple[Boundary, ...]:
  """The boundaries that ``names`` gives a model whose quantized layers are ``layers`` (in call
  order, ``quantized_layers``).

  Args:
    layers: the quantized layers by path, in call order.
    names: comma-separated module paths holding quantized layers, in call order, each the start
      of a block (a module in a stack: each of its units); or ``"auto"``: every top-level module
      but the first.
    field: the name to give in errors (a config field).

  Raises:
    ValueError: one line naming ``field``: a path that is no module holding a quantized layer,
      paths out of call order or repeated, a boundary at the model's first layer (an empty
      first block), a module spanning layers of different stacks, or no boundary at all.
  """
  paths = list(layers)
  modules = module_paths(paths)
  first_layer = {m: next(i for i, p in enumerate(paths) if contains(m, p)) for m in modules}
  if names == AUTO:
    chosen = [m for m in modules if "/" not in m][1:]
  else:
    chosen = [n.strip() for n in str(names).split(",") if n.strip()]
  if not chosen:
    raise ValueError(
      f"{field} = {names!r} names no boundary: the model needs two blocks or more; its modules"
      f" holding quantized layers are {modules}"
    )
  for name in chosen:
    if name not in first_layer:
      raise ValueError(
        f"{field} = {names!r}: {name!r} is no module holding a quantized layer; those modules"
        f" are {modules}"
      )
  for before, after in itertools.pairwise(chosen):
    if first_layer[after] <= first_layer[before]:
      raise ValueError(
        f"{field} = {names!r}: {after!r} does not come after {before!r} in call order; list the"
        " boundaries in the order the model calls them, each once"
      )
  boundaries = [b for name in chosen for b in _units(name, layers, names, field)]
  if first_layer[chosen[0]] == 0 and not any(boundaries[0].unit):
    raise ValueError(
      f"{field} = {names!r}: {boundaries[0].name!r} starts at the model's first layer, so block 1"
      " would be empty; start at a later module"
    )
  return tuple(boundaries)


def _units(name: str, layers, names: str, field: str) -> list[Boundary]:
  shapes = {layer.stack_shape for path, layer in layers.items() if contains(name, path)}
  if len(shapes) > 1:
    raise ValueError(
      f"{field} = {names!r}: {name!r} holds layers of different stacks {sorted(shapes)}; name a"
      " module inside one stack, or the stack itself"
    )
  (shape,) = shapes
  units = itertools.product(*map(range, shape)) if shape else [()]
  return [Boundary(name, unit, shape) for unit in units]


def distillation(
  teacher: jax.Array, student: jax.Array, temperature: float, mask: jax.Array | None = None
) -> jax.Array:
  """``tau^2 KL(softmax(teacher / tau) || softmax(student / tau))``, the masked mean over
  examples (and tokens)."""
  t = jax.nn.log_softmax(teacher / temperature)
  s = jax.nn.log_softmax(student / temperature)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature**2 * masked_mean(kl, mask)


def _recording(apply: Apply, mutable: Any, edit_params: Callable | None) -> tuple[Apply, dict]:
  """``apply`` with ``mutable`` (params among them) and ``edit_params``, returning the model's
  output alone; the params the call returned (with what ``block_io`` recorded) land in the dict."""
  params: dict = {}

  def recording_apply(*args, **kwargs):
    out, collections = apply(*args, mutable=mutable, edit_params=edit_params, **kwargs)
    params.update(collections["params"])
    return out

  return recording_apply, params


@contextlib.contextmanager
def _block_io(record: Sequence[str] = (), feed: Sequence[str] = ()):
  with contextlib.ExitStack() as stack:
    for path in dict.fromkeys((*record, *feed)):
      stack.enter_context(block_io(path, record=path in record, feed=path in feed))
    yield


def _fed_at(boundary: Boundary, leaves: Sequence[jax.Array]) -> Callable[[Any], Any]:
  return lambda params: with_block_input(params, boundary.path, leaves, boundary.units())


def block_inputs(
  apply: Apply,
  forward: Forward,
  batch: Mapping[str, Any],
  rng: Any,
  train: bool,
  paths: Sequence[str],
  feed: tuple[Boundary, Sequence[jax.Array]] | None = None,
  mutable: Any = ("params",),
) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
  """The logits of ``forward`` through ``apply``, and the input leaves of each block in
  ``paths`` (stacked over a stack's units).

  Args:
    apply: ``apply(*args, mutable=, edit_params=, **kwargs)`` (the train step's, or
      ``partner_apply``'s).
    forward: how the model is called on a batch.
    batch, rng, train: passed to ``forward``.
    paths: the blocks whose inputs to record.
    feed: optional ``(boundary, leaves)``: the model runs with ``leaves`` as that boundary's input.
    mutable: the collections this call returns to the caller (params among them; True: all, so
      the step keeps none of its updates).
  """
  edit = None if feed is None else _fed_at(*feed)
  recording, params = _recording(apply, mutable, edit)
  with _block_io(record=paths, feed=() if feed is None else (feed[0].path,)):
    logits = forward(recording, batch, rng, train)
  return logits, {path: recorded_io(params, path)[0] for path in paths}


def partner_apply(partner: nn.Module, variables: Mapping[str, Any]) -> Apply:
  """``apply(*args, mutable=None, edit_params=None, **kwargs)`` of the frozen partner, as the
  train step's ``apply`` takes them."""

  def apply(*args, mutable=None, edit_params=None, **kwargs):
    params = variables["params"]
    v = {**variables, "params": params if edit_params is None else edit_params(params)}
    if mutable is None:
      return partner.apply(v, *args, **kwargs)
    return partner.apply(v, *args, mutable=mutable, **kwargs)

  return apply


def _fed_partner(partner: Apply, forward: Forward, batch, boundary: Boundary, leaves) -> jax.Array:
  with _block_io(feed=(boundary.path,)):
    fed = lambda *a, **k: partner(*a, edit_params=_fed_at(boundary, leaves), **k)
    return forward(fed, batch, None, False)


def all_logits(
  settings: Replacement,
  apply: Apply,
  partner: Apply,
  batch: Mapping[str, Any],
  rng: Any,
  train: bool,
  forward: Forward = model_logits,
) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
  """``(z_Q, z_F, [z_M per branch])``: the LP network's logits through ``apply`` (the train
  step's), the partner's through ``partner`` (``partner_apply``) and each branch's."""
  paths = list(dict.fromkeys(b.path for b in settings.boundaries))
  lp, lp_inputs = block_inputs(apply, forward, batch, rng, train, paths)
  first = settings.boundaries[0]
  branches = [_fed_partner(partner, forward, batch, first, lp_inputs[first.path])]
  if settings.reading == "prefix":
    teacher = forward(partner, batch, None, False)
    for b in settings.boundaries[1:]:
      branches.append(_fed_partner(partner, forward, batch, b, lp_inputs[b.path]))
  else:
    teacher, fp_inputs = block_inputs(partner, forward, batch, None, False, paths)
    ends = [*settings.boundaries[1:], None]
    for start, end in zip(settings.boundaries, ends, strict=True):
      # Block ``start..end`` low-precision on the partner's input; its batch statistics are
      # not kept (``mutable=True``): only the LP network's own forward updates them.
      z, inputs = block_inputs(
        apply,
        forward,
        batch,
        rng,
        train,
        [end.path] if end else [],
        feed=(start, fp_inputs[start.path]),
        mutable=True,
      )
      branches.append(
        z if end is None else _fed_partner(partner, forward, batch, end, inputs[end.path])
      )
  return lp, jax.lax.stop_gradient(teacher), branches


def _loss(partner_variables, apply, batch, rng, train, *, partner, settings, forward):
  lp, teacher, branches = all_logits(
    settings, apply, partner_apply(partner, partner_variables), batch, rng, train, forward
  )
  labels, mask, tau = batch["labels"], batch.get("mask"), settings.temperature
  task = cross_entropy(lp, labels, mask)
  distill = distillation(teacher, lp, tau, mask)
  terms = [cross_entropy(z, labels, mask) + distillation(teacher, z, tau, mask) for z in branches]
  branch = sum(terms) / (len(terms) if settings.branch_reduction == "mean" else 1)
  loss = task + settings.distill_weight * distill + settings.branch_weight * branch
  metrics = {"task_loss": task, "distill_loss": distill, "branch_loss": branch}
  return loss, {"accuracy": accuracy(lp, labels, mask), **metrics}


def block_replacement_loss(
  partner: nn.Module,
  partner_variables: Mapping[str, Any],
  settings: Replacement,
  forward: Forward = model_logits,
) -> Partial:
  """The block-replacement loss for ``make_train_step(lp_model, tx, mesh, loss_fn)``.

  Args:
    partner: the full-precision model (the one the LP model was quantized from).
    partner_variables: its trained variables (frozen; inputs of the compiled step).
    settings: boundaries, reading, loss weights and temperature.
    forward: how both models are called on a batch (default: ``model(inputs, train=...)``);
      the batch also holds integer ``labels`` and an optional bool ``mask``.

  Returns:
    ``loss_fn(apply, batch, rng, train) -> (loss, {accuracy, task_loss, distill_loss,
    branch_loss})`` (accuracy of the LP network).
  """
  bound = functools.partial(_loss, partner=partner, settings=settings, forward=forward)
  return Partial(bound, dict(partner_variables))
