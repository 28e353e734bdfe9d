"""The lab client: sockets from a chosen loopback source, raw HTTP, WebSockets (plain or TLS), and
DnsClient: clients that find the service through the lab's DNS, keep to its TTL, and count what
failed per load balancer address."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from websockets.asyncio.client import connect as ws_connect


def dial(address: str, port: int, source: str = "127.0.0.1", preface: bytes = b"") -> socket.socket:
    """A TCP connection from `source`, with `preface` (a PROXY header) already sent."""
    sock = socket.create_connection((address, port), timeout=5, source_address=(source, 0))
    if preface:
        sock.sendall(preface)
    return sock


def http_get(sock: socket.socket, host: str, path: str = "/", headers: dict | None = None):
    """One HTTP/1.1 GET over `sock`; returns (status, headers, body) or raises on a closed socket."""
    conn = http.client.HTTPConnection(host, timeout=5)
    conn.sock = sock
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def raw_exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send `data`, read until the peer closes (or 5 s): what came back."""
    sock.sendall(data)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return b"".join(chunks)


def ws_hello(sock: socket.socket, host: str, headers: dict | None = None,
             tls: ssl.SSLContext | None = None) -> tuple[dict, str]:
    """Open a WebSocket over `sock` (TLS with `tls`), return the app's first message and one echo.

    The asyncio client: websockets' threaded client reads and writes one TLS socket from two
    threads, which now and then loses a handshake over TLS.
    """
    return asyncio.run(_hello(sock, host, headers or {}, tls))


async def _hello(sock: socket.socket, host: str, headers: dict, tls: ssl.SSLContext | None) -> tuple[dict, str]:
    sock.setblocking(False)
    scheme = "wss" if tls else "ws"
    async with ws_connect(f"{scheme}://{host}/ws", sock=sock, additional_headers=headers, ssl=tls,
                          open_timeout=5, close_timeout=2) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))  # type: ignore[arg-type]
        await ws.send("ping-echo")
        return hello, await asyncio.wait_for(ws.recv(), 5)  # type: ignore[arg-type]


# --- clients that find the service through DNS ---------------------------------------------------

@dataclass(frozen=True)
class Result:
    """One request: when it started (time.monotonic()), where it went, how it ended."""

    at: float
    address: str  # the address the name resolved to ("dns": the name did not resolve)
    kind: str  # "https", "ws" or "http"
    ok: bool
    error: str | None = None  # the exception's type and message
    client_ip: str | None = None  # what the app saw (https, ws)


@dataclass
class HeldSocket:
    """A WebSocket held open: where it went, when it opened and closed (time.monotonic()), why."""

    address: str
    opened: float
    closed: float | None = None
    reason: str | None = None  # None while open; "stopped": stop() closed it; "done": its time was up
    echoes: int = 0

    @property
    def open(self) -> bool:
        return self.closed is None

    @property
    def dropped(self) -> bool:
        """The server or the network ended it (not the client)."""
        return self.closed is not None and self.reason not in ("stopped", "done")

    def open_at(self, t: float) -> bool:
        return self.opened <= t and (self.closed is None or self.closed > t)


