"""The webhook SSRF guard: which URLs may receive webhooks. Only literal addresses are used and nothing
connects: `check_url` parses and resolves (numeric hosts only, enforced below), it never sends."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from fluxserve.webhooks.targets import MAX_URL_LENGTH, WebhookTargetError, check_url, refusal_reason

REFUSED = [
    # loopback spelled every way the resolver accepts
    ("http://127.0.0.1/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0177.0.0.1/", "loopback"),  # octal
    ("http://0x7f.1/", "loopback"),  # hex, short form
    ("http://127.1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://0.0.0.0/", None),
    ("http://[::]/", None),
    # private, link-local (cloud metadata), shared, multicast, reserved IPv4
    ("http://10.0.0.1/", None),
    ("http://192.168.1.1:8080/", None),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://100.64.0.1/", None),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", None),
    ("http://255.255.255.255/", None),
    # IPv6 private, link-local, multicast, documentation
    ("http://[fc00::1]/", None),
    ("http://[fe80::1]/", "link-local"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[2001:db8::1]/", None),
    ("http://[3fff::1]/", None),
    ("http://[fec0::1]/", None),  # deprecated site-local
    # IPv4 inside IPv6
    ("http://[::ffff:127.0.0.1]/", "loopback"),  # mapped: judged as the IPv4
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[::ffff:10.1.2.3]/", None),
    ("http://[::127.0.0.1]/", None),  # IPv4-compatible (deprecated)
    ("http://[::5db8:d70e]/", None),
    ("http://[2002:7f00:1::]/", "6to4"),  # 6to4 of 127.0.0.1
    ("http://[2002:a9fe:a9fe::]/", "6to4"),  # 6to4 of 169.254.169.254
    ("http://[2002:5db8:d70e::1]/", "6to4"),  # 6to4 of a public IPv4: the range is refused outright
    ("http://[64:ff9b::7f00:1]/", None),  # NAT64 of 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", None),
    ("http://[64:ff9b:1::a9fe:a9fe]/", None),  # local-use NAT64
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", None),  # Teredo (client 127.0.0.1)
    ("http://[2001::5db8:d70e:0:0:0]/", None),
    # userinfo and fragment tricks: the host is the one after '@', before '#'
    ("http://public.example@127.0.0.1/", "credentials"),
    ("http://user:pass@93.184.215.14/", "credentials"),
    ("http://127.0.0.1#@example.com/", "loopback"),
    ("http://127.0.0.1\\@example.com/", None),
    # schemes, shape
    ("file:///etc/passwd", "http or https"),
    ("gopher://127.0.0.1:6379/_INFO", "http or https"),
    ("ftp://93.184.215.14/", "http or https"),
    ("javascript:alert(1)", "http or https"),
    ("//93.184.215.14/hook", "http or https"),
    ("http:///hook", "no host"),
    ("http://", "no host"),
    ("https://:443/", "no host"),
    ("http://93.184.215.14:99999/", "not a valid URL"),
    ("", "at most"),
    ("http://93.184.215.14/" + "a" * MAX_URL_LENGTH, "at most"),
]

ACCEPTED = [
    "http://93.184.215.14/hook",
    "https://93.184.215.14:8443/hooks?x=1",
    "https://[2606:4700::1111]/",
    "http://[::ffff:93.184.215.14]/hook",  # mapped public IPv4: the same address
]


@pytest.fixture(autouse=True)
def numeric_hosts_only(monkeypatch):
    """Resolution stays local: any host name that is not a literal address fails instead of asking DNS."""
    real = socket.getaddrinfo

    def numeric(host, port, family=0, type=0, proto=0, flags=0):
        return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", numeric)


@pytest.mark.parametrize(("url", "reason"), REFUSED + [(url, "ACCEPT") for url in ACCEPTED])
def test_webhook_targets(url, reason):
    if reason == "ACCEPT":
        check_url(url, allow_private=False)
        return
    with pytest.raises(WebhookTargetError) as excinfo:
        check_url(url, allow_private=False)
    if reason:
        assert reason in str(excinfo.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://[::1]/", "http://10.0.0.1/",
                                 "http://[2002:7f00:1::]/"])
def test_allow_private_lets_local_receivers_through(url):
    check_url(url, allow_private=True)


def test_refusal_reason_judges_the_embedded_ipv4():
    assert refusal_reason(ipaddress.ip_address("::ffff:169.254.169.254")) == "a link-local address"
    assert refusal_reason(ipaddress.ip_address("::ffff:93.184.215.14")) is None
    assert refusal_reason(ipaddress.ip_address("2002:7f00:1::")) is not None
