"""The scheduler table: the single source of truth for the `scheduler` parameter.

Each public name maps to a diffusers scheduler class and the options that make it a flow-matching
sampler for FLUX. Names the page lists but that are not wired yet stay in the table as unavailable,
so validation can tell "unknown" from "not available yet".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    available: bool = True


_EULER = "FlowMatchEulerDiscreteScheduler"

_TABLE = [
    # `Euler` and `FlowMatchEulerDiscreteScheduler` are the same sampler: FLUX's reference
    # flow-matching Euler. The page names both, so both are kept.
    SchedulerSpec("Euler", _EULER, {}, "FLUX's reference flow-matching Euler"),
    SchedulerSpec(_EULER, _EULER, {}, "alias of Euler (the page lists both names)"),
    # Listed on the page; wired in a later step.
    *(
        SchedulerSpec(name, _EULER, {}, "not available yet", available=False)
        for name in (
            "DPM++",
            "DPM++ SDE",
            "DPM++ 2M",
            "DPM++ 2M SDE",
            "DPM++ 3M",
            "Euler Beta",
            "Euler Exponential",
            "Euler Karras",
        )
    ),
]

SCHEDULERS: dict[str, SchedulerSpec] = {spec.name: spec for spec in _TABLE}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler instance for one job (schedulers keep per-run state, so never share one)."""
    import diffusers

    spec = SCHEDULERS[name]
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base_config, **spec.options)