@dataclass
class Stats:
    results: list[Result] = field(default_factory=list)
    resolved: list[tuple[float, str, int]] = field(default_factory=list)  # (when, address, ttl)
    held: list[HeldSocket] = field(default_factory=list)

    def ok(self, address: str | None = None, since: float = 0.0) -> int:
        return sum(1 for r in self.results if r.ok and r.at >= since and address in (None, r.address))

    def failed(self, address: str | None = None, since: float = 0.0) -> int:
        return sum(1 for r in self.results if not r.ok and r.at >= since and address in (None, r.address))

    def addresses(self) -> list[str]:
        """Every address a request or a held WebSocket went to, in the order first seen."""
        seen = dict.fromkeys([*(r.address for r in self.results), *(h.address for h in self.held)])
        return list(seen)

    def held_open(self, address: str | None = None) -> list[HeldSocket]:
        return [h for h in self.held if h.open and address in (None, h.address)]

    def dropped(self, address: str | None = None) -> list[HeldSocket]:
        """Held WebSockets the server or the network ended (neither stop() nor their own time)."""
        return [h for h in self.held if h.dropped and address in (None, h.address)]

    def ended(self, address: str | None = None) -> list[HeldSocket]:
        """Held WebSockets the client closed when their time (`hold_for`) was up."""
        return [h for h in self.held if h.reason == "done" and address in (None, h.address)]

    def open_at(self, t: float, address: str | None = None) -> list[HeldSocket]:
        """Held WebSockets open at time `t` (time.monotonic())."""
        return [h for h in self.held if h.open_at(t) and address in (None, h.address)]

    def errors(self, address: str | None = None) -> Counter:
        return Counter(r.error for r in self.results if not r.ok and address in (None, r.address))

    def table(self) -> str:
        rows = [f"{'address':<16}{'ok':>8}{'failed':>8}{'held':>6}{'open':>6}{'ended':>7}{'dropped':>9}  errors"]
        for a in self.addresses():
            held = [h for h in self.held if h.address == a]
            rows.append(f"{a:<16}{self.ok(a):>8}{self.failed(a):>8}{len(held):>6}{len(self.held_open(a)):>6}"
                        f"{len(self.ended(a)):>7}{len(self.dropped(a)):>9}  {dict(self.errors(a))}")
        return "\n".join(rows)


