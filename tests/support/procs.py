"""Start and stop real processes on loopback, and wait for their ports."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from lab.hosts import wait_port  # noqa: F401  (one waiter for lab and tests)

REPO = Path(__file__).resolve().parents[2]


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def start_app(address: str, port: int, log: Path) -> subprocess.Popen:
    """The demo WebSocket app (lab/app.py) in its own process."""
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.app", "--listen", f"{address}:{port}"],
        cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
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
