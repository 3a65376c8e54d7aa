"""The models one server (or fleet) serves: each slug with its own settings.

Where the table comes from, later sources overriding earlier ones entry by entry:

1. a models file (`FLUXSERVE_MODELS_FILE`, `serve --models-file`), TOML, one table per slug with that
   model's own options:

       [models.juggernaut-pro-flux]
       model = "/models/juggernaut-pro-flux.safetensors"
       base_model = "black-forest-labs/FLUX.1-dev"
       loras = "/loras/detail.safetensors:0.8"
       speed_preset = "turbo"
       moderation = false
       price_per_image = 2

       [models.flux-schnell]
       model = "black-forest-labs/FLUX.1-schnell"

   An entry may set any model option (`model`, `base_model`, `loras`, `device`, `dtype`,
   `memory_mode`, ...), any speed option by its flat name (`speed_preset`, `speed_compile`, ...), any
   moderation option (`moderation`, `moderation_blocklist`, ...) and its price (`price_per_image`,
   `price_per_megapixel_step`); anything it leaves out is the process's own setting.
2. `FLUXSERVE_MODELS` / repeated `serve --model SLUG=LOCATION`: `SLUG=LOCATION` pairs (comma-separated
   in the variable), each setting (or adding) that slug's `model`.
3. The default slug (`FLUXSERVE_SLUG`, `juggernaut-pro-flux`) with `FLUXSERVE_MODEL` (a bare `--model
   LOCATION`): served when a model is set that way, or when nothing else is configured (the tiny demo
   model, as a plain `fluxserve serve` always did).

Every process of a fleet is given the same table: API replicas route `/v1/{slug}` and `/v2/{slug}` for
each entry, workers load the entries they serve (`--models a,b`; all of them by default).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fluxserve.config import AccountSettings, ModelSettings, ModerationSettings, Settings, SpeedSettings

# What a slug may look like: it is a path segment (`/v1/{slug}`) and an OpenAI `model` id.
SLUG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Paths under /v1 and /v2 that are not models.
RESERVED_SLUGS = frozenset({"models", "images", "account", "loras", "webhooks", "requests", "media"})
PRICE_OPTIONS = ("price_per_image", "price_per_megapixel_step")


class ModelConfigError(ValueError):
    """The models configuration is wrong: the message says where and how."""


def model_options() -> dict[str, str]:
    """Every option a models-file entry may set → the flat setting name it stands for."""
    options = {name: name for name in ModelSettings.model_fields if name != "slug"}
    for group in (SpeedSettings, ModerationSettings):
        options |= {group.flat_name(field): group.flat_name(field) for field in group.model_fields}
    options |= {name: AccountSettings.flat_name(name) for name in PRICE_OPTIONS}
    return options


def check_slug(slug: str, where: str) -> str:
    if not SLUG_PATTERN.match(slug):
        raise ModelConfigError(f"{where}: {slug!r} is not a model slug (letters, digits, '.', '_', '-')")
    if slug.lower() in RESERVED_SLUGS:
        raise ModelConfigError(f"{where}: {slug!r} is a path of the API, not usable as a model slug")
    return slug


def split_model_flags(values: Iterable[str]) -> tuple[str | None, str | None]:
    """`--model` values → (the bare LOCATION, the `SLUG=LOCATION` pairs joined for FLUXSERVE_MODELS)."""
    bare: str | None = None
    pairs: list[str] = []
    for value in values:
        pair = _as_pair(value)
        if pair is None:
            if bare is not None:
                raise ModelConfigError(f"--model: {bare!r} and {value!r} both want the default slug; "
                                       "name the others as SLUG=LOCATION")
            bare = value
        else:
            pairs.append(f"{pair[0]}={pair[1]}")
    return bare, ",".join(pairs) or None


def _as_pair(value: str) -> tuple[str, str] | None:
    """`SLUG=LOCATION` → (slug, location); None for a bare location (no `=`, or no slug before it)."""
    slug, sep, location = value.partition("=")
    slug = slug.strip()
    if not sep or not SLUG_PATTERN.match(slug):
        return None
    location = location.strip()
    if not location:
        raise ModelConfigError(f"--model {value!r}: no location after '='")
    return slug, location


def parse_models(text: str) -> dict[str, str]:
    """`FLUXSERVE_MODELS`: comma-separated `SLUG=LOCATION` → {slug: location}, in order."""
    models: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        pair = _as_pair(item)
        if pair is None:
            raise ModelConfigError(f"FLUXSERVE_MODELS: {item!r} is not SLUG=LOCATION")
        models[check_slug(pair[0], "FLUXSERVE_MODELS")] = pair[1]
    return models


def read_models_file(path: Path) -> dict[str, dict[str, Any]]:
    """A models file → {slug: {flat option name: value}}, in file order."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelConfigError(f"models file {path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"models file {path}: not valid TOML ({exc})") from None
    unknown_top = sorted(set(data) - {"models"})
    if unknown_top:
        raise ModelConfigError(f"models file {path}: unknown table(s) {', '.join(unknown_top)}; "
                               "put each model under [models.SLUG]")
    tables = data.get("models", {})
    if not isinstance(tables, dict) or not tables:
        raise ModelConfigError(f"models file {path}: no [models.SLUG] table")
    options = model_options()
    entries: dict[str, dict[str, Any]] = {}
    for slug, table in tables.items():
        where = f"models file {path}, [models.{slug}]"
        check_slug(slug, where)
        if not isinstance(table, dict):
            raise ModelConfigError(f"{where}: must be a table of options")
        unknown = sorted(set(table) - set(options))
        if unknown:
            raise ModelConfigError(f"{where}: unknown option(s) {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(options))})")
        entries[slug] = {options[name]: value for name, value in table.items()}
    return entries


def model_table(settings: Settings) -> dict[str, Settings]:
    """Every served slug → the settings its engine, moderation and price come from (its `model.slug` is
    the slug), in configuration order; the default slug first when it is served."""
    entries: dict[str, dict[str, Any]] = {}
    if settings.models_file is not None:
        entries = read_models_file(settings.models_file)
    for slug, location in parse_models(settings.models).items():
        entries.setdefault(slug, {})["model"] = location
    default = settings.model.slug
    table: dict[str, Settings] = {}
    if default in entries or settings.model.model or not entries:
        table[default] = _for_model(settings, default, entries.pop(default, {}))
    for slug, options in entries.items():
        if not options.get("model"):
            raise ModelConfigError(f"model {slug!r}: no location (set `model` in its [models.{slug}] table, "
                                   f"or pass {slug}=LOCATION)")
        table[slug] = _for_model(settings, slug, options)
    return table


def _for_model(settings: Settings, slug: str, options: dict[str, Any]) -> Settings:
    try:
        return settings.with_overrides(slug=slug, **options)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ModelConfigError(f"model {slug!r}: {exc}") from None


def worker_slugs(settings: Settings, table: dict[str, Settings]) -> list[str]:
    """The slugs a worker of this process serves: `worker.models` (checked against the table), else all."""
    if not settings.worker.models:
        return list(table)
    wanted = [slug.strip() for slug in settings.worker.models.split(",") if slug.strip()]
    unknown = [slug for slug in wanted if slug not in table]
    if unknown:
        raise ModelConfigError(
            f"--models / FLUXSERVE_WORKER_MODELS names {', '.join(map(repr, unknown))}, not configured here "
            f"(configured: {', '.join(table)}); give every process the same FLUXSERVE_MODELS or models file"
        )
    return list(dict.fromkeys(wanted))