class DnsClient:
    """Clients of the service as a user's are: each new connection goes to the address the service
    name resolves to through `dns_server` (host:port, UDP), re-resolved once the answer's TTL has
    passed, never before; `clients` threads make requests one after another (cycling through
    `kinds`: `https` a GET through the TLS listener, `ws` a WebSocket with one echo through it
    (plain WebSocket when `tls` is None),
    `http` a GET through the TCP listener, nginx's 301), and `hold` WebSockets stay open, echoing
    every `echo_every` s; one that closes is counted with when and why, and another is opened in its
    place, at the address the name gives then. With `hold_for`, each held WebSocket closes itself
    after that many seconds (reason "done", as a user's session ends), so held sockets move to the
    new address as DNS does, and a drain can end. Everything is counted per address (Stats).
    Bounded: stops by itself after `max_seconds`.

        client = DnsClient(lab.dns_server, lab.service_name, lab.listen, lab.settings.server_name,
                           lab.tls_context()).start()
        ...
        client.stop(); client.stats.failed() == 0; client.stats.held_open(old_address)
    """

    def __init__(self, dns_server: str, name: str, listen: dict[int, int], server_name: str,
                 tls: ssl.SSLContext | None, source: str = "127.0.0.77", clients: int = 3,
                 kinds: tuple[str, ...] = ("https", "ws"), hold: int = 0, echo_every: float = 0.5,
                 pause: float = 0.0, max_seconds: float = 600.0, hold_for: float | None = None):
        self.dns_server, self.name, self.listen, self.server_name, self.tls = dns_server, name, listen, server_name, tls
        self.source, self.kinds, self.hold, self.echo_every, self.pause = source, kinds, hold, echo_every, pause
        self.max_seconds, self.hold_for = max_seconds, hold_for
        self.stats = Stats()
        self._lock = threading.Lock()
        self._answer: tuple[str, float] | None = None  # (address, when it expires)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._requests, args=(c,), daemon=True) for c in range(clients)]
        if hold:
            self._threads.append(threading.Thread(target=self._held, daemon=True))
        self._started = 0.0

    # -- resolving, as a client library that keeps to the TTL ------------------------------------

    def address(self) -> str:
        """The address for a new connection: the cached answer while its TTL lasts, else a new one."""
        from lab.dns import resolve

        with self._lock:
            now = time.monotonic()
            if self._answer and now < self._answer[1]:
                return self._answer[0]
            address, ttl = resolve(self.dns_server, self.name)
            self._answer = (address, now + ttl)
            self.stats.resolved.append((now, address, ttl))
            return address

    # -- requests -----------------------------------------------------------------------------------

    def start(self) -> DnsClient:
        self._started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Stats:
        """Stop every client; held WebSockets still open are closed (reason "stopped")."""
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.stats

    def _done(self) -> bool:
        return self._stop.is_set() or time.monotonic() - self._started > self.max_seconds

    def _requests(self, client: int) -> None:
        n = client
        while not self._done():
            kind = self.kinds[n % len(self.kinds)]
            n += 1
            at = time.monotonic()
            try:
                address = self.address()
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever its kind
                self._count(Result(at, "dns", kind, False, f"{type(exc).__name__}: {exc}"))
                continue
            try:
                self._count(Result(at, address, kind, True, client_ip=self.one(address, kind)))
            except Exception as exc:  # noqa: BLE001
                self._count(Result(at, address, kind, False, f"{type(exc).__name__}: {exc}"))
            if self.pause:
                self._stop.wait(self.pause)

    def _count(self, result: Result) -> None:
        with self._lock:
            self.stats.results.append(result)

    def one(self, address: str, kind: str) -> str | None:
        """One request of `kind` to `address`; the client address the app saw (None for http)."""
        if kind == "http":
            status, headers, _ = http_get(dial(address, self.listen[80], source=self.source), self.server_name, "/")
            if status != 301:
                raise RuntimeError(f"HTTP {status} {headers.get('location')}")
            return None
        sock = dial(address, self.listen[443], source=self.source)
        if kind == "ws":
            hello, echo = ws_hello(sock, self.server_name, tls=self.tls)
            if echo != "ping-echo":
                raise RuntimeError(f"echo {echo!r}")
            return hello["client_ip"]
        if self.tls is None:
            raise ValueError("an https request needs a TLS context")
        tls_sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
        tls_sock.settimeout(5)
        status, _, body = http_get(tls_sock, self.server_name, "/")
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return json.loads(body)["client_ip"]

    # -- held WebSockets ----------------------------------------------------------------------------

    def _held(self) -> None:
        asyncio.run(self._hold_all())

    async def _hold_all(self) -> None:
        await asyncio.gather(*(self._hold_one() for _ in range(self.hold)))

    async def _hold_one(self) -> None:
        while not self._done():
            try:
                address = await asyncio.to_thread(self.address)
            except Exception:  # noqa: BLE001 - counted as a failed request; try again
                self._count(Result(time.monotonic(), "dns", "held", False, "the name did not resolve"))
                await asyncio.sleep(0.2)
                continue
            held = HeldSocket(address, time.monotonic())
            try:
                sock = await asyncio.to_thread(dial, address, self.listen[443], self.source)
                sock.setblocking(False)
                async with ws_connect(f"{'wss' if self.tls else 'ws'}://{self.server_name}/ws", sock=sock,
                                      ssl=self.tls, open_timeout=5, close_timeout=2) as ws:
                    await asyncio.wait_for(ws.recv(), 5)  # the app's hello
                    with self._lock:
                        self.stats.held.append(held)
                    until = held.opened + self.hold_for if self.hold_for else None
                    while not self._done() and (until is None or time.monotonic() < until):
                        await ws.send("ping-echo")
                        if await asyncio.wait_for(ws.recv(), 5) != "ping-echo":
                            raise RuntimeError("a wrong echo")
                        held.echoes += 1
                        await asyncio.sleep(self.echo_every if until is None else
                                            max(0.0, min(self.echo_every, until - time.monotonic())))
                    held.closed, held.reason = time.monotonic(), "stopped" if self._done() else "done"
            except Exception as exc:  # noqa: BLE001 - the server, the network or the stand-in ended it
                if held in self.stats.held:
                    if held.closed is None:
                        held.closed, held.reason = time.monotonic(), f"{type(exc).__name__}: {exc}"
                else:  # it never opened: a failed request
                    self._count(Result(held.opened, address, "held", False, f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(0.1)
