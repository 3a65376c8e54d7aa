"""Speed options: named presets and per-option switches, resolved against what the machine has.

A preset names a set of options; a switch set in Settings overrides the preset's choice for that
option. Resolving them against the device and the installed packages gives a `SpeedPlan`: the options
that will be applied and, for each one left out, why (logged at start-up). `optimize.py` applies a plan.

    off       nothing: diffusers as loaded
    quality   lossless: bf16, fused QKV, the fastest attention kernel that passes a probe, channels-last
              VAE, torch.compile of the warm-up sizes
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
# A probe's output may differ from PyTorch SDPA's by this much (16-bit rounding); more means a broken kernel.
PROBE_TOLERANCE = 2e-2


@dataclass(frozen=True)
class Machine:
    """What the options depend on: the device and what is installed. `probe()` looks; tests pass values."""

    device: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0) for Hopper
    modules: frozenset[str] = frozenset()  # importable optional modules among OPTIONAL_MODULES
    # Attention backends that passed the probe on this device; `attention_failures`: why the others did not.
    attention: frozenset[str] = frozenset()
    attention_failures: tuple[tuple[str, str], ...] = ()
    has_cxx: bool = True  # a C++ compiler, which torch.compile needs on CPU

    OPTIONAL_MODULES = ("torchao", "triton")

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def attention_failure(self, name: str) -> str | None:
        return dict(self.attention_failures).get(name)

    @classmethod
    def probe(cls, device: str, attention: str | None = None) -> Machine:
        """Look at this machine; the attention backends `auto` would try (and `attention`, when it names
        one) are probed on the device."""
        import torch

        capability = None
        if device.startswith("cuda") and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(torch.device(device))
            capability = (major, minor)
        modules = frozenset(m for m in cls.OPTIONAL_MODULES if importlib.util.find_spec(m) is not None)
        names = attention_candidates(device, capability)
        if attention not in (None, "auto", "default", "native") and device.startswith("cuda"):
            names.append(attention)
        usable, failures = probe_attention_backends(device, names)
        has_cxx = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
        return cls(device=device, capability=capability, modules=modules, attention=usable,
                   attention_failures=failures, has_cxx=has_cxx)


def attention_candidates(device: str, capability: tuple[int, int] | None) -> list[str]:
    """What `attention: auto` tries before PyTorch SDPA, fastest first: Flash-Attention 3 (Hopper only),
    then cuDNN's fused attention through SDPA (Hopper and Ada, where it is usually faster than the kernel
    SDPA picks by itself; the bench's attention column shows which one ran)."""
    if not device.startswith("cuda") or capability is None:
        return []
    names = ["_flash_3"] if capability[0] == 9 else []
    if capability[0] == 9 or capability == (8, 9):
        names.append("_native_cudnn")
    return names


def probe_attention(name: str, device: str, dtype=None, heads: int = 24, head_dim: int = 128) -> str | None:
    """Why attention backend `name` cannot serve on `device`, or None when it can: a small attention call
    through diffusers' dispatcher (FLUX's head layout) runs there and matches PyTorch SDPA."""
    import torch
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        _maybe_download_kernel_for_backend,
        dispatch_attention_fn,
    )

    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        backend = AttentionBackendName(name)
        _check_attention_backend_requirements(backend)  # what set_attention_backend checks
        _maybe_download_kernel_for_backend(backend)
        generator = torch.Generator(device=device).manual_seed(0)
        query, key, value = (torch.randn(1, 256, heads, head_dim, device=device, dtype=dtype, generator=generator)
                             for _ in range(3))
        with torch.inference_mode():
            out = dispatch_attention_fn(query, key, value, backend=backend)
            expected = dispatch_attention_fn(query, key, value, backend=AttentionBackendName.NATIVE)
        error = (out.float() - expected.float()).abs().max().item()
    except Exception as exc:  # a missing package, no kernel for this GPU or dtype, ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not error <= PROBE_TOLERANCE:  # NaN fails too
        return f"output differs from PyTorch SDPA by {error:.3g}"
    return None


def probe_attention_backends(device: str, names: list[str], probe=probe_attention):
    """(the backends among `names` that pass `probe` on `device`, (name, why) for the others)."""
    usable, failures = [], []
    for name in names:
        reason = probe(name, device)
        if reason is None:
            usable.append(name)
            log.info("attention backend %s passed its probe on %s", name, device)
        else:
            failures.append((name, reason))
            log.info("attention backend %s is not usable on %s: %s", name, device, reason)
    return frozenset(usable), tuple(failures)


def choose_attention_backend(machine: Machine, half_precision: bool = True) -> str:
    """The first of `attention_candidates` that passed its probe, else PyTorch SDPA ("native"). FA3 and
    cuDNN attention run 16-bit tensors only: a float32 model gets SDPA."""
    if half_precision:
        for name in attention_candidates(machine.device, machine.capability):
            if name in machine.attention:
                return name
    return "native"


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
        failure = machine.attention_failure(value)
        if failure:
            return f"attention backend {value!r} failed its probe on {machine.device}: {failure}"
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
    compile_recompile_limit: int = 64
    step_cache_threshold: float = 0.12
    auto_vae_tiling: bool = False
    vae_tiling_min_pixels: int | None = None
    preview_every: int = 4

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
    machine = machine or Machine.probe(device, config.attention)
    preset = config.preset
    if preset == "auto":
        preset = "quality" if machine.cuda else "off"
    options = PRESETS[preset]
    for option in fields(SpeedOptions):
        override = getattr(config, option.name)
        if override is not None:
            options = replace(options, **{option.name: override})
    if options.attention == "auto":
        # The probe ran in bfloat16; FA3 and cuDNN attention do not run float32.
        half = model.dtype in ("bfloat16", "float16") or (model.dtype is None and (options.bf16 or machine.cuda))
        options = replace(options, attention=choose_attention_backend(machine, half_precision=half))
    plan = SpeedPlan(
        preset=preset,
        options=options,
        # CUDA graphs are left out by default: with per-block compilation each of the 57 blocks would
        # record its own graph per size, for little gain at FLUX's step length. Kernel search pays off on GPUs.
        compile_mode=config.compile_mode or ("max-autotune-no-cudagraphs" if machine.cuda else "default"),
        compile_dynamic=config.compile_dynamic,
        compile_cache_dir=compile_cache_dir or config.compile_cache_dir,
        warmup_sizes=parse_sizes(config.warmup_sizes),
        compile_recompile_limit=config.compile_recompile_limit,
        step_cache_threshold=config.step_cache_threshold,
        auto_vae_tiling=config.auto_vae_tiling,
        vae_tiling_min_pixels=config.vae_tiling_min_pixels,
        preview_every=config.preview_every,
    )
    for option in fields(SpeedOptions):
        value = getattr(plan.options, option.name)
        if value in (False, "default"):
            continue
        reason = why_not(option.name, value, machine, model)
        if reason:
            plan = plan.without(option.name, reason)
    return plan
