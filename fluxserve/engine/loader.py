"""Loading the configured engine: the model (or the tiny demo model), its memory mode and speed options."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fluxserve.config import Settings
from fluxserve.engine.fake import PREFIX, SleepingEngine
from fluxserve.engine.flux import FluxEngine
from fluxserve.engine.loading import ModelSource, load_pipeline, resolve_device_and_dtype
from fluxserve.engine.lora import LoraRegistry, plan_for_request_loras
from fluxserve.engine.memory import load_device, prepare_pipeline
from fluxserve.engine.optimize import apply_speed
from fluxserve.engine.protocol import Engine
from fluxserve.engine.speed import plan_speed
from fluxserve.engine.tiny import save_tiny_model

log = logging.getLogger(__name__)


def load_engine(settings: Settings) -> Engine:
    """The engine for the configured model (building the tiny demo model when none is configured)."""
    config = settings.model
    if config.model and config.model.startswith(PREFIX):  # load tests of the queue alone
        return SleepingEngine.from_spec(config.model)
    model = config.model or str(ensure_demo_model(settings.tiny_model_dir))
    source = ModelSource.parse(model, config.base_model)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    started = time.perf_counter()
    pipeline = load_pipeline(source, device=load_device(config, device), dtype=dtype)
    prepare_pipeline(pipeline, config, device)  # LoRA fusing, then the memory mode
    log.info("model %s loaded in %.1fs", config.slug, time.perf_counter() - started)
    # Speed options (fluxserve/engine/speed.py, optimize.py): applied, then warmed up before serving.
    plan = plan_speed(settings.speed, config, device, compile_cache_dir=settings.compile_cache_dir)
    loras = LoraRegistry.from_settings(config)  # per-request LoRAs (fluxserve/engine/lora.py)
    loras.log_summary()
    speed = apply_speed(pipeline, plan_for_request_loras(plan, loras))
    engine = FluxEngine(pipeline, max_sequence_length=config.max_sequence_length, description=model, speed=speed,
                        loras=loras, lora_cache_size=config.lora_cache_size)
    speed.warm_up(engine.generate)
    return engine


def ensure_demo_model(target: Path) -> Path:
    if not (target / "model_index.json").is_file():
        log.info("building the tiny demo model in %s", target)
        save_tiny_model(target)
    return target
