"""Where webhooks may go: http(s) URLs whose host resolves only to public addresses (SSRF guard).

A URL is checked when it is submitted (a clear 400) and again at every connection: the guarded
transport resolves the host itself, refuses any non-public address and connects to the address it
checked, so a DNS answer that changes between the two checks (rebinding) still cannot reach a
loopback or private service. Redirects are never followed, and environment proxies are ignored.
The operator can allow loopback/private targets (`webhook_allow_private`), e.g. for a receiver on the
same host.
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from urllib.parse import urlsplit

import httpcore
import httpx

MAX_URL_LENGTH = 2048


class WebhookTargetError(ValueError):
    """The URL may not receive webhooks; the message says why."""


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse what is not an absolute http(s) URL to a permitted host (resolving the host once)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise WebhookTargetError(f"webhook must be an http(s) URL of at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookTargetError("webhook is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookTargetError("webhook must be an http or https URL")
    if not parts.hostname:
        raise WebhookTargetError("webhook URL has no host")
    if parts.username or parts.password:
        raise WebhookTargetError("webhook URL must not carry credentials")
    if not allow_private:
        resolve_permitted(parts.hostname, port or (443 if parts.scheme == "https" else 80))


def resolve_permitted(host: str, port: int) -> list[str]:
    """The host's addresses, all of them public; WebhookTargetError when any is not (or none resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise WebhookTargetError(f"webhook host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        reason = refusal_reason(ipaddress.ip_address(address.split("%", 1)[0]))
        if reason:
            raise WebhookTargetError(
                f"webhook host {host!r} is {reason} ({address}); only public addresses may receive webhooks"
            )
    return addresses


# IPv6 ranges refused whatever they carry. 6to4, NAT64 and Teredo addresses embed an IPv4 address that a
# relay or translator turns into the real destination; rather than second-guess the relay, these ranges
# are refused outright (a webhook receiver has a native address; a host behind DNS64 that must reach
# an IPv4-only receiver needs `webhook_allow_private`). IPv4-compatible addresses are deprecated and
# never routed. The list does not rely on the `ipaddress` flags, which differ between
# Python versions for these ranges.
_REFUSED_V6 = tuple(
    (ipaddress.IPv6Network(network), reason)
    for network, reason in (
        ("::/96", "an IPv4-compatible address"),
        ("64:ff9b::/96", "a NAT64 address"),
        ("64:ff9b:1::/48", "a NAT64 address"),
        ("2001::/32", "a Teredo address"),
        ("2002::/16", "a 6to4 address"),
        ("3fff::/20", "a documentation address"),
        ("fec0::/10", "a site-local address"),
    )
)


def refusal_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the address may not receive webhooks, or None when it is globally routable."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket: judge that
    for attribute, reason in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_private", "a private address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_unspecified", "an unspecified address"),
    ):
        if getattr(ip, attribute):
            return reason
    if isinstance(ip, ipaddress.IPv6Address):
        for network, reason in _REFUSED_V6:
            if ip in network:
                return reason
    if not ip.is_global:
        return "not a public address"
    return None


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses that passed the check (the check and the connect use one lookup)."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve_permitted(host, port)
        except WebhookTargetError as exc:
            raise httpcore.ConnectError(str(exc)) from None
        last_error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
        raise last_error or httpcore.ConnectError(f"cannot connect to {host}")


def webhook_client(*, allow_private: bool, timeout: float) -> httpx.Client:
    """An HTTP client for deliveries: no redirects, no environment proxies, guarded connections."""
    transport = httpx.HTTPTransport(trust_env=False)
    if not allow_private:
        # httpx has no public hook for the network backend; its transport delegates to this pool.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), network_backend=_GuardedBackend()
        )
    return httpx.Client(
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        timeout=timeout,
        headers={"User-Agent": "fluxserve-webhooks"},
    )
