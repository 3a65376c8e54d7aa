"""Opening the configured stores: jobs and their outbox, output media, accounts.

A URL picks the backend: `sqlite:///path` (the default: files under the data dir), `redis://...`,
`s3://bucket/prefix` for media.
"""

from __future__ import annotations

from pathlib import Path

from fluxserve.accounts import AccountStore
from fluxserve.accounts.sqlite import SqliteAccountStore
from fluxserve.config import AccountSettings, OutputSettings, Settings, StoreSettings
from fluxserve.jobs import JobStore
from fluxserve.jobs.outbox import Outbox
from fluxserve.jobs.policy import LeasePolicy
from fluxserve.jobs.redis import RedisJobStore
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.outputs import OutputStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.outputs.redis import RedisOutputStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Media outlive their job's record by this margin; the janitor normally deletes them first.
MEDIA_TTL_MARGIN_SECONDS = 3600


def lease_policy(config: StoreSettings) -> LeasePolicy:
    return LeasePolicy(config.lease_seconds, config.max_attempts, config.retention_seconds,
                       config.reclaim_backoff_seconds)


def open_jobs(config: StoreSettings, default_sqlite: Path) -> tuple[JobStore, Outbox]:
    url = config.url
    if url is None or url.startswith("sqlite://"):
        path = url.removeprefix("sqlite:///") if url else default_sqlite
        sqlite = SqliteJobStore(path, lease_policy(config))
        return sqlite, sqlite.outbox()
    if url.startswith(REDIS_SCHEMES):
        redis = RedisJobStore.from_url(url, prefix=config.redis_prefix, policy=lease_policy(config))
        return redis, redis.outbox()
    raise ValueError(f"Unsupported job store URL: {url!r} (use sqlite:///path/to/file or redis://host:port/db)")


def open_outputs(config: OutputSettings, store: StoreSettings, default_dir: Path) -> OutputStore:
    url = config.url
    if url and url.startswith(REDIS_SCHEMES):
        return RedisOutputStore.from_url(url, prefix=store.redis_prefix,
                                         ttl_seconds=store.retention_seconds + MEDIA_TTL_MARGIN_SECONDS)
    if url and url.startswith("s3://"):
        from fluxserve.outputs.s3 import S3OutputStore  # boto3 is slow to import: only S3 setups pay

        return S3OutputStore.from_url(url, endpoint_url=config.s3_endpoint_url, region=config.s3_region,
                                      presign_seconds=config.s3_presign_seconds)
    if url:
        raise ValueError(f"Unsupported output store URL: {url!r} (use redis://... or s3://bucket/prefix)")
    return LocalOutputStore(default_dir)


def open_accounts(config: AccountSettings, store: StoreSettings, default_sqlite: Path) -> AccountStore:
    """`accounts_store` when set; else the jobs' SQLite file (or the default one beside other stores)."""
    url = config.store_url or store.url
    if url and url.startswith("sqlite://"):
        return SqliteAccountStore(url.removeprefix("sqlite:///"))
    if config.store_url:
        raise ValueError(f"Unsupported accounts store URL: {url!r} (use sqlite:///path/to/file)")
    return SqliteAccountStore(default_sqlite)


def open_all(settings: Settings) -> tuple[JobStore, Outbox, OutputStore, AccountStore]:
    jobs, outbox = open_jobs(settings.store, settings.sqlite_path)
    outputs = open_outputs(settings.outputs, settings.store, settings.outputs_dir)
    accounts = open_accounts(settings.accounts, settings.store, settings.sqlite_path)
    return jobs, outbox, outputs, accounts
