"""Real HAProxy in `mode tcp`, standing in for the load balancer's TCP listeners."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.procs import wait_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def config(routes: list[tuple[int, str, int, str]]) -> str:
    """routes: (frontend port, backend address, backend port, '' | 'send-proxy' | 'send-proxy-v2')."""
    lines = [
        "global",
        "    log stderr local0 warning",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for fport, baddr, bport, proxy in routes:
        lines += [
            f"listen lb{fport}",
            f"    bind 127.0.0.1:{fport}",
            f"    server host1 {baddr}:{bport} {proxy}".rstrip(),
        ]
    return "\n".join(lines) + "\n"


class HAProxy:
    def __init__(self, directory: Path, routes: list[tuple[int, str, int, str]]):
        self.cfg = Path(directory) / "haproxy.cfg"
        self.cfg.write_text(config(routes))
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

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
