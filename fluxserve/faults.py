"""Opt-in fault injection, for tests and failure drills (setting `faults`, off by default).

The spec is a comma-separated list of `name=value` pairs:
- `engine_error_on=TEXT`: the engine raises for any prompt that contains TEXT.
"""

from __future__ import annotations

from dataclasses import dataclass


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Faults:
    engine_error_on: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Faults:
        values = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.partition("=")
            if name not in cls.__dataclass_fields__:
                raise ValueError(f"unknown fault {name!r}")
            values[name] = value
        return cls(**values)

    def before_generate(self, prompt: str) -> None:
        if self.engine_error_on and self.engine_error_on in prompt:
            raise InjectedFault("injected engine fault")
