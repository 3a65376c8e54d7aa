"""The engine: what turns one request's parameters into one image.

`protocol.Engine` is what the worker calls; `flux.FluxEngine` runs a FLUX pipeline and `fake` a
queue-only stand-in; `loader.load_engine` builds the configured one.
"""

from __future__ import annotations

from fluxserve.engine.flux import FluxEngine
from fluxserve.engine.loader import load_engine
from fluxserve.engine.protocol import Engine, GenerationCancelled, GenerationParams

__all__ = ["Engine", "FluxEngine", "GenerationCancelled", "GenerationParams", "load_engine"]
