"""Webhooks per account: each account's default URL and signing secret, set with `fluxserve keys webhook`,
and the real app (in-process) signing each account's webhooks with that account's secret only."""

from __future__ import annotations

import sqlite3

import pytest
from standardwebhooks import Webhook
from test_webhooks import Receiver
from typer.testing import CliRunner

from fluxserve.accounts.sqlite import SqliteAccountStore
from fluxserve.cli import app as fluxserve_cli
from fluxserve.webhooks.signing import new_secret, secret_bytes

from support.accounts import accounts_of, create_key
from support.app import SLUG, running_app, shared_engine, wait_for, wait_status

TINY = {"positivePrompt": "a cat", "width": 128, "height": 128, "steps": 1}


def make_account(data_dir, name: str, webhook_url: str | None = None) -> tuple[str, str]:
    """(API key, webhook secret) of a new account, made with the same code as `fluxserve keys create`."""
    made = create_key(data_dir, name, webhook_url=webhook_url)
    return made.key, made.webhook_secret


def test_each_account_signs_with_its_own_secret(tmp_path, tiny_model):
    receiver = Receiver()  # answers 200 on every path but /hook and /redirect
    data = tmp_path / "data"
    key_a, secret_a = make_account(data, "a", webhook_url=receiver.url("/a-default"))
    key_b, secret_b = make_account(data, "b")
    operator_secret = new_secret()
    try:
        with (running_app(data, engine=shared_engine(tiny_model), model=str(tiny_model),
                          webhook_allow_private=True,  # the receiver is on loopback
                          webhook_secret=operator_secret, webhook_poll_seconds=0.2) as server,
              server.http(key_a) as as_a, server.http(key_b) as as_b):

            def submit(http, **extra):
                response = http.post(f"/v2/{SLUG}", json={**TINY, **extra})
                assert response.status_code == 200, response.text
                return response.json()["request_id"]

            by_default = submit(as_a)
            overridden = submit(as_a, webhook=receiver.url("/override"))
            unhooked = submit(as_b)  # b has no default URL: no webhook
            account_a = as_a.get("/v1/account").json()
            secrets_seen = [http.get("/v1/webhooks/default/secret").json()["key"] for http in (as_a, as_b)]
            wait_for(lambda: receiver.requests("/a-default") and receiver.requests("/override"),
                     what="both deliveries")
            assert wait_status(as_b, unhooked)["status"] == "COMPLETED"
            unhooked_result = as_b.get(f"/v2/requests/{unhooked}").json()
            server_log = server.log()
    finally:
        receiver.close()

    assert account_a["webhook_url"] == receiver.url("/a-default")
    assert secrets_seen == [secret_a, secret_b]
    assert len({secret_a, secret_b, operator_secret}) == 3
    for path, job in (("/a-default", by_default), ("/override", overridden)):
        (delivery,) = receiver.requests(path)
        assert Webhook(secret_a).verify(delivery["body"], delivery["headers"])["request_id"] == job
        for other in (secret_b, operator_secret):
            with pytest.raises(Exception, match="signature"):
                Webhook(other).verify(delivery["body"], delivery["headers"])
    assert sorted(r["path"] for r in receiver.received) == ["/a-default", "/override"]  # none for b
    assert "webhook" not in unhooked_result
    assert not any(secret in server_log for secret in (secret_a, secret_b, operator_secret))


def fluxserve_keys(data_dir, *args: str, allow_private: bool = False):
    """`fluxserve keys ...`, run through the CLI's own entry point (in this process)."""
    env = {"FLUXSERVE_DATA_DIR": str(data_dir), "FLUXSERVE_WEBHOOK_ALLOW_PRIVATE": "true" if allow_private else "false"}
    return CliRunner().invoke(fluxserve_cli, ["keys", *args], env=env, catch_exceptions=False)


def secret_in(output: str) -> str:
    (secret,) = [word for word in output.split() if word.startswith("whsec_")]
    secret_bytes(secret)  # a well-formed Standard Webhooks secret
    return secret


def test_keys_webhook_command(tmp_path):
    created = fluxserve_keys(tmp_path, "create", "--name", "alice")
    assert created.exit_code == 0, created.stderr
    first_secret = secret_in(created.stdout)

    refused = fluxserve_keys(tmp_path, "webhook", "alice", "--url", "http://127.0.0.1:9/hook")
    assert refused.exit_code != 0 and "loopback" in refused.stderr

    changed = fluxserve_keys(tmp_path, "webhook", "alice", "--url", "http://127.0.0.1:9/hook", "--rotate-secret",
                             allow_private=True)
    assert changed.exit_code == 0, changed.stderr
    assert "http://127.0.0.1:9/hook" in changed.stdout
    new_secret_shown = secret_in(changed.stdout)
    assert new_secret_shown != first_secret

    cleared = fluxserve_keys(tmp_path, "webhook", "alice", "--clear-url")
    assert cleared.exit_code == 0, cleared.stderr
    with accounts_of(tmp_path) as store:
        alice = store.find_account("alice")
    assert alice.webhook_url is None and alice.webhook_secret == new_secret_shown
    assert new_secret_shown not in repr(alice)  # accounts may be logged; their secrets may not


def test_accounts_made_before_webhook_settings_gain_them(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with SqliteAccountStore(path) as store:
        old = store.create_account("old", credits=0, rate_per_minute=0, max_in_flight=0, models=None)
    with sqlite3.connect(path) as db:  # the accounts table as it was before webhook settings
        db.execute("ALTER TABLE accounts DROP COLUMN webhook_url")
        db.execute("ALTER TABLE accounts DROP COLUMN webhook_secret")
    with SqliteAccountStore(path) as store:
        migrated = store.get_account(old.id)
        assert migrated.webhook_url is None
        secret_bytes(migrated.webhook_secret)
        assert store.set_webhook_url(old.id, "https://example.com/hook").webhook_url == "https://example.com/hook"
    with SqliteAccountStore(path) as store:  # opening again changes nothing
        assert store.get_account(old.id).webhook_secret == migrated.webhook_secret
