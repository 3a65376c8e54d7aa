"""A reply-dropping TCP proxy on loopback, for Redis (RESP) and PostgreSQL (the wire protocol v3).

Every request goes through to the server and runs there; a rule decides what becomes of its reply:

- passed on (no rule matches): the proxy is invisible;
- `lose`: the reply is swallowed and both connections are reset (RST): the client sees a reset
  connection after the server ran the command, as behind a flaky network;
- `hold`: the reply is swallowed and the connection kept open and silent for `hold_seconds` (past the
  client's timeout), then reset;
- `blackhole`: the request itself never reaches the server (a store that cannot be reached): the
  connection stays silent for `hold_seconds`, then is reset.

Rules match requests: a callable `Request -> bool`, or a string. For Redis a string names a command
(`GET`) or one of the project's Lua scripts (`CLAIM`, `FINISH`, `RESERVE`, ...: an EVALSHA is known
by its SHA, see `project_scripts`); for PostgreSQL a string is a part of the query text, and a COMMIT
carries the texts of its transaction (`Request.transaction`, see `commit_of`); `nth(n, match)` picks
the n-th one. A PostgreSQL request is everything the client sent up to a Sync (or one simple Query):
its reply ends with ReadyForQuery.

    proxy = StoreProxy.for_url(redis_url).start()
    rule = proxy.lose_next("CLAIM")           # the next claim runs, its reply is lost
    store = RedisJobStore.from_url(proxy.url, ...)
    ...
    rule.fired.wait(5); rule.hits              # what was lost
    proxy.lose_fraction(0.1, match=...)        # 10 % of matching replies, at random
    proxy.close()

The proxy runs an asyncio loop in a thread of its own; rules may be added and read from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Protocol = Literal["redis", "postgres"]
Action = Literal["lose", "hold", "blackhole"]

_PG_SSL_REQUEST = 80877103
_PG_GSSENC_REQUEST = 80877104
_PG_CANCEL_REQUEST = 80877102
_SUBSCRIBING = {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"}


def project_scripts() -> dict[str, str]:
    """The SHA1 of each of the project's Lua scripts (as `register_script` loads them) -> its name."""
    from fluxserve.accounts import redis_scripts as account_scripts
    from fluxserve.jobs import redis_scripts as job_scripts

    shas = {}
    for module in (job_scripts, account_scripts):
        for name in dir(module):
            body = getattr(module, name)
            if name.isupper() and name != "PRELUDE" and isinstance(body, str):
                shas[hashlib.sha1((module.PRELUDE + body).encode()).hexdigest()] = name
    return shas


@dataclass
class Request:
    """One request as the proxy saw it go to the server."""

    protocol: Protocol
    connection: int  # which client connection (numbered from 1)
    name: str  # Redis: the command (upper case); PostgreSQL: the first word of the last statement
    script: str | None = None  # Redis: the project's script an EVAL/EVALSHA runs
    args: list[bytes] = field(default_factory=list)  # Redis: the command; PostgreSQL: the bound parameters
    texts: list[str] = field(default_factory=list)  # PostgreSQL: the statements' texts, in order
    transaction: list[str] = field(default_factory=list)  # PostgreSQL: earlier statements of its transaction

    @property
    def text(self) -> str:
        if self.protocol == "postgres":
            return "\n".join(self.texts)
        return " ".join(arg.decode(errors="replace") for arg in self.args[:3])

    def __str__(self) -> str:
        what = self.script or self.text
        return f"#{self.connection} {what[:120]!r}"


def nth(n: int, match: Callable[[Request], bool] = lambda r: True) -> Callable[[Request], bool]:
    """The `n`-th request (from 1) that `match` accepts, and no other."""
    seen = itertools.count(1)
    return lambda r: match(r) and next(seen) == n


def commit_of(part: str) -> Callable[[Request], bool]:
    """PostgreSQL: the COMMIT of a transaction that ran a statement containing `part`."""
    return lambda r: r.name == "COMMIT" and any(part in text for text in r.transaction)


