"""Test-side fault injection, composed through the composition root (`Services(settings, engine_loader=...)`).

- `FaultyEngine`: wraps an engine (the `Engine` protocol); raises for prompts containing `error_on`,
  sleeps `delay_seconds` before prompts containing `delay_on` and `step_seconds` after every denoising
  step of prompts containing `slow_on` (marker words in prompts).
- `failing_loader(message)`: an engine loader that fails: the engine is unavailable and the API answers 502.
- `fail_submits_on(services, marker)`: the services' job store's `submit` raises for prompts containing
  `marker`: an internal error while submitting (500 with a log reference).
- `faulty_server(...)` / `server_command(...)`: a real `serve` process (for tests that SIGKILL it)
  built the same way, with these faults armed.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

INJECTED_ENGINE_FAULT = "injected engine fault"
INJECTED_API_FAULT = "injected API fault"


class InjectedFault(RuntimeError):
    pass


class FaultyEngine:
    """An `Engine` that fails or stalls on marker words in the prompt, and otherwise is `engine`."""

    def __init__(self, engine, *, error_on: str | None = None, delay_on: str | None = None,
                 delay_seconds: float = 5.0, slow_on: str | None = None, step_seconds: float = 0.1) -> None:
        self.engine = engine
        self.error_on = error_on
        self.delay_on = delay_on
        self.delay_seconds = delay_seconds
        self.slow_on = slow_on
        self.step_seconds = step_seconds
        self._released = threading.Event()

    @property
    def description(self) -> str:
        return self.engine.description

    def generate(self, params, on_step=None, on_preview=None):
        if self.delay_on and self.delay_on in params.prompt:
            self._released.wait(self.delay_seconds)
        if self.error_on and self.error_on in params.prompt:
            raise InjectedFault(INJECTED_ENGINE_FAULT)
        if self.slow_on and self.slow_on in params.prompt and on_step is not None:
            on_step = self._slowed(on_step)
        return self.engine.generate(params, on_step=on_step, on_preview=on_preview)

    def _slowed(self, on_step: Callable) -> Callable:
        # Steps long enough that a follower polling every 0.2 s sees the job between its first and last step.
        def step(*args, **kwargs):
            self._released.wait(self.step_seconds)
            return on_step(*args, **kwargs)

        return step

    def metrics(self) -> dict[str, Any]:
        return self.engine.metrics()

    def release_delays(self) -> None:
        """End every delay now (and skip later ones): so a server can drain quickly at the end of a test."""
        self._released.set()

    def __getattr__(self, name: str):  # anything else (e.g. `pipeline`) is the wrapped engine's
        return getattr(self.engine, name)


def faulty_loader(loader: Callable, **faults) -> Callable:
    """An engine loader that wraps what `loader` loads in a FaultyEngine."""
    return lambda settings: FaultyEngine(loader(settings), **faults)


def failing_loader(message: str) -> Callable:
    """An engine loader that fails with `message` (as a model that cannot load would)."""

    def load(_settings):
        raise InjectedFault(message)

    return load


def _prompt_of(job) -> str:
    params = job.params
    return str(params.get("positivePrompt", "") if isinstance(params, dict) else params.positivePrompt)


def fail_submits_on(services, marker: str) -> None:
    """Make the services' job store fail (internally) to store any job whose prompt contains `marker`."""
    store = services.jobs if hasattr(services, "jobs") else services.store
    submit = store.submit

    def failing_submit(job, *args, **kwargs):
        if marker in _prompt_of(job):
            raise InjectedFault(INJECTED_API_FAULT)
        return submit(job, *args, **kwargs)

    store.submit = failing_submit


# -- a real `serve` process with faults armed ---------------------------------------------------------


def _fault_args(error_on: str | None = None, delay_on: str | None = None,
                delay_seconds: float | None = None, slow_on: str | None = None) -> list[str]:
    args = []
    for flag, value in (("--error-on", error_on), ("--delay-on", delay_on), ("--delay-seconds", delay_seconds),
                        ("--slow-on", slow_on)):
        if value is not None:
            args += [flag, str(value)]
    return args


def server_command(**faults) -> list[str]:
    """The command line of a `serve` process (API and embedded worker, settings from FLUXSERVE_*)
    whose engine has these faults."""
    tests_dir = str(Path(__file__).resolve().parents[1])
    bootstrap = f"import sys; sys.path.insert(0, {tests_dir!r}); from support.faults import main; main()"
    return [sys.executable, "-c", bootstrap, *_fault_args(**faults)]


def faulty_server(data_dir: Path, env: dict[str, str] | None = None, **faults):
    """A `support.processes.ServerProcess` that runs `server_command(**faults)` instead of `fluxserve serve`."""
    from support.processes import ServerProcess

    server = ServerProcess(data_dir, env=env)
    server.args = server_command(**faults)
    return server


def main(argv: list[str] | None = None) -> None:
    """`fluxserve serve`, composed here with a FaultyEngine (for the process-level tests)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--error-on")
    parser.add_argument("--delay-on")
    parser.add_argument("--delay-seconds", type=float, default=5.0)
    parser.add_argument("--slow-on")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import uvicorn

    from fluxserve.api import create_app
    from fluxserve.config import Settings
    from fluxserve.engine import load_engine
    from fluxserve.logs import configure_logging
    from fluxserve.services import Services

    settings = Settings()
    loader = faulty_loader(load_engine, error_on=options.error_on, delay_on=options.delay_on,
                           delay_seconds=options.delay_seconds, slow_on=options.slow_on)
    app = create_app(settings, Services(settings, engine_loader=loader))
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
