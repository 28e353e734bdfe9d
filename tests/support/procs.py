"""Start and stop real processes on loopback, and wait for their ports."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def wait_port(address: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address}:{port} after {timeout}s") from None
            time.sleep(0.05)


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