class Rule:
    """What becomes of the replies to matching requests: `times` of them (None: any number), each with
    probability `fraction`. `hits` are the requests whose replies it took; `fired` is set once the
    first of them has been swallowed and its connection reset."""

    def __init__(self, match: Callable[[Request], bool], action: Action, *, times: int | None = 1,
                 fraction: float = 1.0, hold_seconds: float = 0.0, seed: int | None = None,
                 description: str = "") -> None:
        self.match = match
        self.action = action
        self.times = times
        self.fraction = fraction
        self.hold_seconds = hold_seconds
        self.description = description
        self.hits: list[Request] = []
        self.fired = threading.Event()
        self._random = random.Random(seed)

    def takes(self, request: Request) -> bool:
        if self.times is not None and len(self.hits) >= self.times:
            return False
        if not self.match(request):
            return False
        if self.fraction < 1.0 and self._random.random() >= self.fraction:
            return False
        self.hits.append(request)
        return True

    @property
    def spent(self) -> bool:
        return self.times is not None and len(self.hits) >= self.times

    def __repr__(self) -> str:
        return f"Rule({self.description!r}, {self.action}, hits={len(self.hits)})"


@dataclass
class _Pending:
    request: Request | None  # None: a reply the proxy passes on whatever (connection set-up)
    rule: Rule | None = None


class StoreProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme.startswith("redis"):
            self.protocol: Protocol = "redis"
        elif parts.scheme.startswith("postgres"):
            self.protocol = "postgres"
        else:
            raise ValueError(f"no proxy for {upstream_url!r}")
        self.upstream_url = upstream_url
        self.host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or (6379 if self.protocol == "redis" else 5432)
        self.port = 0
        self.scripts = project_scripts() if self.protocol == "redis" else {}
        self.requests = 0  # how many requests went through
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="store-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._serving: set[asyncio.Task] = set()

    @classmethod
    def for_url(cls, upstream_url: str) -> StoreProxy:
        return cls(upstream_url)

    @property
    def url(self) -> str:
        """The upstream URL with the proxy's address in place of the server's."""
        parts = urlsplit(self.upstream_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- rules ---------------------------------------------------------------------------------

    def _add(self, match: str | Callable[[Request], bool], action: Action, **options) -> Rule:
        rule = Rule(self._matcher(match), action, description=match if isinstance(match, str) else "", **options)
        with self._lock:
            self._rules.append(rule)
        return rule

    def _matcher(self, match: str | Callable[[Request], bool]) -> Callable[[Request], bool]:
        if callable(match):
            return match
        if self.protocol == "redis":
            wanted = match.upper()
            return lambda r: r.script == wanted or (r.script is None and r.name == wanted)
        return lambda r: any(match in text for text in r.texts)

    def lose_next(self, match: str | Callable[[Request], bool], times: int = 1) -> Rule:
        """The replies to the next `times` matching requests are lost (the connection is reset)."""
        return self._add(match, "lose", times=times)

    def hold_next(self, match: str | Callable[[Request], bool], seconds: float, times: int = 1) -> Rule:
        """The replies to the next `times` matching requests are held `seconds`, then the connection is reset."""
        return self._add(match, "hold", times=times, hold_seconds=seconds)

    def blackhole_next(self, match: str | Callable[[Request], bool], seconds: float,
                       times: int | None = 1) -> Rule:
        """The next `times` matching requests never reach the server; each connection is silent for
        `seconds` (or until the client gives up), then reset."""
        return self._add(match, "blackhole", times=times, hold_seconds=seconds)

    def lose_fraction(self, fraction: float, match: str | Callable[[Request], bool] = lambda r: True,
                      seed: int | None = None) -> Rule:
        """Each matching request's reply is lost with probability `fraction`, for as long as the rule stands."""
        return self._add(match, "lose", times=None, fraction=fraction, seed=seed)

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _decide(self, request: Request) -> Rule | None:
        with self._lock:
            self.requests += 1
            for rule in self._rules:
                if rule.takes(request):
                    return rule
        return None

    # -- running -------------------------------------------------------------------------------

    def start(self) -> StoreProxy:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._serving:  # each ends once its connections are gone
                await asyncio.wait(list(self._serving), timeout=5)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> StoreProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            _reset(client_writer)
            return
        self._writers |= {client_writer, upstream_writer}
        link = _Link(self, number, client_writer, upstream_writer)
        pumps = [asyncio.ensure_future(link.requests(client_reader)),
                 asyncio.ensure_future(link.replies(upstream_reader))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            link.client_gone.set()
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()
                self._writers.discard(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0), as a connection that broke."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection: requests are parsed as they go up, replies
    as they come back, each reply paired with its request (first in, first out)."""

    def __init__(self, proxy: StoreProxy, number: int, client: asyncio.StreamWriter,
                 upstream: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.upstream = upstream
        self.pending: deque[_Pending] = deque()
        self.passthrough = False  # pub/sub or TLS: replies no longer pair with requests
        self.client_gone = asyncio.Event()
        self.blackholed: Rule | None = None  # a request went no further: nothing more goes up
        # PostgreSQL state
        self.startup = True
        self.raw_replies = 0  # one-byte answers owed to SSLRequest / GSSENCRequest
        self.statements: dict[str, str] = {}
        self.group: list[str] = []  # statement texts since the last Sync
        self.group_args: list[bytes] = []  # their bound parameters (as sent: text or binary)
        self.transaction: list[str] = []  # texts of the open transaction's requests
        self.upstream_started = False

    # -- client -> server ----------------------------------------------------------------------

    async def requests(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                self.client_gone.set()
                return
            if not self.passthrough:
                buffer += chunk
                buffer = self._parse_redis_requests(buffer) if self.proxy.protocol == "redis" \
                    else self._parse_pg_requests(buffer)
            if self.blackholed is not None:  # its last bytes are in this chunk: the server never runs it
                await self._drop(self.blackholed)
                return
            self.upstream.write(chunk)
            await self.upstream.drain()

    def _request(self, request: Request) -> None:
        if self.blackholed is not None:
            return
        rule = self.proxy._decide(request)
        if rule is not None and rule.action == "blackhole":
            self.blackholed = rule
            return
        self.pending.append(_Pending(request, rule))

    def _parse_redis_requests(self, buffer: bytes) -> bytes:
        while buffer:
            parsed = _resp_command(buffer)
            if parsed is None:
                return buffer
            args, end = parsed
            buffer = buffer[end:]
            if not args:
                continue
            name = args[0].upper()
            script = None
            if name == b"EVALSHA" and len(args) > 1:
                script = self.proxy.scripts.get(args[1].decode(errors="replace").lower())
            elif name == b"EVAL" and len(args) > 1:
                script = self.proxy.scripts.get(hashlib.sha1(args[1]).hexdigest())
            self._request(Request("redis", self.number, name.decode(errors="replace"), script, args))
            if name in _SUBSCRIBING:
                self.passthrough = True  # from here on the server pushes messages
                return b""
        return buffer

    def _parse_pg_requests(self, buffer: bytes) -> bytes:
        while True:
            if self.startup:  # untyped: length, then a code
                if len(buffer) < 8:
                    return buffer
                (length,) = struct.unpack("!i", buffer[:4])
                if len(buffer) < length:
                    return buffer
                (code,) = struct.unpack("!i", buffer[4:8])
                buffer = buffer[length:]
                if code in (_PG_SSL_REQUEST, _PG_GSSENC_REQUEST):
                    self.raw_replies += 1
                elif code != _PG_CANCEL_REQUEST:
                    self.startup = False
                continue
            if len(buffer) < 5:
                return buffer
            kind = buffer[:1]
            (length,) = struct.unpack("!i", buffer[1:5])
            if len(buffer) < 1 + length:
                return buffer
            body, buffer = buffer[5:1 + length], buffer[1 + length:]
            if kind == b"Q":
                self._pg_request([body.rstrip(b"\0").decode(errors="replace")])
            elif kind == b"P":
                name, _, rest = body.partition(b"\0")
                self.statements[name.decode(errors="replace")] = rest.partition(b"\0")[0].decode(errors="replace")
            elif kind == b"B":
                _portal, statement, rest = body.split(b"\0", 2)
                self.group.append(self.statements.get(statement.decode(errors="replace"), ""))
                self.group_args += _bind_parameters(rest)
            elif kind == b"S":
                self._pg_request(self.group, self.group_args)
                self.group, self.group_args = [], []

    def _pg_request(self, texts: list[str], args: list[bytes] | None = None) -> None:
        words = (texts[-1].split() or [""]) if texts else [""]
        request = Request("postgres", self.number, words[0].upper(), args=list(args or []), texts=list(texts),
                          transaction=list(self.transaction))
        self.transaction += texts
        self._request(request)

    # -- server -> client ----------------------------------------------------------------------

    async def replies(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            if self.passthrough:
                self.client.write(buffer + chunk)
                buffer = b""
                await self.client.drain()
                continue
            buffer += chunk
            while True:
                unit = self._next_reply(buffer)
                if unit is None:
                    break
                end, complete = unit
                data, buffer = buffer[:end], buffer[end:]
                head = self.pending[0] if self.pending else None
                if head is not None and head.rule is not None:
                    if complete:  # the whole reply is in: the server has run the request
                        self.pending.popleft()
                        await self._drop(head.rule)
                        return
                    continue  # swallowed
                if complete and head is not None:
                    self.pending.popleft()
                self.client.write(data)
                if self.passthrough:
                    self.client.write(buffer)
                    buffer = b""
                    break
            await self.client.drain()

    def _next_reply(self, buffer: bytes) -> tuple[int, bool] | None:
        """(end of the next unit, whether it completes the reply to the oldest request), or None."""
        if not buffer:
            return None
        if self.proxy.protocol == "redis":
            if buffer[:1] == b">":  # a RESP3 push: no request's reply
                end = _resp_end(buffer, 0)
                return None if end is None else (end, False)
            end = _resp_end(buffer, 0)
            return None if end is None else (end, True)
        if self.raw_replies:  # the answer to SSLRequest / GSSENCRequest: one byte
            self.raw_replies -= 1
            if buffer[:1] in (b"S", b"G"):  # encrypted from here on: nothing more to see
                self.passthrough = True
            return 1, False
        if len(buffer) < 5:
            return None
        (length,) = struct.unpack("!i", buffer[1:5])
        if len(buffer) < 1 + length:
            return None
        if buffer[:1] != b"Z":
            return 1 + length, False
        if buffer[5:6] == b"I":  # idle again: the transaction (if any) is over
            self.transaction = []
        if not self.upstream_started:  # the first ReadyForQuery ends the start-up, no request's reply
            self.upstream_started = True
            return 1 + length, False
        return 1 + length, True

    async def _drop(self, rule: Rule) -> None:
        try:
            if rule.action in ("hold", "blackhole"):  # silent until the client gives up (or the hold ends)
                await asyncio.wait_for(self.client_gone.wait(), rule.hold_seconds)
        except TimeoutError:
            pass
        finally:
            _reset(self.client)
            _reset(self.upstream)
            rule.fired.set()


def _bind_parameters(rest: bytes) -> list[bytes]:
    """The parameter values of a Bind message, after its portal and statement names."""
    try:
        (formats,) = struct.unpack("!h", rest[:2])
        position = 2 + 2 * formats
        (count,) = struct.unpack("!h", rest[position:position + 2])
        position += 2
        values = []
        for _ in range(count):
            (size,) = struct.unpack("!i", rest[position:position + 4])
            position += 4
            if size >= 0:
                values.append(rest[position:position + size])
                position += size
        return values
    except struct.error:
        return []


def _resp_command(buffer: bytes) -> tuple[list[bytes], int] | None:
    """One command (a RESP array of bulk strings, or an inline command) and where it ends, or None."""
    if buffer[:1] != b"*":
        end = buffer.find(b"\r\n")
        return None if end < 0 else (buffer[:end].split(), end + 2)
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    count = int(buffer[1:end])
    position, args = end + 2, []
    for _ in range(max(count, 0)):
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        size = int(buffer[position + 1:end])
        start = end + 2
        if len(buffer) < start + size + 2:
            return None
        args.append(buffer[start:start + size])
        position = start + size + 2
    return args, position


def _resp_end(buffer: bytes, position: int) -> int | None:
    """Where the RESP2/RESP3 value starting at `position` ends, or None while it is incomplete."""
    owed = 1
    while owed:
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        kind, head = buffer[position:position + 1], buffer[position + 1:end]
        position, owed = end + 2, owed - 1
        if kind in (b"$", b"!", b"="):
            size = int(head)
            if size >= 0:
                if len(buffer) < position + size + 2:
                    return None
                position += size + 2
        elif kind in (b"*", b"~", b">"):
            owed += max(int(head), 0)
        elif kind in (b"%", b"|"):
            owed += 2 * max(int(head), 0)
    return position
