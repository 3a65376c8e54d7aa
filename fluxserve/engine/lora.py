"""LoRA adapters: fused into the model once at start-up (setting `loras`), or chosen per request.

**At start-up** (`loras`): a comma-separated list of `LOCATION[:SCALE]`; LOCATION is a `.safetensors`
file, a folder holding one, or a Hugging Face repo id; SCALE defaults to 1. After fusing, the adapter
layers are unloaded: the model is a plain FLUX model again, so generation runs at full speed, and a
scale of 0 leaves the weights exactly as they were.

**Per request** (`GenerateRequest.loras`, up to three `{name, scale}`): the names come from the
operator's `LoraRegistry` (every `*.safetensors` file in `lora_dir`, or subfolder holding one, named by
its stem; plus adapters registered by name), never from a client's path or URL. The API refuses an
unknown name at submit. The engine applies them without reloading the base model, in one of two ways:

- `NamedAdapters` (the default): each adapter is loaded into the transformer (diffusers/PEFT) the first
  time a job names it, and kept loaded in an LRU of `lora_cache_size` adapters (the least recently used
  one is deleted beyond that). Each job activates exactly its own adapters with its scales; a job with
  none runs with the LoRA layers disabled, which is the base model bit for bit.
- `AdapterSlots` (when the transformer is compiled): before compiling, three adapter slots are added,
  covering every layer the registered adapters target at their largest rank. A job's adapters are
  copied into the slots' weights and scaling tensors in place, which the compiled graphs read as
  inputs: a swap never recompiles. An unused slot has scale 0 (the base model bit for bit). Adapters
  read from disk stay in host memory, in an LRU of `lora_cache_size`.

Either way, adapters apply to the transformer only (a text-encoder part is left out, logged), the
adapters of a job are applied in name order (the same request gives the same bytes whatever the order
it lists them in), and a scale of 0 is no adapter at all.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxserve.engine.loading import ModelLoadError
from fluxserve.engine.protocol import LoraWeight
from fluxserve.failures import JobFailure

if TYPE_CHECKING:
    from fluxserve.config import ModelSettings
    from fluxserve.engine.speed import SpeedPlan

log = logging.getLogger(__name__)

# Per request: how many adapters, and the range of each one's scale.
MAX_REQUEST_LORAS = 3
MIN_SCALE, MAX_SCALE = -2.0, 2.0
DEFAULT_CACHE_SIZE = 8
# The file a diffusers LoRA folder holds (`save_lora_weights`); any single .safetensors file will do.
FOLDER_WEIGHTS = "pytorch_lora_weights.safetensors"
# How many registered names an "unknown LoRA" answer lists before it points at GET /v1/loras.
NAMES_IN_ERRORS = 50
TRANSFORMER_PREFIX = "transformer."
# Keys of Control LoRAs (they replace the model's own norm layers: not something to switch per request).
_CONTROL_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


@dataclass(frozen=True)
class LoraSpec:
    location: str
    scale: float = 1.0


def parse_loras(spec: str) -> list[LoraSpec]:
    loras = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        location, _, scale = item.rpartition(":")
        try:
            loras.append(LoraSpec(location.strip(), float(scale)) if location else LoraSpec(item))
        except ValueError:  # no scale; the colon belongs to the location
            loras.append(LoraSpec(item))
    return loras


def fuse_loras(pipe, spec: str) -> None:
    """Load every adapter in `spec`, fuse them with their scales, and drop the adapter layers."""
    loras = parse_loras(spec)
    if not loras:
        return
    names = [f"lora_{index}" for index in range(len(loras))]
    for name, lora in zip(names, loras, strict=False):
        log.info("loading LoRA %s (scale %g)", lora.location, lora.scale)
        try:
            pipe.load_lora_weights(lora.location, adapter_name=name)
        except Exception as exc:  # diffusers raises OSError, ValueError, KeyError… for a bad adapter
            raise ModelLoadError(
                f"Could not load LoRA {lora.location!r}: {type(exc).__name__}: {exc}. FLUXSERVE_LORAS takes "
                "comma-separated LOCATION[:SCALE] entries (a .safetensors file, a folder or a repo id) "
                "made for this model's architecture."
            ) from exc
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    log.info("fused %d LoRA adapter(s)", len(loras))


# -- the registry ----------------------------------------------------------------------------------


class UnknownLora(ValueError):
    """A request names an adapter the registry does not hold; the message lists the registered ones."""


class LoraUnavailable(JobFailure):
    """A registered adapter could not be applied to this job (the message is for the client)."""


def adapter_file(path: Path) -> Path | None:
    """The weights file of an adapter at `path`: the file itself, or the one a folder holds
    (diffusers' `pytorch_lora_weights.safetensors`, else its only `.safetensors` file)."""
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if not path.is_dir():
        return None
    if (path / FOLDER_WEIGHTS).is_file():
        return path / FOLDER_WEIGHTS
    files = [p for p in path.glob("*.safetensors") if p.is_file() and not p.name.startswith(".")]
    return files[0] if len(files) == 1 else None


class LoraRegistry:
    """The adapters requests may name: those in `directory` (each `*.safetensors` file, or subfolder
    holding one, named by its stem or folder name; read afresh on every look-up, so adapters added or
    removed there count at once) and those registered by name (e.g. from a models file), which win
    over a directory entry of the same name. Clients only ever pass names; paths stay here."""

    def __init__(self, directory: Path | str | None = None, entries: Mapping[str, Path | str] | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory else None
        self._entries: dict[str, Path] = {}
        self._lock = threading.Lock()
        for name, path in (entries or {}).items():
            self.register(name, path)

    @classmethod
    def from_settings(cls, model: ModelSettings) -> LoraRegistry:
        """The registry of these settings (the API process and the workers build the same one)."""
        return cls(model.lora_dir)

    @property
    def configured(self) -> bool:
        """Whether per-request adapters are set up at all (a directory, or any registered entry)."""
        return self.directory is not None or bool(self._entries)

    def register(self, name: str, path: Path | str) -> None:
        """Add (or replace) the adapter `name`: a `.safetensors` file or a folder holding one."""
        if not name or not name.strip():
            raise ValueError("a LoRA needs a non-empty name")
        file = adapter_file(Path(path).expanduser())
        if file is None:
            raise ValueError(f"LoRA {name!r}: {path} is not a .safetensors file or a folder holding one")
        with self._lock:
            self._entries[name] = file

    def adapters(self) -> dict[str, Path]:
        """Every registered name → its weights file."""
        found = self._scan()
        with self._lock:
            found.update(self._entries)
        return found

    def _scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.directory is None:
            return found
        try:
            entries = sorted(self.directory.iterdir())
        except OSError:  # missing or unreadable: no adapters from it (the start-up log says so)
            return found
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                file = adapter_file(entry)
                if file is not None:
                    found[entry.name] = file
            elif entry.suffix == ".safetensors" and entry.is_file():
                found[entry.stem] = entry
        return found

    def names(self) -> list[str]:
        return sorted(self.adapters())

    def path(self, name: str) -> Path:
        adapters = self.adapters()
        if name not in adapters:
            raise UnknownLora(unknown_message([name], sorted(adapters)))
        return adapters[name]

    def check(self, names: Iterable[str]) -> None:
        """Raise UnknownLora (listing the registered names) unless every name is registered."""
        names = list(names)
        if not names:
            return
        adapters = self.adapters()
        unknown = [name for name in names if name not in adapters]
        if unknown:
            raise UnknownLora(unknown_message(unknown, sorted(adapters)))

    def describe(self) -> list[dict[str, Any]]:
        """What GET /v1/loras shows of each adapter: its name and file size (never its path)."""
        listed = []
        for name, path in sorted(self.adapters().items()):
            try:
                size = path.stat().st_size
            except OSError:
                continue  # removed since the scan
            listed.append({"name": name, "bytes": size})
        return listed

    def log_summary(self) -> None:
        if not self.configured:
            return
        names = self.names()
        where = f" in {self.directory}" if self.directory is not None else ""
        if self.directory is not None and not self.directory.is_dir():
            log.warning("LoRA directory %s does not exist (yet): no per-request LoRAs from it", self.directory)
        log.info("per-request LoRAs%s: %s", where, ", ".join(names) if names else "none yet")


def unknown_message(unknown: Sequence[str], registered: Sequence[str]) -> str:
    what = "Unknown LoRA " + ", ".join(repr(name) for name in unknown)
    if not registered:
        return f"{what}: this server has no LoRA adapters registered"
    listed = ", ".join(registered[:NAMES_IN_ERRORS])
    if len(registered) > NAMES_IN_ERRORS:
        listed += f", … ({len(registered)} in all; GET /v1/loras lists them)"
    return f"{what}; registered LoRAs: {listed}"


def plan_for_request_loras(plan: SpeedPlan, registry: LoraRegistry) -> SpeedPlan:
    """Leave out the speed options that per-request adapters cannot sit on: fused QKV removes the separate
    q/k/v projections LoRAs target, and float8 layers take no LoRA layer on top."""
    if not registry.configured:
        return plan
    if plan.options.fuse_qkv:
        plan = plan.without("fuse_qkv", "per-request LoRAs (FLUXSERVE_LORA_DIR) target the separate q/k/v "
                                        "projections that fusing removes")
    if plan.options.fp8:
        plan = plan.without("fp8", "per-request LoRAs (FLUXSERVE_LORA_DIR) cannot be added to float8 layers")
    return plan


# -- adapters read from disk -----------------------------------------------------------------------


def file_signature(path: Path) -> tuple[str, int, int]:
    """Changes when the file is replaced: a registered name whose file changed is read again."""
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@dataclass
class AdapterWeights:
    """One adapter's transformer part, as diffusers reads it (any of the LoRA formats it converts)."""

    name: str
    signature: tuple[str, int, int]
    state_dict: dict[str, Any]  # "transformer.<module>.lora_A.weight" → tensor, ...
    network_alphas: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    def peft_state_dict(self) -> dict[str, Any]:
        """Keys without the `transformer.` prefix, in PEFT's `lora_A`/`lora_B` naming."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in self.state_dict.items()}
        if state and "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
        return state

    def layers(self) -> dict[str, tuple[Any, Any, float]]:
        """module name → (lora_A weight (r × in), lora_B weight (out × r), alpha/r): what PEFT would compute
        for each layer when loading this adapter (its rank and alpha patterns, rsLoRA)."""
        from diffusers.utils.peft_utils import _create_lora_config
        from peft.utils.other import get_pattern_key

        state = self.peft_state_dict()
        if any("lora_magnitude_vector" in key for key in state) or any(
                "lora_B" in key and key.endswith(".bias") for key in state):
            raise ValueError("DoRA adapters and LoRA biases cannot be swapped into a compiled model")
        ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1}
        prefix = TRANSFORMER_PREFIX
        alphas = {k.removeprefix(prefix): v for k, v in (self.network_alphas or {}).items() if k.startswith(prefix)}
        metadata = {k.removeprefix(prefix): v for k, v in (self.metadata or {}).items() if k.startswith(prefix)}
        config = _create_lora_config(state, alphas or None, metadata or None, ranks)
        layers = {}
        for key, down in state.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            up = state[key.replace(".lora_A.", ".lora_B.")]
            rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            unit = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
            layers[module] = (down, up, float(unit))
        return layers


def read_adapter(name: str, path: Path) -> AdapterWeights:
    """Read a registered adapter (transformer part only); ValueError when it is not a usable LoRA."""
    from diffusers import FluxPipeline

    signature = file_signature(path)
    state_dict, network_alphas, metadata = FluxPipeline.lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True
    )
    transformer = {k: v for k, v in state_dict.items() if k.startswith(TRANSFORMER_PREFIX)}
    if any(key in k for k in transformer for key in _CONTROL_KEYS):
        raise ValueError("it is a Control LoRA (it replaces the model's norm layers), not usable per request")
    transformer = {k: v for k, v in transformer.items() if "lora" in k}
    if not transformer:
        raise ValueError("it holds no LoRA weights for the transformer")
    if len(transformer) < len(state_dict):
        log.warning("LoRA %s: %d weights for other components (text encoder) left out; per-request LoRAs apply "
                    "to the transformer only", name, len(state_dict) - len(transformer))
    return AdapterWeights(name, signature, transformer, network_alphas or None, metadata or None)


def _unloadable(name: str, path: Path, exc: Exception) -> LoraUnavailable:
    """The client reads which adapter and what kind of failure; the log has where and the details."""
    log.warning("LoRA %s could not be loaded from %s: %s: %s", name, path, type(exc).__name__, exc)
    return LoraUnavailable(f"LoRA {name!r} could not be loaded ({type(exc).__name__}; the server's log has the "
                           "details)")


def canonical(loras: Sequence[LoraWeight]) -> list[LoraWeight]:
    """A job's adapters in name order, without the ones at scale 0 (which change nothing)."""
    return sorted((lora for lora in loras if lora.scale != 0), key=lambda lora: lora.name)


@contextmanager
def _quietly() -> Iterator[None]:
    """PEFT warns on every second adapter ("multiple adapters") and on deleting an active one: expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# -- applying them per job -------------------------------------------------------------------------


@dataclass
class Applied:
    """What applying one job's adapters cost (the job's metrics)."""

    loras: list[LoraWeight] = field(default_factory=list)
    load_seconds: float = 0.0
    swap_seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {"lora_load_seconds": round(self.load_seconds, 4),
                                   "lora_swap_seconds": round(self.swap_seconds, 4)}
        if self.loras:
            metrics["loras"] = [{"name": lora.name, "scale": lora.scale} for lora in self.loras]
        return metrics


class RequestAdapters:
    """Per-request adapters on one pipeline. `apply` runs under the engine's generation lock."""

    def __init__(self, pipeline, registry: LoraRegistry, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.pipeline = pipeline
        self.registry = registry
        self.cache_size = max(1, cache_size)

    def apply(self, loras: Sequence[LoraWeight]) -> Applied:
        raise NotImplementedError

    def _path(self, name: str) -> Path:
        try:
            return self.registry.path(name)
        except UnknownLora as exc:  # removed since the request was accepted, or another server's registry
            raise LoraUnavailable(str(exc)) from None


@dataclass
class _Loaded:
    adapter: str  # the adapter's name inside the transformer
    signature: tuple[str, int, int]


class NamedAdapters(RequestAdapters):
    """Adapters loaded into the transformer by name on first use, an LRU of them kept loaded."""

    def __init__(self, pipeline, registry: LoraRegistry, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(pipeline, registry, cache_size)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        # Inside the transformer adapters get names of one fixed width: a registered name may hold dots
        # (which PEFT refuses), and diffusers matches adapter names as substrings of weight names.
        self._numbers = itertools.count()
        self._has_layers = False

    @property
    def loaded(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        return list(self._loaded)

    def apply(self, loras: Sequence[LoraWeight]) -> Applied:
        wanted = canonical(loras)
        applied = Applied(list(wanted))
        keep = {lora.name for lora in wanted}
        for lora in wanted:
            path = self._path(lora.name)
            try:
                signature = file_signature(path)
            except OSError as exc:  # removed since the registry listed it
                raise _unloadable(lora.name, path, exc) from None
            current = self._loaded.get(lora.name)
            if current is not None and current.signature != signature:
                log.info("LoRA %s changed on disk; loading it again", lora.name)
                self._delete(lora.name)
            if lora.name not in self._loaded:
                self._make_room(keep)
                started = time.perf_counter()
                self._load(lora.name, path)
                applied.load_seconds += time.perf_counter() - started
            self._loaded.move_to_end(lora.name)
        started = time.perf_counter()
        transformer = self.pipeline.transformer
        if wanted:
            transformer.enable_lora()
            transformer.set_adapters([self._loaded[lora.name].adapter for lora in wanted],
                                     [float(lora.scale) for lora in wanted])
        elif self._has_layers:
            transformer.disable_lora()  # the base layers alone: the base model exactly
        applied.swap_seconds = time.perf_counter() - started
        return applied

    def _load(self, name: str, path: Path) -> None:
        from diffusers import FluxPipeline

        adapter = f"request_lora_{next(self._numbers):08d}"
        try:
            weights = read_adapter(name, path)
            with _quietly():
                FluxPipeline.load_lora_into_transformer(
                    weights.state_dict, network_alphas=weights.network_alphas, transformer=self.pipeline.transformer,
                    adapter_name=adapter, metadata=weights.metadata, _pipeline=self.pipeline,
                )
        except Exception as exc:  # diffusers deletes a half-loaded adapter itself
            raise _unloadable(name, path, exc) from None
        self._has_layers = True
        self._loaded[name] = _Loaded(adapter, weights.signature)
        log.info("LoRA %s loaded (%d loaded)", name, len(self._loaded))

    def _make_room(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) < self.cache_size:
                return
            if name not in keep:
                self._delete(name)

    def _delete(self, name: str) -> None:
        loaded = self._loaded.pop(name)
        with _quietly():
            self.pipeline.transformer.delete_adapters([loaded.adapter])
        log.info("LoRA %s unloaded", name)


SLOT_NAMES = tuple(f"request_lora_slot_{index}" for index in range(MAX_REQUEST_LORAS))


class AdapterSlots(RequestAdapters):
    """Fixed adapter slots added before compiling; a job's adapters are copied into them in place."""

    def __init__(self, pipeline, registry: LoraRegistry, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(pipeline, registry, cache_size)
        self._cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._layers: dict[str, Any] = {}  # module name → its PEFT LoRA layer
        self.rank = 0
        self._occupant: list[tuple[str, tuple[str, int, int]] | None] = [None] * len(SLOT_NAMES)
        self._units: list[dict[str, float]] = [{} for _ in SLOT_NAMES]
        self._scales = [0.0] * len(SLOT_NAMES)
        self._install()

    @property
    def modules(self) -> set[str]:
        return set(self._layers)

    def _install(self) -> None:
        """Slots over the union of the registered adapters' layers, at their largest rank, all at scale 0."""
        import torch
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        modules: set[str] = set()
        for name, path in self.registry.adapters().items():
            try:
                layers = self._read(name, path).layers()
            except Exception as exc:
                log.warning("LoRA %s is left out of the compiled model's slots: %s: %s", name, type(exc).__name__, exc)
                continue
            modules |= set(layers)
            self.rank = max([self.rank, *(down.shape[0] for down, _, _ in layers.values())])
        if not modules:
            log.warning("per-request LoRAs: none registered at start-up, so the compiled model has no slots for "
                        "them (restart once adapters are in place)")
            return
        transformer = self.pipeline.transformer
        pattern = "^(?:" + "|".join(re.escape(module) for module in sorted(modules)) + ")$"
        with _quietly():
            for slot in SLOT_NAMES:
                config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=pattern)
                transformer.add_adapter(config, adapter_name=slot)
            transformer.set_adapters(list(SLOT_NAMES), [1.0] * len(SLOT_NAMES))
        for module_name, module in transformer.named_modules():
            if isinstance(module, LoraLayer) and SLOT_NAMES[0] in module.lora_A:
                self._layers[module_name] = module
        with torch.no_grad():
            for module in self._layers.values():
                for slot in SLOT_NAMES:
                    module.lora_A[slot].weight.zero_()
                    module.lora_B[slot].weight.zero_()
                    # A tensor the compiled graphs read (a float would be baked into them).
                    module.scaling[slot] = torch.zeros((), device=module.lora_A[slot].weight.device)
        log.info("per-request LoRAs: %d slots of rank %d on %d layers", len(SLOT_NAMES), self.rank, len(self._layers))

    def _read(self, name: str, path: Path) -> AdapterWeights:
        signature = file_signature(path)
        cached = self._cache.get(name)
        if cached is None or cached.signature != signature:
            cached = read_adapter(name, path)
            self._cache[name] = cached
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return cached

    def apply(self, loras: Sequence[LoraWeight]) -> Applied:
        import torch

        wanted = canonical(loras)
        applied = Applied(list(wanted))
        if wanted and not self._layers:
            raise LoraUnavailable("LoRAs are not available on this worker until it restarts: its compiled model "
                                  "has no adapter slots (none were registered when it started)")
        # The n-th adapter in name order always goes in slot n: the layers add the slots up in slot order,
        # so the same request gives the same bytes whatever ran before it.
        copies: list[tuple[int, tuple[str, tuple[str, int, int]], dict[str, tuple[Any, Any, float]]]] = []
        for slot, lora in enumerate(wanted):
            path = self._path(lora.name)
            started = time.perf_counter()
            try:
                weights = self._read(lora.name, path)
            except Exception as exc:
                raise _unloadable(lora.name, path, exc) from None
            applied.load_seconds += time.perf_counter() - started
            key = (lora.name, weights.signature)
            if self._occupant[slot] != key:
                copies.append((slot, key, self._fitting(lora.name, weights)))
        started = time.perf_counter()
        with torch.no_grad():
            for slot, key, layers in copies:  # every adapter fits (checked above) before any slot changes
                self._copy(slot, layers)
                self._occupant[slot] = key
            for slot in range(len(SLOT_NAMES)):
                scale = float(wanted[slot].scale) if slot < len(wanted) else 0.0
                if scale != self._scales[slot]:
                    self._set_scale(slot, scale)
        applied.swap_seconds = time.perf_counter() - started
        return applied

    def _fitting(self, name: str, weights: AdapterWeights) -> dict[str, tuple[Any, Any, float]]:
        try:
            layers = weights.layers()
        except Exception as exc:
            raise LoraUnavailable(f"LoRA {name!r} cannot be applied: {exc}") from None
        outside = sorted(set(layers) - set(self._layers))
        rank = max(down.shape[0] for down, _, _ in layers.values())
        if outside or rank > self.rank:
            why = (f"it adapts layers the compiled model's slots lack ({', '.join(outside[:3])}…)" if outside
                   else f"its rank {rank} exceeds the slots' rank {self.rank}")
            raise LoraUnavailable(f"LoRA {name!r} cannot be applied until the worker restarts: {why}")
        return layers

    def _copy(self, slot: int, layers: dict[str, tuple[Any, Any, float]]) -> None:
        """The adapter's weights into `slot` (zero-padded to the slots' rank; layers it lacks zeroed)."""
        name = SLOT_NAMES[slot]
        units = {}
        for module_name, module in self._layers.items():
            down_weight, up_weight = module.lora_A[name].weight, module.lora_B[name].weight
            down_weight.zero_()
            up_weight.zero_()
            if module_name in layers:
                down, up, unit = layers[module_name]
                down_weight[: down.shape[0]].copy_(down)
                up_weight[:, : up.shape[1]].copy_(up)
                units[module_name] = unit
        self._units[slot] = units
        self._scales[slot] = math.nan  # set again below

    def _set_scale(self, slot: int, scale: float) -> None:
        name, units = SLOT_NAMES[slot], self._units[slot]
        for module_name, module in self._layers.items():
            module.scaling[name].fill_(units.get(module_name, 0.0) * scale)
        self._scales[slot] = scale


def request_adapters(pipeline, registry: LoraRegistry | None, *, cache_size: int = DEFAULT_CACHE_SIZE,
                     slots: bool = False) -> RequestAdapters:
    """The per-request adapters of a pipeline: fixed slots for a compiled transformer, else named ones."""
    registry = registry or LoraRegistry()
    if slots and registry.configured:
        return AdapterSlots(pipeline, registry, cache_size)
    return NamedAdapters(pipeline, registry, cache_size)
