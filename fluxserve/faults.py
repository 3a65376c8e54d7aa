"""Opt-in fault injection, for tests and failure drills (setting `faults`, off by default).

The spec is a comma-separated list of `name=value` pairs:
- `engine_error_on=TEXT`: the engine raises for any prompt that contains TEXT.
- `engine_delay_on=TEXT`: the engine sleeps `engine_delay_seconds` (default 5) before such a prompt.
- `api_error_on=TEXT`: the API fails internally (500) while submitting such a prompt.
- `load_error=TEXT`: loading the model fails with TEXT (the engine is unavailable: 502).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Faults:
    engine_error_on: str | None = None
    engine_delay_on: str | None = None
    engine_delay_seconds: float = 5.0
    api_error_on: str | None = None
    load_error: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Faults:
        defaults = {field.name: field.default for field in fields(cls)}
        values = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.partition("=")
            if name not in defaults:
                raise ValueError(f"unknown fault {name!r}")
            values[name] = float(value) if isinstance(defaults[name], float) else value
        return cls(**values)

    def before_generate(self, prompt: str) -> None:
        if self.engine_delay_on and self.engine_delay_on in prompt:
            time.sleep(self.engine_delay_seconds)
        if self.engine_error_on and self.engine_error_on in prompt:
            raise InjectedFault("injected engine fault")

    def before_submit(self, prompt: str) -> None:
        if self.api_error_on and self.api_error_on in prompt:
            raise InjectedFault("injected API fault")

    def before_load(self) -> None:
        if self.load_error:
            raise InjectedFault(self.load_error)
