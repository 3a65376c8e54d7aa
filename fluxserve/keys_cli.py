"""`fluxserve keys create | list | revoke | top-up | webhook`: accounts, their API keys and webhook
settings, on the server's store."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from fluxserve.accounts import Account
from fluxserve.accounts.keys import key_id_of
from fluxserve.accounts.money import to_credits, to_micros
from fluxserve.app.access import Access
from fluxserve.config import Settings
from fluxserve.stores import describe, open_accounts
from fluxserve.webhooks.targets import WebhookTargetError, check_url

keys_app = typer.Typer(no_args_is_help=True, help="API keys, accounts and credits.")

DataDir = Annotated[Path | None, typer.Option(help="The server's data dir [env FLUXSERVE_DATA_DIR]")]
_PER = {"s": 60.0, "sec": 60.0, "min": 1.0, "m": 1.0, "h": 1 / 60, "hour": 1 / 60}


def parse_rate(text: str) -> float:
    """'60/min', '2/s', '100/h' or a bare number (per minute) -> requests per minute; 0 = unlimited."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([a-z]+))?\s*", text.lower())
    if not match or (match.group(2) and match.group(2) not in _PER):
        raise typer.BadParameter(f"{text!r}: use N/min, N/s or N/h (0 = unlimited)")
    return float(match.group(1)) * _PER[match.group(2) or "min"]


@contextmanager
def open_access(data_dir: Path | None) -> Iterator[Access]:
    """The server's accounts, as `serve` opens them (same settings, same store), saying which store:
    with a shared store no data dir is needed; with the SQLite default it is the data dir `serve` uses."""
    settings = Settings().with_overrides(data_dir=data_dir)
    typer.echo(f"accounts: {describe(settings.accounts.store_url or settings.store.url, settings.sqlite_path)}",
               err=True)
    with access_for(settings) as access:
        yield access


