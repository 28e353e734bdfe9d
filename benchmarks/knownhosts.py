"""A big known_hosts, as an operator's grows: a few real keys reused under many names, half of them
hashed (`ssh-keygen -H` style) and half plain, with the fleet's own lines among them (at the end,
where a linear reader finds them last)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
from pathlib import Path

from lab.hosts import keygen

KEY_TYPES = ("ed25519", "ecdsa", "rsa")


def _keys(directory: Path) -> list[str]:
    """`type base64` of one real key per type (ed25519 through lab.hosts, the others likewise)."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = [" ".join(keygen(directory / "ed25519").split()[:2])]
    for kind in KEY_TYPES[1:]:
        path = directory / kind
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
        keys.append(" ".join(Path(f"{path}.pub").read_text().split()[:2]))
    return keys


def hashed(name: str) -> str:
    """The `|1|salt|hash` form OpenSSH writes for `name` with HashKnownHosts."""
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def write(path: Path, own: Path, lines: int, keys_dir: Path) -> int:
    """Write `lines` lines to `path`: filler names, then every line of `own`. Returns how many are filler."""
    own_lines = [line for line in own.read_text().splitlines() if line.strip()]
    keys = _keys(keys_dir)
    filler = []
    for n in range(max(0, lines - len(own_lines))):
        name = f"[10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}]:2222" if n % 3 else f"srv{n}.example.internal"
        host = hashed(name) if n % 2 else f"{name},10.{200 + n % 50}.{n // 256 % 256}.{n % 256}"
        filler.append(f"{host} {keys[n % len(keys)]}")
    path.write_text("\n".join(filler + own_lines) + "\n")
    return len(filler)
