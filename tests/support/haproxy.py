"""Real HAProxy in `mode tcp`, standing in for the load balancer's TCP listeners."""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
from pathlib import Path

from tests.support.procs import wait_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# (frontend port, backend address, backend port, server options: '' | 'send-proxy' | 'send-proxy-v2', and any
# other, e.g. 'check'), optionally followed by lines for the route's section (its health check, say)
Route = tuple


def config(routes: list[Route], stats: Path | None = None) -> str:
    """The configuration; `stats`: a stats socket there (read with `HAProxy.servers`)."""
    lines = [
        "global",
        "    log stderr local0 warning",
        *([f"    stats socket {stats} mode 600 level user"] if stats else []),
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for fport, baddr, bport, proxy, *section in routes:
        lines += [
            f"listen lb{fport}",
            f"    bind 127.0.0.1:{fport}",
            *(f"    {line}" for line in (section[0] if section else ())),
            f"    server host1 {baddr}:{bport} {proxy}".rstrip(),
        ]
    return "\n".join(lines) + "\n"


class HAProxy:
    def __init__(self, directory: Path, routes: list[Route], stats: bool = False):
        self.cfg = Path(directory) / "haproxy.cfg"
        self.stats = Path(directory) / "stats.sock" if stats else None
        self.cfg.write_text(config(routes, self.stats))
        self.routes = routes
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config rejected: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fport, *_ in self.routes:
            wait_port("127.0.0.1", fport)

    def servers(self) -> dict[int, tuple[str, str]]:
        """Frontend port -> (status, last check) of its server, as HAProxy's `show stat` says
        (status: UP, DOWN, or on the way: "UP 1/2"...; last check: L7OK, L7STS, L4CON...)."""
        assert self.stats, "started without a stats socket"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(data.decode().lstrip("# ").splitlines())
        return {int(r["pxname"].removeprefix("lb")): (r["status"], r["check_status"])
                for r in rows if r["svname"] == "host1"}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
