"""Opening the configured stores: jobs and their outbox, output media, accounts.

One URL names where a deployment's shared state lives (`FLUXSERVE_STORE`):

    sqlite:///path      one host (the default: files under the data dir)
    redis://...         a fleet: jobs, outbox, accounts, keys, secrets and media in Redis
    postgresql://...    a fleet: the same in PostgreSQL (schema migrated at start-up, `fluxserve migrate`)

`FLUXSERVE_ACCOUNTS_STORE` may put the money elsewhere; `FLUXSERVE_OUTPUT_STORE` the media (e.g.
`s3://bucket/prefix` at scale). Unset, media follow a Redis or PostgreSQL store, so one URL is a fleet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fluxserve import pgdb
from fluxserve.accounts import AccountStore
from fluxserve.accounts.postgres import PostgresAccountStore
from fluxserve.accounts.redis import RedisAccountStore
from fluxserve.accounts.sqlite import SqliteAccountStore
from fluxserve.config import AccountSettings, OutputSettings, Settings, StoreSettings
from fluxserve.jobs import JobStore
from fluxserve.jobs.outbox import Outbox
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.jobs.postgres import PostgresJobStore
from fluxserve.jobs.redis import RedisJobStore
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.outputs import OutputStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.outputs.postgres import PostgresOutputStore
from fluxserve.outputs.redis import RedisOutputStore
from fluxserve.presence import PostgresPresence, Presence, RedisPresence, SqlitePresence

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Media outlive their job's record by this margin; the janitor normally deletes them first.
MEDIA_TTL_MARGIN_SECONDS = 3600

Backend = Literal["sqlite", "redis", "postgres"]


def backend_of(url: str | None) -> Backend:
    """Which backend a store URL names (None: the SQLite default); ValueError for anything else."""
    if url is None or url.startswith("sqlite://"):
        return "sqlite"
    if url.startswith(REDIS_SCHEMES):
        return "redis"
    if url.startswith(pgdb.POSTGRES_SCHEMES):
        return "postgres"
    raise ValueError(f"Unsupported store URL: {url!r} (use sqlite:///path, redis://host:port/db or "
                     "postgresql://user@host:port/db)")


def is_shared(url: str | None) -> bool:
    """True when the URL is a store several hosts can share (Redis or PostgreSQL)."""
    return backend_of(url) != "sqlite"


def _sqlite_path(url: str | None, default: Path) -> Path:
    return Path(url.removeprefix("sqlite:///")) if url else default


def lease_policy(config: StoreSettings) -> LeasePolicy:
    return LeasePolicy(config.lease_seconds, config.max_attempts, config.retention_seconds,
                       config.reclaim_backoff_seconds)


def open_jobs(config: StoreSettings, default_sqlite: Path) -> tuple[JobStore, Outbox]:
    url = config.url
    backend = backend_of(url)
    if backend == "redis":
        redis = RedisJobStore.from_url(url, prefix=config.redis_prefix, policy=lease_policy(config))  # type: ignore[arg-type]
        return redis, redis.outbox()
    if backend == "postgres":
        postgres = PostgresJobStore.from_url(url, policy=lease_policy(config))  # type: ignore[arg-type]
        return postgres, postgres.outbox()
    sqlite = SqliteJobStore(_sqlite_path(url, default_sqlite), lease_policy(config))
    return sqlite, sqlite.outbox()


def output_store_url(config: OutputSettings, store: StoreSettings) -> str | None:
    """The media store's URL: as configured, else the shared job store's, else None (files)."""
    if config.url:
        return config.url
    return store.url if is_shared(store.url) else None


def open_outputs(config: OutputSettings, store: StoreSettings, default_dir: Path) -> OutputStore:
    url = output_store_url(config, store)
    if url and url.startswith(REDIS_SCHEMES):
        return RedisOutputStore.from_url(url, prefix=store.redis_prefix,
                                         ttl_seconds=store.retention_seconds + MEDIA_TTL_MARGIN_SECONDS)
    if url and url.startswith(pgdb.POSTGRES_SCHEMES):
        return PostgresOutputStore.from_url(url, ttl_seconds=store.retention_seconds + MEDIA_TTL_MARGIN_SECONDS)
    if url and url.startswith("s3://"):
        from fluxserve.outputs.s3 import S3OutputStore  # boto3 is slow to import: only S3 setups pay

        return S3OutputStore.from_url(url, endpoint_url=config.s3_endpoint_url, region=config.s3_region,
                                      presign_seconds=config.s3_presign_seconds)
    if url:
        raise ValueError(f"Unsupported output store URL: {url!r} (use redis://..., postgresql://... or "
                         "s3://bucket/prefix)")
    return LocalOutputStore(default_dir)


def open_accounts(config: AccountSettings, store: StoreSettings, default_sqlite: Path) -> AccountStore:
    """`accounts_store` when set, else the job store (the default SQLite file included)."""
    url = config.store_url or store.url
    backend = backend_of(url)
    if backend == "redis":
        return RedisAccountStore.from_url(url, prefix=store.redis_prefix)  # type: ignore[arg-type]
    if backend == "postgres":
        return PostgresAccountStore.from_url(url)  # type: ignore[arg-type]
    return SqliteAccountStore(_sqlite_path(url, default_sqlite))


def open_presence(config: StoreSettings, default_sqlite: Path) -> Presence:
    """The workers' model adverts: where the jobs are."""
    url = config.url
    backend = backend_of(url)
    if backend == "redis":
        return RedisPresence.from_url(url, prefix=config.redis_prefix)  # type: ignore[arg-type]
    if backend == "postgres":
        return PostgresPresence.from_url(url)  # type: ignore[arg-type]
    return SqlitePresence(_sqlite_path(url, default_sqlite))


def open_all(settings: Settings) -> tuple[JobStore, Outbox, OutputStore, AccountStore]:
    jobs, outbox = open_jobs(settings.store, settings.sqlite_path)
    outputs = open_outputs(settings.outputs, settings.store, settings.outputs_dir)
    accounts = open_accounts(settings.accounts, settings.store, settings.sqlite_path)
    return jobs, outbox, outputs, accounts


def migrate_all(settings: Settings) -> dict[str, list[int]]:
    """Bring every PostgreSQL schema the settings name up to date (opening a store migrates it).
    Returns each component's schema versions applied by this call (empty: it was current)."""
    pgdb.applied_here.clear()
    jobs, _outbox, outputs, accounts = open_all(settings)
    presence = open_presence(settings.store, settings.sqlite_path)
    if isinstance(presence, PostgresPresence):  # made at first use otherwise: a rollout wants it now
        presence.ensure_table()
    for store in (jobs, accounts, outputs, presence):
        close = getattr(store, "close", None)
        if close is not None:
            close()
    return dict(pgdb.applied_here)


def describe(url: str | None, default_sqlite: Path) -> str:
    """Where a store URL puts its state, for a log line or a CLI message (no credentials)."""
    if not is_shared(url):
        return f"SQLite file {_sqlite_path(url, default_sqlite).resolve()}"
    return f"{backend_of(url)} store at {redact(url)}"  # type: ignore[arg-type]


def redact(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