@contextmanager
def access_for(settings: Settings) -> Iterator[Access]:
    store = open_accounts(settings.accounts, settings.store, settings.sqlite_path)
    try:
        yield Access(settings.accounts, store, host=settings.host, data_dir=settings.data_dir)
    finally:
        store.close()


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Account name (an existing account gets an extra key)")],
    credits: Annotated[float | None, typer.Option(min=0, help="Opening balance in credits (new account)")] = None,
    rate: Annotated[
        str | None, typer.Option(help="Generation requests per key: N/min, N/s, N/h; 0 = unlimited")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(min=0, help="Jobs in flight per key; 0 = unlimited")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated model slugs allowed (default: all)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an account and an API key (shown once), or another key for an existing account."""
    with open_access(data_dir) as access:
        account = access.store.find_account(name)
        if account is None:
            try:
                account = access.store.create_account(
                    name,
                    credits=to_micros(credits or 0),
                    rate_per_minute=parse_rate(rate) if rate is not None else 60.0,
                    max_in_flight=concurrency if concurrency is not None else 4,
                    models=tuple(filter(None, (slug.strip() for slug in models.split(",")))) if models else None,
                )
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
            typer.echo(f"Created account {name}: {_describe(account)}")
            typer.echo(f"Webhook signing secret (also shown by `fluxserve keys webhook {name}`):")
            typer.echo(account.webhook_secret)
        elif any(option is not None for option in (credits, rate, concurrency, models)):
            raise typer.BadParameter(
                f"account {name!r} exists; it keeps its settings (add credits with `fluxserve keys top-up`)"
            )
        record, key = access.keyring.issue(account.id)
        typer.echo(f"New API key {record.id} for {name}. It is shown only now; keep it secret:")
        typer.echo(key)


@keys_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    data_dir: DataDir = None,
) -> None:
    """Accounts with their balances and limits, and their keys (ids only)."""
    with open_access(data_dir) as access:
        accounts = access.store.list_accounts()
        keys = access.store.list_keys()
    rows: list[dict[str, Any]] = [
        {
            "name": account.name,
            "balance": to_credits(account.balance),
            "reserved": to_credits(account.reserved),
            "requests_per_minute": account.rate_per_minute,
            "jobs_in_flight": account.max_in_flight,
            "models": list(account.models) if account.models is not None else None,
            "webhook_url": account.webhook_url,
            "keys": [
                {"id": key.id, "created_at": key.created_at, "revoked": key.revoked_at is not None}
                for key in keys if key.account_id == account.id
            ],
        }
        for account in accounts
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("No accounts yet: `fluxserve keys create --name NAME --credits N`")
    for account, row in zip(accounts, rows, strict=False):
        typer.echo(f"{row['name']}: {_describe(account)}")
        for key in row["keys"]:
            created = datetime.fromtimestamp(key["created_at"]).isoformat(timespec="seconds")
            typer.echo(f"  key {key['id']}  created {created}{'  REVOKED' if key['revoked'] else ''}")


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The key's id (from `keys list`) or the whole key")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key: it answers 401 from now on."""
    key_id = key_id_of(key) or key
    with open_access(data_dir) as access:
        if access.store.get_key(key_id) is None:
            raise typer.BadParameter(f"no key {key_id!r}")
        if access.store.revoke_key(key_id):
            typer.echo(f"Revoked key {key_id}")
        else:
            typer.echo(f"Key {key_id} was already revoked")


@keys_app.command("top-up")
def top_up(
    name: Annotated[str, typer.Argument(help="Account name")],
    credits: Annotated[float, typer.Option(help="Credits to add (> 0)")],
    note: Annotated[str | None, typer.Option(help="Kept in the ledger")] = None,
    data_dir: DataDir = None,
) -> None:
    """Add credits to an account."""
    if credits <= 0:
        raise typer.BadParameter("--credits must be positive")
    with open_access(data_dir) as access:
        account = _account_named(access, name)
        account = access.store.top_up(account.id, to_micros(credits), note)
        typer.echo(f"{name}: {_describe(account)}")


@keys_app.command("webhook")
def webhook(
    name: Annotated[str, typer.Argument(help="Account name")],
    url: Annotated[str | None, typer.Option(help="Default webhook URL for the account's requests")] = None,
    clear_url: Annotated[bool, typer.Option("--clear-url", help="Remove the default webhook URL")] = False,
    rotate_secret: Annotated[bool, typer.Option("--rotate-secret", help="Replace the signing secret")] = False,
    data_dir: DataDir = None,
) -> None:
    """Show or change an account's webhook settings: its default URL and its signing secret."""
    if url is not None and clear_url:
        raise typer.BadParameter("give --url or --clear-url, not both")
    with open_access(data_dir) as access:
        account = _account_named(access, name)
        if url is not None:
            try:
                check_url(url, allow_private=Settings().webhooks.allow_private)
            except WebhookTargetError as exc:
                raise typer.BadParameter(str(exc)) from None
        if url is not None or clear_url:
            account = access.store.set_webhook_url(account.id, url)
        if rotate_secret:
            account = access.store.rotate_webhook_secret(account.id)
            typer.echo("New signing secret; webhooks are signed with it from now on.")
    typer.echo(f"{name}: default webhook {account.webhook_url or 'none (only where a request names one)'}")
    typer.echo(f"signing secret: {account.webhook_secret}")


def _account_named(access: Access, name: str) -> Account:
    account = access.store.find_account(name)
    if account is None:
        raise typer.BadParameter(f"no account named {name!r}")
    return account


def _describe(account) -> str:
    rate = f"{account.rate_per_minute:g} requests/min" if account.rate_per_minute else "no rate limit"
    in_flight = f"{account.max_in_flight} jobs in flight" if account.max_in_flight else "no limit on jobs in flight"
    models = ", ".join(account.models) if account.models is not None else "all models"
    return (f"balance {to_credits(account.balance):g} credits ({to_credits(account.reserved):g} reserved), "
            f"{rate}, {in_flight}, {models}")
