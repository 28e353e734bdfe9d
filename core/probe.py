"""What a probe sends and what it must get back: speak to nginx as the load balancer will.

Pure: requests are bytes, replies are parsed and judged here; `remote/probe.py` carries
them over the SSH connection to the host's own ports.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import proxyproto
from core.elb import HEALTH_PATH
from core.settings import Settings

PROBE_CLIENT = "192.0.2.10"  # a documentation address: what the probe's PROXY header claims
PROBE_HEADER = proxyproto.v1(PROBE_CLIENT, "192.0.2.1", 40000, 443)
PROBE_PATH = "/wsgate-probe"


@dataclass(frozen=True)
class Reply:
    status: int | None  # None: closed without an answer
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Reply:
        if not raw:
            return cls(None, {}, b"")
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            return cls(None, {}, raw)
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return cls(status, headers, body)

    @staticmethod
    def complete(raw: bytes) -> bool:
        """A whole answer is in `raw` (headers and a Content-Length body): no need to wait for EOF.

        Without Content-Length (or chunked), only the peer closing ends the answer.
        """
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            return False
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                try:
                    return len(body) >= int(value)
                except ValueError:
                    return False
        return False

    def describe(self) -> str:
        return "closed without an answer" if self.status is None else f"HTTP {self.status}"


@dataclass(frozen=True)
class Check:
    """One request to one port, and the judge of its reply (returns a problem or None)."""

    name: str
    port: int
    request: bytes

    def judge(self, reply: Reply, settings: Settings, digest: str) -> str | None:
        return _JUDGES[self.name](reply, settings, digest)


def _request(host: str, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsgate-probe\r\n"
            "Connection: close\r\n\r\n").encode()


def header_request(settings: Settings) -> bytes:
    """A request to the redirect path with the PROXY header the load balancer would send."""
    return PROBE_HEADER + _request(settings.server_name, PROBE_PATH)


def health_request() -> bytes:
    return _request("wsgate-probe", HEALTH_PATH)


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


def checks(settings: Settings) -> list[Check]:
    """The port checks after a reload (the health port's digest is checked first, by polling)."""
    p = settings.ports
    name = settings.server_name
    lb = PROBE_HEADER if settings.proxy_protocol else b""  # what the load balancer will send
    other = b"" if settings.proxy_protocol else PROBE_HEADER
    return [
        Check("redirect", p.http, lb + _request(name, PROBE_PATH)),
        Check("app", p.tls, lb + _request(name, "/")),
        Check("reject", p.http, other + _request(name, PROBE_PATH)),
    ]


def _redirect(reply: Reply, s: Settings, digest: str) -> str | None:
    want = f"https://{s.server_name}{PROBE_PATH}"
    if reply.status != 301 or reply.headers.get("location") != want:
        return f"port {s.ports.http}: expected 301 to {want}, got {reply.describe()} {reply.headers.get('location', '')}"
    if reply.headers.get("x-config-digest") != digest:
        return f"port {s.ports.http}: answered by config {reply.headers.get('x-config-digest')}, not {digest[:12]}"
    return None


def _app(reply: Reply, s: Settings, digest: str) -> str | None:
    if reply.status is None or reply.status >= 500:
        return f"port {s.ports.tls}: expected the app, got {reply.describe()}"
    if reply.headers.get("x-config-digest") != digest:
        return f"port {s.ports.tls}: answered by config {reply.headers.get('x-config-digest')}, not {digest[:12]}"
    return None


def _reject(reply: Reply, s: Settings, digest: str) -> str | None:
    if reply.status not in (None, 400):
        what = "without" if s.proxy_protocol else "with"
        return f"port {s.ports.http}: a request {what} a PROXY header was answered ({reply.describe()}), not rejected"
    return None


_JUDGES = {"redirect": _redirect, "app": _app, "reject": _reject}
