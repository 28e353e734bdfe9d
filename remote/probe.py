"""Probes over the SSH connection: a direct-tcpip channel from the host to its own ports.

Needs no tool on the host and no port open toward the operator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fabric import Connection

from core.probe import Exchange, Health, Reply, checks, health_exchange
from core.render import health_ports
from core.settings import Settings
from remote.ssh import Ssh, SshError

# Between polls of a host's ports: the first soon (a reload takes tens of milliseconds), then
# each wait half as long again, up to RETRY_MAX (on a busy machine a reload takes longer, and every
# poll costs the host and the controller an SSH channel and a request).
RETRY_INTERVAL, RETRY_MAX = 0.02, 0.25


def _pauses() -> Iterator[float]:
    pause = RETRY_INTERVAL
    while True:
        yield pause
        pause = min(RETRY_MAX, pause * 1.5)


def exchange(ssh: Ssh, conn: Connection, address: str, port: int, ex: Exchange) -> Reply:
    """Send the request, read until the answer is whole or the peer closes: the parsed reply (each
    step bounded by ssh.connectTimeout)."""
    chan = ssh.channel(conn, address, port)
    try:
        chan.sendall(ex.request)
        while not ex.feed(chan.recv(65536)):
            pass
    except OSError:  # a timeout too: whatever came is judged as it is
        pass
    finally:
        chan.close()
    return ex.reply()


def live(ssh: Ssh, conn: Connection, address: str, port: int) -> Health | None:
    """What nginx runs now (and what `current` names), from its health port; None if no answer."""
    try:
        return Health.of(exchange(ssh, conn, address, port, health_exchange()))
    except SshError:
        return None


def bound(settings: Settings) -> float:
    """How long a probe waits for a reload to take and its checks to pass: 10 s, or ssh.connectTimeout
    if longer (a machine that needs longer to connect needs longer to reload, too)."""
    return max(10.0, float(settings.ssh.connect_timeout))


def wait_live(ssh: Ssh, conn: Connection, address: str, port: int, digest: str,
              timeout: float | None = None) -> Health | None:
    """Poll the health port until nginx runs `digest` (a reload is asynchronous); the last answer."""
    deadline = time.monotonic() + (bound(ssh.settings) if timeout is None else timeout)
    for pause in _pauses():
        seen = live(ssh, conn, address, port)
        if (seen and seen.digest == digest) or time.monotonic() > deadline:
            return seen
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
    raise AssertionError("unreachable")


def probe(ssh: Ssh, conn: Connection, settings: Settings, address: str, digest: str,
          timeout: float | None = None) -> list[str]:
    """Every problem found speaking to nginx as the load balancer will; [] means ready.

    Right after a reload, an old worker may still take a connection or two and answer with
    the old config: a failing check is retried until `timeout` before it counts.
    """
    timeout = bound(settings) if timeout is None else timeout
    deadline = time.monotonic() + timeout
    first, *others = health_ports(settings)  # every load balancer's health port (two during a move)
    seen = wait_live(ssh, conn, address, first, digest, timeout)
    if not seen or seen.digest != digest:
        return [f"live config is {seen.digest[:12] if seen else 'unknown (no health answer)'}, not {digest[:12]}: "
                "the reload did not take"]
    problems = []
    for port in others:
        other = wait_live(ssh, conn, address, port, digest, max(0.0, deadline - time.monotonic()))
        if not other or other.digest != digest:
            problems.append(f"health port {port}: {'answers ' + other.digest[:12] if other else 'no health answer'}, "
                            f"not {digest[:12]}")
    for check in checks(settings):
        for pause in _pauses():
            try:
                problem = check.judge(exchange(ssh, conn, address, check.port, check.exchange()), settings, digest)
            except SshError as exc:
                problem = str(exc)
            if not problem or time.monotonic() >= deadline:
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        if problem:
            problems.append(problem)
    return problems
