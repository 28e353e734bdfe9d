"""What a probe sends and what it must get back: speak to nginx as the load balancer will.

Pure: requests and answers are bytes, framed and parsed here (h11, as any HTTP/1.1 client
would: Content-Length, chunked and close-delimited bodies) and judged here; `remote/probe.py`
carries them over the SSH connection to the host's own ports.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

from core import proxyproto
from core.listeners import HEALTH_PATH
from core.settings import Settings

PROBE_CLIENT = "192.0.2.10"  # a documentation address: what the probe's PROXY header claims
PROBE_HEADER = proxyproto.v1(PROBE_CLIENT, "192.0.2.1", 40000, 443)  # a Classic ELB's (v1)
PROBE_HEADER_V2 = proxyproto.v2(PROBE_CLIENT, "192.0.2.1", 40000, 443)  # a network load balancer's (TCP4)
# What a network load balancer's health check sends to a PROXY v2 group: LOCAL, no address.
PROBE_LOCAL_V2 = proxyproto.v2_local()
PROBE_PATH = "/wsgate-probe"
UPSTREAM_HEADER = "x-upstream-status"  # set by the app location only: the app answered, not nginx


@dataclass(frozen=True)
class Reply:
    status: int | None  # None: closed without an answer (or with one that is not HTTP)
    headers: dict[str, str]
    body: bytes

    def describe(self) -> str:
        return "closed without an answer" if self.status is None else f"HTTP {self.status}"

    @property
    def from_app(self) -> bool:
        """The app answered (through nginx's proxy), not nginx itself: only the app location
        sets X-Upstream-Status, and only once an upstream was asked."""
        return bool(self.headers.get(UPSTREAM_HEADER))


class Exchange:
    """One HTTP/1.1 request and its answer, with an optional PROXY header in front."""

    def __init__(self, host: str, path: str, preface: bytes = b""):
        self._h11 = h11.Connection(h11.CLIENT)
        head = h11.Request(method="GET", target=path,
                           headers=[("Host", host), ("User-Agent", "wsgate-probe"), ("Connection", "close")])
        self.request = preface + (self._h11.send(head) or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
        self._status: int | None = None
        self._headers: dict[str, str] = {}
        self._body = b""
        self._complete = False
        self.done = False

    def feed(self, data: bytes) -> bool:
        """Take what the peer sent (b"": it closed); True once the answer is whole, or never will be.

        Stopping at a whole answer matters: the peer's close can come 40 ms later (Nagle).
        """
        if self.done:
            return True
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError:  # not HTTP, or cut short: no answer
                self.done = True
                return True
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Response):
                self._status = event.status_code
                self._headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._complete = self.done = True
                return True
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self.done = True
                return True

    def reply(self) -> Reply:
        """The answer, if it came whole; else Reply(None)."""
        if not self._complete:
            return Reply(None, {}, b"")
        return Reply(self._status, self._headers, self._body)


def health_exchange() -> Exchange:
    return Exchange("wsgate-probe", HEALTH_PATH)


@dataclass(frozen=True)
class Health:
    """A health answer (`ok <digest> <release>`): the config nginx runs, and the release the
    host's `current` link names right now (None when it names none, or when nginx's worker
    user cannot resolve the link: then only a look under the lock can tell)."""

    digest: str
    current: str | None

    @classmethod
    def of(cls, reply: Reply) -> Health | None:
        words = reply.body.decode("latin-1", "replace").split()
        if reply.status != 200 or len(words) < 2 or words[0] != "ok":
            return None
        current = words[2] if len(words) > 2 and words[2] != "none" else None
        return cls(words[1], current)

    def serves(self, digest: str) -> bool:
        """nginx runs `digest` and the `current` link names it: a restart would load the same."""
        return self.digest == digest and self.current == digest


@dataclass(frozen=True)
class Check:
    """One request to one port, framed as the load balancer will (or will not) frame it, and
    the judge of its answer."""

    name: str
    port: int
    host: str
    path: str
    preface: bytes  # the PROXY header, or b""
    expect: str  # "redirect" | "app" | "reject"

    def exchange(self) -> Exchange:
        return Exchange(self.host, self.path, self.preface)

    @property
    def framing(self) -> str:
        """How the request is framed, in words."""
        if self.preface == PROBE_LOCAL_V2:
            return "a request after a PROXY v2 LOCAL header (as a health check sends it)"
        if self.preface.startswith(proxyproto.V2_SIGNATURE):
            return "a request with a PROXY v2 header"
        return f"a request {'with' if self.preface else 'without'} a PROXY header"

    @property
    def proves_header(self) -> bool:
        """An answer proves the port reads the client's address from the header."""
        return bool(self.preface) and self.preface != PROBE_LOCAL_V2 and self.expect != "reject"

    def judge(self, reply: Reply, settings: Settings, digest: str | None) -> str | None:
        """The problem with this answer, or None. `digest`: the config that must answer (None: any)."""
        framing = f"port {self.port}: {self.framing}"
        if self.expect == "reject":
            if reply.status is None or (reply.status == 400 and not reply.from_app):
                return None
            return f"{framing} was answered ({reply.describe()}), not rejected"
        if self.expect == "redirect":
            want = f"https://{settings.server_name}{PROBE_PATH}"
            if reply.status != 301 or reply.headers.get("location") != want:
                got = f"{reply.describe()} {reply.headers.get('location', '')}".rstrip()
                return f"{framing}: expected 301 to {want}, got {got}"
        elif reply.status is None or not reply.from_app:
            got = reply.describe() if reply.status is None else f"nginx's own answer (HTTP {reply.status})"
            return f"{framing}: expected the app, got {got}"
        elif reply.status >= 500:
            return f"{framing}: expected the app, got HTTP {reply.status}"
        if digest and reply.headers.get("x-config-digest") != digest:
            return f"port {self.port}: answered by config {reply.headers.get('x-config-digest')}, not {digest[:12]}"
        return None


