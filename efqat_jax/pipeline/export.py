"""Stage ``export``: integer weights, scales, zero points and bit widths of the final quantized
model (``export/layers.npz``, written atomically), checked against the fake-quantized model and,
for a model with accumulator constraints (AXE), proven overflow-free before anything is written.

The file records, per layer, what the proof assumed (accumulator bits, tile, accumulation order,
integer input range: ``efqat_jax.quant.integer_layer_arrays``), and is re-checked from its bytes
alone by ``efqat_jax.quant.check_export_accumulators`` before it is written."""

from __future__ import annotations

import io
import time

import jax
import jax.numpy as jnp

from efqat_jax.errors import DataError, NonFiniteError
from efqat_jax.fields import Field, one_of
from efqat_jax.nn import export_integer, integer_apply
from efqat_jax.nn.formats import accumulator_of
from efqat_jax.pipeline.accumulators import accumulator_report, overflowing
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.outputs import npz_bytes, sha256, write_atomic
from efqat_jax.pipeline.stage import STAGES, ModelState, Stage
from efqat_jax.quant import check_export_accumulators, integer_layer_arrays
from efqat_jax.trees import all_finite

SOURCES = ("ptq", "qat", "efqat")


def source(config, finished: set[str]) -> str:
  """The stage whose model is exported: ``export.source``, or for ``"auto"`` the last
  quantized stage in ``config.stages`` (else the last finished one, else ``ptq``)."""
  if config.export.source != "auto":
    return config.export.source
  listed = [s.strip() for s in config.stages.split(",")]
  for candidates in (listed, finished):
    chosen = [s for s in SOURCES if s in candidates]
    if chosen:
      return chosen[-1]
  return "ptq"


def layers_path(run: Run):
  return run.workdir / "export" / "layers.npz"


def check_finished_export(run: Run) -> None:
  """A finished export's file is there and is the one recorded."""
  if "export" not in run.results:
    return
  path = layers_path(run)
  expected = run.results["export"].get("sha256")
  if not path.exists() or sha256(path.read_bytes()) != expected:
    raise DataError(
      f"{path} is missing or differs from the export recorded in {run.results_path};"
      " delete the 'export' entry of that file to export again"
    )


def run_export(run: Run, inputs: dict[str, ModelState]) -> None:
  (model_state,) = inputs.values()
  start = time.perf_counter()
  qmodel, variables, sample = (
    run.quantized_model(model_state.formats),
    model_state.variables,
    run.sample_inputs,
  )
  if not all_finite(variables["params"]):
    raise NonFiniteError("export: the model to export has non-finite params")
  layers = export_integer(qmodel, variables, sample, train=False)
  widths = accumulator_report(layers, model_state.formats)
  broken = overflowing(widths)
  if broken:
    raise RuntimeError(
      f"export: {', '.join(broken)} can overflow the accumulator its PTQ result promised"
      " (a bug: please report it)"
    )
  data = npz_bytes(export_arrays(layers, model_state.formats))
  promised = {u for u, r in widths["accumulator_layers"].items() if "fits" in r}
  rechecked = check_export_accumulators(io.BytesIO(data))
  failed = sorted(promised ^ {u for u, check in rechecked.items() if check.fits})
  if failed:
    raise RuntimeError(
      f"export: the file's record of {', '.join(failed)} does not re-check as promised"
      " (a bug: please report it)"
    )
  fake = jax.jit(lambda v, x: qmodel.apply(v, x, train=False))(variables, sample)
  integer, accumulators = jax.jit(lambda v, x: integer_apply(qmodel, v, x, train=False))(
    variables, sample
  )
  write_atomic(layers_path(run), data)
  run.record(
    "export",
    {
      "source": next(iter(inputs)),
      "layers": len(layers),
      "prediction_agreement": float(jnp.mean(jnp.argmax(fake, -1) == jnp.argmax(integer, -1))),
      "max_abs_logit_diff": float(jnp.max(jnp.abs(fake - integer))),
      "max_accumulator": int(max(int(a) for a in jax.tree.leaves(accumulators))),
      **widths,
      "sha256": sha256(data),
      "wall_time_s": time.perf_counter() - start,
    },
  )


def export_arrays(layers, formats) -> dict:
  """``{"<unit>/<field>": array}`` of every exported unit, with the accumulator its PTQ result
  promised (``formats``), for ``layers.npz``."""
  return {
    f"{unit}/{field}": value
    for unit, layer in layers.items()
    for field, value in integer_layer_arrays(
      layer, accumulator_of(formats, unit.partition("[")[0]) if layer.accumulates else None
    ).items()
  }


EXPORT = STAGES.register(
  "export",
  Stage(
    run=run_export,
    needs=lambda config, finished: (source(config, finished),),
    fields=lambda config: ("export",),
    summary="integer weights, scales and bit widths of the last quantized model",
    check=check_finished_export,
    blocks=lambda: {
      "export": {
        "source": Field(
          "auto",
          "model to export: auto (last quantized stage run), ptq, qat or efqat",
          one_of("auto", *SOURCES),
        )
      }
    },
  ),
)
