"""The scheduler table: the single source of truth for the `scheduler` parameter.

Each public name maps to a diffusers scheduler class and the options that make it a flow-matching
sampler for FLUX. The validation error, the OpenAPI schema (`/docs`) and the README's table are all
derived from `SCHEDULERS`. The page's ten names come first, in the page's order.

Solvers written for diffusion (DPM-Solver, UniPC, DEIS) run on FLUX's schedule through their flow
options: `use_flow_sigmas`, `prediction_type="flow_prediction"`, and the model's own shift settings
(`use_dynamic_shifting`, `flow_shift`), read from its scheduler config by `build_scheduler`.
Karras/exponential/beta variants of those solvers respace the flow sigmas (see `samplers.py`); their
own sigma options would replace the flow schedule and give NaN.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # Draws fresh noise at every step (from the job's generator, so still reproducible).
    stochastic: bool = False
    # "", "karras", "exponential" or "beta": respace the flow sigmas (solvers other than FlowMatchEuler).
    sigma_spacing: str = ""
    # DEIS ends at its last sigma instead of 0; its last step then returns the clean sample.
    final_step_to_zero: bool = False

    @property
    def uses_flow_options(self) -> bool:
        return self.class_name in _DIFFUSION_SOLVERS

    def configuration(self) -> str:
        """`Class(option=value, …)`: the diffusers class and the options this name sets."""
        options = {**(_FLOW_OPTIONS_SHOWN if self.uses_flow_options else {}), **self.options}
        return f"{self.class_name}({', '.join(f'{key}={value!r}' for key, value in options.items())})"

    def adaptations(self) -> list[str]:
        """What fluxserve adds on top of the diffusers class (see samplers.py)."""
        notes = [f"{self.sigma_spacing} spacing of the flow sigmas"] if self.sigma_spacing else []
        if self.class_name == _HEUN:
            notes.append("set_timesteps takes FLUX's sigmas and shift")
        if self.stochastic:
            notes.append("stochastic, noise drawn from the job's seed")
        if self.final_step_to_zero:
            notes.append("last step lands on sigma 0")
        return notes


_EULER = "FlowMatchEulerDiscreteScheduler"
_HEUN = "FlowMatchHeunDiscreteScheduler"
_LCM = "FlowMatchLCMScheduler"
_DPM_MULTI = "DPMSolverMultistepScheduler"
_DPM_SINGLE = "DPMSolverSinglestepScheduler"
_UNIPC = "UniPCMultistepScheduler"
_DEIS = "DEISMultistepScheduler"
_DIFFUSION_SOLVERS = (_DPM_MULTI, _DPM_SINGLE, _UNIPC, _DEIS)
_FLOW_OPTIONS_SHOWN = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

_ODE = {"algorithm_type": "dpmsolver++"}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# Singlestep DPM-Solver needs a lower-order last step to end at sigma 0.
_SINGLESTEP = {"solver_order": 2, "lower_order_final": True}


def _dpm(name: str, order: int, algorithm: dict, description: str, spacing: str = "", **options) -> SchedulerSpec:
    return SchedulerSpec(
        name,
        _DPM_MULTI,
        {**algorithm, "solver_order": order, **options},
        description,
        stochastic=algorithm is _SDE,
        sigma_spacing=spacing,
    )


_TABLE = [
    # -- the page's ten ------------------------------------------------------------------------
    # `Euler` and `FlowMatchEulerDiscreteScheduler` are the same sampler: the page names both.
    SchedulerSpec("Euler", _EULER, {}, "FLUX's reference flow-matching Euler (what diffusers uses for FLUX)"),
    SchedulerSpec(_EULER, _EULER, {}, "the same sampler as Euler (the page lists both names)"),
    SchedulerSpec("DPM++", _DPM_SINGLE, {**_ODE, **_SINGLESTEP},
                  "DPM-Solver++ singlestep, 2nd order (DPM++ 2S)"),
    SchedulerSpec("DPM++ SDE", _DPM_SINGLE, {**_SDE, **_SINGLESTEP},
                  "stochastic DPM-Solver++ singlestep, 2nd order", stochastic=True),
    _dpm("DPM++ 2M", 2, _ODE, "DPM-Solver++ multistep, 2nd order"),
    _dpm("DPM++ 2M SDE", 2, _SDE, "stochastic DPM-Solver++ multistep, 2nd order (midpoint)"),
    _dpm("DPM++ 3M", 3, _ODE, "DPM-Solver++ multistep, 3rd order"),
    SchedulerSpec("Euler Beta", _EULER, {"use_beta_sigmas": True}, "Euler on beta-distributed sigmas"),
    SchedulerSpec("Euler Exponential", _EULER, {"use_exponential_sigmas": True}, "Euler on log-linear sigmas"),
    SchedulerSpec("Euler Karras", _EULER, {"use_karras_sigmas": True}, "Euler on Karras (rho=7) sigmas"),
    # -- fifteen more --------------------------------------------------------------------------
    SchedulerSpec("Heun", _HEUN, {}, "Heun's 2nd-order method: two model calls a step (2N-1 in all)"),
    SchedulerSpec("LCM", _LCM, {}, "latent-consistency sampling: predict the clean sample, re-noise it",
                  stochastic=True),
    SchedulerSpec("DPM++ SDE Karras", _DPM_SINGLE, {**_SDE, **_SINGLESTEP},
                  "DPM++ SDE on Karras-spaced sigmas", stochastic=True, sigma_spacing="karras"),
    _dpm("DPM++ 2M Karras", 2, _ODE, "DPM++ 2M on Karras-spaced sigmas", "karras"),
    _dpm("DPM++ 2M Exponential", 2, _ODE, "DPM++ 2M on log-linear sigmas", "exponential"),
    _dpm("DPM++ 2M Beta", 2, _ODE, "DPM++ 2M on beta-distributed sigmas", "beta"),
    _dpm("DPM++ 2M SDE Karras", 2, _SDE, "DPM++ 2M SDE on Karras-spaced sigmas", "karras"),
    _dpm("DPM++ 2M SDE Exponential", 2, _SDE, "DPM++ 2M SDE on log-linear sigmas", "exponential"),
    _dpm("DPM++ 2M SDE Heun", 2, _SDE, "DPM++ 2M SDE with the Heun 2nd-order update", solver_type="heun"),
    _dpm("DPM++ 3M SDE", 3, _SDE, "stochastic DPM-Solver++ multistep, 3rd order"),
    _dpm("DPM++ 3M SDE Karras", 3, _SDE, "DPM++ 3M SDE on Karras-spaced sigmas", "karras"),
    _dpm("DPM++ 3M SDE Exponential", 3, _SDE, "DPM++ 3M SDE on log-linear sigmas", "exponential"),
    SchedulerSpec("UniPC", _UNIPC, {"solver_order": 2, "solver_type": "bh2"}, "UniPC predictor-corrector, 2nd order"),
    SchedulerSpec("UniPC Karras", _UNIPC, {"solver_order": 2, "solver_type": "bh2"},
                  "UniPC on Karras-spaced sigmas", sigma_spacing="karras"),
    SchedulerSpec("DEIS", _DEIS, {"solver_order": 2}, "DEIS multistep exponential integrator, 2nd order",
                  final_step_to_zero=True),
]

SCHEDULERS: dict[str, SchedulerSpec] = {spec.name: spec for spec in _TABLE}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)

# Keys of the model's scheduler config that FluxPipeline reads to compute the resolution shift `mu`.
_SHIFT_KEYS = ("use_dynamic_shifting", "base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")


def build_scheduler(name: str, base_config: dict[str, Any], generator=None):
    """A fresh scheduler instance for one job (schedulers keep per-run state, so never share one).

    `base_config` is the model's own scheduler config (FLUX.1-dev: FlowMatchEuler with dynamic
    shifting); `generator` is the job's, used by stochastic samplers for their per-step noise.
    """
    from fluxserve.engine.samplers import sampler_class

    spec = SCHEDULERS[name]
    cls = sampler_class(
        spec.class_name,
        stochastic=spec.stochastic,
        sigma_spacing=spec.sigma_spacing,
        final_step_to_zero=spec.final_step_to_zero,
    )
    options = dict(spec.options)
    if spec.uses_flow_options:
        options = {
            **_FLOW_OPTIONS_SHOWN,
            "use_dynamic_shifting": bool(base_config.get("use_dynamic_shifting", False)),
            "flow_shift": float(base_config.get("shift", 1.0)),
            **options,
        }
    accepted = inspect.signature(cls.__init__).parameters
    scheduler = cls.from_config({key: value for key, value in base_config.items() if key in accepted}, **options)
    # Classes that do not know the model's shift settings still carry them, for FluxPipeline's `mu`.
    missing = {key: base_config[key] for key in _SHIFT_KEYS if key in base_config and key not in scheduler.config}
    if missing:
        scheduler.register_to_config(**missing)
    if spec.stochastic:
        scheduler.generator = generator
    return scheduler


def scheduler_docs() -> str:
    """The `scheduler` field's description in the OpenAPI schema (`/docs`)."""
    lines = [f"- `{spec.name}`: {spec.description} — `{spec.configuration()}`" for spec in _TABLE]
    return "The sampler, one of:\n" + "\n".join(lines)


def markdown_table() -> str:
    """The README's scheduler table (a test keeps the README equal to it)."""
    rows = ["| `scheduler` | diffusers class and options | what it is |", "|---|---|---|"]
    for spec in _TABLE:
        extras = "".join(f"; {note}" for note in spec.adaptations())
        rows.append(f"| `{spec.name}` | `{spec.configuration()}`{extras} | {spec.description} |")
    return "\n".join(rows)
