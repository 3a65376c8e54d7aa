"""Speed options: named presets and per-option switches, resolved against what the machine has.

A preset names a set of options; a switch set in Settings overrides the preset's choice for that
option. Resolving them against the device and the installed packages gives a `SpeedPlan`: the options
that will be applied and, for each one left out, why (logged at start-up). `optimize.py` applies a plan.

    off       nothing: diffusers as loaded
    quality   lossless: bf16, fused QKV, the fastest attention kernel, channels-last VAE, torch.compile
    balanced  quality + float8 dynamic quantisation of the transformer's linear layers (torchao)
    turbo     balanced + first-block step cache (skips most of the transformer on steps that barely change)
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from fluxserve.config import ModelSettings, SpeedSettings
from fluxserve.engine.sizes import padded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    bf16: bool = False
    fuse_qkv: bool = False
    # "default": leave diffusers' choice (PyTorch SDPA); "auto": the fastest installed; or a backend name.
    attention: str = "default"
    channels_last_vae: bool = False
    compile: bool = False
    fp8: bool = False
    step_cache: bool = False

    def enabled(self) -> list[str]:
        """The options that are on, e.g. ["bf16", "fuse_qkv", "attention=_flash_3", "compile"]."""
        names = []
        for option in fields(self):
            value = getattr(self, option.name)
            if option.name == "attention":
                if value != "default":
                    names.append(f"attention={value}")
            elif value:
                names.append(option.name)
        return names


_QUALITY = SpeedOptions(bf16=True, fuse_qkv=True, attention="auto", channels_last_vae=True, compile=True)
PRESETS: dict[str, SpeedOptions] = {
    "off": SpeedOptions(),
    "quality": _QUALITY,
    "balanced": replace(_QUALITY, fp8=True),
    "turbo": replace(_QUALITY, fp8=True, step_cache=True),
}

# Attention backends that run only on NVIDIA GPUs (diffusers' names).
_CUDA_ONLY_ATTENTION_PREFIXES = ("flash", "_flash", "sage", "_sage", "_native_cudnn", "_native_flash",
                                 "_native_efficient", "xformers", "aiter")
# Attention backends that need a package of their own: diffusers' name → the package.
_ATTENTION_PACKAGES = {"_flash_3": "flash_attn_3 (Flash-Attention 3, built from source)", "flash": "flash-attn"}


@dataclass(frozen=True)
class Machine:
    """What the options depend on: the device and what is installed. `probe()` looks; tests pass values."""

    device: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0) for Hopper
    modules: frozenset[str] = frozenset()  # importable optional modules among OPTIONAL_MODULES
    attention: frozenset[str] = frozenset()  # usable backends among _ATTENTION_PACKAGES, as diffusers judges
    has_cxx: bool = True  # a C++ compiler, which torch.compile needs on CPU

    OPTIONAL_MODULES = ("torchao", "triton")

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def probe(cls, device: str) -> Machine:
        import torch

        capability = None
        if device.startswith("cuda") and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(torch.device(device))
            capability = (major, minor)
        from diffusers.models import attention_dispatch

        modules = frozenset(m for m in cls.OPTIONAL_MODULES if importlib.util.find_spec(m) is not None)
        usable = {"_flash_3": attention_dispatch._CAN_USE_FLASH_ATTN_3, "flash": attention_dispatch._CAN_USE_FLASH_ATTN}
        attention = frozenset(name for name, ok in usable.items() if ok)
        has_cxx = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
        return cls(device=device, capability=capability, modules=modules, attention=attention, has_cxx=has_cxx)


def choose_attention_backend(machine: Machine) -> str:
    """The fastest attention kernel this machine has, as a diffusers backend name."""
    if not machine.cuda or machine.capability is None:
        return "native"
    if "_flash_3" in machine.attention and machine.capability[0] == 9:
        return "_flash_3"  # Flash-Attention 3: Hopper only
    if "flash" in machine.attention and machine.capability >= (8, 0):
        return "flash"
    return "native"  # PyTorch SDPA, which picks its own flash / memory-efficient kernel


def attention_backend_names() -> set[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return {"default"} | {backend.value for backend in AttentionBackendName}


def why_not(option: str, value: object, machine: Machine, model: ModelSettings) -> str | None:
    """Why `option` cannot be applied here, or None when it can."""
    if option == "bf16" and model.dtype not in (None, "bfloat16"):
        return f"FLUXSERVE_DTYPE={model.dtype} was set explicitly"
    if option == "attention" and isinstance(value, str):
        if value not in attention_backend_names():
            return f"unknown attention backend {value!r}; diffusers has {', '.join(sorted(attention_backend_names()))}"
        if not machine.cuda and value.startswith(_CUDA_ONLY_ATTENTION_PREFIXES):
            return f"attention backend {value!r} needs an NVIDIA GPU; this is {machine.device}"
        if value in _ATTENTION_PACKAGES and value not in machine.attention:
            return f"attention backend {value!r} needs {_ATTENTION_PACKAGES[value]}, which is not installed"
    if option == "compile":
        if model.memory_mode == "sequential_cpu_offload":
            return "torch.compile does not combine with sequential CPU offload (weights move layer by layer)"
        if machine.cuda and "triton" not in machine.modules:
            return "torch.compile on CUDA needs triton (it ships with PyTorch's Linux CUDA wheels)"
        if not machine.cuda and not machine.has_cxx:
            return "torch.compile on CPU needs a C++ compiler (g++ or clang++)"
    if option == "fp8":
        if not machine.cuda or machine.capability is None or machine.capability < (8, 9):
            return ("float8 matmuls need an NVIDIA GPU with compute capability 8.9+ (Ada, Hopper or newer); "
                    f"this is {machine.device}" + (f" {machine.capability}" if machine.capability else ""))
        if "torchao" not in machine.modules:
            return "float8 quantisation needs torchao: pip install 'fluxserve[speed]'"
    return None


@dataclass(frozen=True)
class SpeedPlan:
    """The speed options to apply to one pipeline, and the ones left out with the reason."""

    preset: str = "off"
    options: SpeedOptions = SpeedOptions()
    skipped: dict[str, str] = field(default_factory=dict)
    compile_mode: str = "default"
    compile_dynamic: bool = False
    compile_cache_dir: Path | None = None
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    step_cache_threshold: float = 0.12
    auto_vae_tiling: bool = False
    vae_tiling_min_pixels: int | None = None

    def without(self, option: str, reason: str) -> SpeedPlan:
        off: str | bool = "default" if option == "attention" else False
        options = replace(self.options, **{option: off})  # type: ignore[arg-type]
        return replace(self, options=options, skipped={**self.skipped, option: reason})

    def metrics(self) -> dict:
        """What a result's metrics say about the speed options that ran."""
        return {"speed_preset": self.preset, "speed_options": self.options.enabled()}

    def describe(self) -> str:
        text = f"speed preset {self.preset}: " + (", ".join(self.options.enabled()) or "no options")
        for option, reason in self.skipped.items():
            text += f"; {option} skipped: {reason}"
        return text


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """ "1024x1024,768x1344" → ((1024, 1024), (768, 1344)); sizes are rounded up to what the model runs at."""
    sizes: list[tuple[int, int]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height = (int(value) for value in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"Bad size {item!r} in FLUXSERVE_SPEED_WARMUP_SIZES (use WxH,WxH)") from None
        if width <= 0 or height <= 0:
            raise ValueError(f"Bad size {item!r} in FLUXSERVE_SPEED_WARMUP_SIZES")
        sizes.append((padded(width), padded(height)))
    return tuple(dict.fromkeys(sizes))


def plan_speed(
    config: SpeedSettings,
    model: ModelSettings,
    device: str,
    machine: Machine | None = None,
    compile_cache_dir: Path | None = None,
) -> SpeedPlan:
    """Resolve the configured preset and switches against this machine."""
    machine = machine or Machine.probe(device)
    preset = config.preset
    if preset == "auto":
        preset = "quality" if machine.cuda else "off"
    options = PRESETS[preset]
    for option in fields(SpeedOptions):
        override = getattr(config, option.name)
        if override is not None:
            options = replace(options, **{option.name: override})
    if options.attention == "auto":
        options = replace(options, attention=choose_attention_backend(machine))
    plan = SpeedPlan(
        preset=preset,
        options=options,
        # CUDA graphs are left out by default: with per-block compilation each of the 57 blocks would
        # record its own graph per size, for little gain at FLUX's step length. Kernel search pays off on GPUs.
        compile_mode=config.compile_mode or ("max-autotune-no-cudagraphs" if machine.cuda else "default"),
        compile_dynamic=config.compile_dynamic,
        compile_cache_dir=compile_cache_dir or config.compile_cache_dir,
        warmup_sizes=parse_sizes(config.warmup_sizes),
        step_cache_threshold=config.step_cache_threshold,
        auto_vae_tiling=config.auto_vae_tiling,
        vae_tiling_min_pixels=config.vae_tiling_min_pixels,
    )
    for option in fields(SpeedOptions):
        value = getattr(plan.options, option.name)
        if value in (False, "default"):
            continue
        reason = why_not(option.name, value, machine, model)
        if reason:
            plan = plan.without(option.name, reason)
    return plan
