"""A real AWS API endpoint on loopback: moto server, reached by boto3 over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.procs import free_port, stop, wait_port


class MotoServer:
    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT)
        wait_port("127.0.0.1", self.port, timeout=30)

    def endpoints(self) -> list[dict[str, str]]:
        """The `aws:endpoints` value that points every service we use here."""
        return [{s: self.url for s in ("ec2", "elb", "ssm", "sts")}]

    def reset(self) -> None:
        reset(self.url)

    def stop(self) -> None:
        stop(self.proc)


def reset(url: str) -> None:
    """Forget everything the endpoint at `url` holds."""
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10)
