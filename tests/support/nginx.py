"""A real nginx serving a rendered tree from its own prefix, laid out as a host would have it.

Layout under `root`: releases/<digest>/ (a rendered tree), current -> releases/<digest>,
logs/, tmp/. nginx runs as `nginx -p root/ -c root/current/nginx.conf`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from core.render import Tree
from lab.hosts import terminate

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("releases", "logs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def conf(self) -> Path:
        return self.root / "current" / "nginx.conf"

    def _cmd(self, *args: str, conf: Path | None = None) -> list[str]:
        return [NGINX, "-p", f"{self.root}/", "-c", str(conf or self.conf), *args]

    def install(self, tree: Tree) -> Path:
        """Write the tree as a release and point `current` at it."""
        release = tree.write(self.root / "releases" / tree.digest)
        link = self.root / "current.new"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(release.relative_to(self.root))
        os.replace(link, self.root / "current")
        return release

    def test(self, conf: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd("-t", conf=conf), capture_output=True, text=True)

    def start(self) -> None:
        result = subprocess.run(self._cmd(), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nginx did not start: {result.stderr}")

    def reload(self) -> None:
        subprocess.run(self._cmd("-s", "reload"), check=True, capture_output=True)

    def pid(self) -> int | None:
        try:
            return int((self.root / "logs" / "nginx.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, timeout)

    def log(self, name: str) -> str:
        path = self.root / "logs" / name
        return path.read_text() if path.exists() else ""