def checks(settings: Settings) -> list[Check]:
    """The port checks after a reload (the health port's digest is checked first, by polling): those
    of every load balancer served (Settings.balancers), each port framed as its own load balancer
    frames it (a Classic ELB's proxy ports v1, a network load balancer's proxy ports v2, plain
    ports none)."""
    return [c for b in settings.balancers for c in balancer_checks(b)]


def balancer_checks(settings: Settings) -> list[Check]:
    """The port checks of one load balancer's ports."""
    if settings.load_balancer.type == "network":
        return network_checks(settings)
    return classic_checks(settings)


def _pair(port: int, expect: str, settings: Settings, framed: bytes, other: bytes, prefix: str = "") -> list[Check]:
    """A request framed as the load balancer sends it to `port` reaches its place (`expect`: the
    redirect or the app), and one framed the other way is rejected."""
    path = PROBE_PATH if expect == "redirect" else "/"
    return [Check(f"{prefix}{expect}", port, settings.server_name, path, framed, expect),
            Check(f"reject {prefix}{expect}", port, settings.server_name, path, other, "reject")]


def classic_checks(settings: Settings) -> list[Check]:
    """On each proxied port, a request framed as the load balancer will frame it (with the v1 header
    once proxy protocol is on) reaches its place, and one framed the other way is rejected."""
    p, name = settings.ports, settings.server_name
    lb = PROBE_HEADER if settings.proxy_protocol else b""  # what the load balancer will send
    other = b"" if settings.proxy_protocol else PROBE_HEADER
    return [
        Check("redirect", p.http, name, PROBE_PATH, lb, "redirect"),
        Check("app", p.tls, name, "/", lb, "app"),
        Check("reject redirect", p.http, name, PROBE_PATH, other, "reject"),
        Check("reject app", p.tls, name, "/", other, "reject"),
    ]


def network_checks(settings: Settings) -> list[Check]:
    """The plain ports answer plain requests and reject a PROXY header, always (the plain target
    groups send none). With proxy protocol on, the proxy ports answer a request behind a PROXY v2
    header and reject a plain one (the proxy groups send v2), and the proxy app port answers after
    a v2 LOCAL header, as the proxy groups' health checks send it. A retired plain port
    (Settings.retiring) is not served, so not probed."""
    p = settings.ports
    out: list[Check] = []
    for port, expect in ((p.http, "redirect"), (p.tls, "app")):
        if port not in settings.retired:
            out += _pair(port, expect, settings, b"", PROBE_HEADER_V2)
    if settings.proxy_protocol:
        for port, expect in ((p.proxy_http, "redirect"), (p.proxy_tls, "app")):
            out += _pair(port, expect, settings, PROBE_HEADER_V2, b"", "proxy ")
        out.append(Check("health check", p.proxy_tls, settings.server_name, "/", PROBE_LOCAL_V2, "app"))
    return out


def plain_proven(settings: Settings) -> list[int] | None:
    """Network: the plain ports the checks prove served without the header (what the readiness
    record may claim of them), of every network load balancer served; None when none is a network
    load balancer (a Classic ELB's ports are the proxied ones)."""
    networks = [b for b in settings.balancers if b.load_balancer.type == "network"]
    if not networks:
        return None
    return sorted({c.port for b in networks for c in balancer_checks(b) if c.port in (b.ports.http, b.ports.tls)
                   and c.expect != "reject"})


def proven_ports(settings: Settings) -> list[int]:
    """The ports the checks prove read the PROXY header, of every load balancer served: what the
    readiness record may claim."""
    return sorted({c.port for c in checks(settings) if c.proves_header})

