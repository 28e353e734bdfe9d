"""Start and stop real processes on loopback, and wait for their ports."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from lab.hosts import port_free, wait_port  # noqa: F401  (one waiter and one port check for lab and tests)

PROJECT_DIR = Path(__file__).resolve().parents[2]


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def free_ports(count: int, addresses: list[str]) -> list[int]:
    """`count` distinct ports, each free on every one of `addresses` (hosts share port numbers)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(addresses[0])
        if port not in ports and all(port_free(a, port) for a in addresses):
            ports.append(port)
    return ports


def accepts(address: str, port: int) -> bool:
    """Whether something accepts a TCP connection on address:port."""
    try:
        socket.create_connection((address, port), timeout=2).close()
        return True
    except OSError:
        return False


def start_app(address: str, port: int, log: Path) -> subprocess.Popen:
    """The demo WebSocket app (lab/app.py) in its own process."""
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.app", "--listen", f"{address}:{port}"],
        cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT,
    )
    wait_port(address, port)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
