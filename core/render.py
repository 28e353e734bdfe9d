"""Settings in, nginx tree and its sha256 digest out. Pure: no I/O but reading templates.

The tree is rendered from the Jinja2 templates in `nginx/` (StrictUndefined: a missing
value is a bug, never an empty string). `digest.conf` states the digest of every other
file, so a running nginx can say which tree it loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from core.errors import RenderError
from core.listeners import HEALTH_PATH
from core.settings import Host, Settings

TEMPLATES = Path(__file__).resolve().parent.parent / "nginx"
DIGEST_FILE = "digest.conf"
MAIN_FILE = "nginx.conf"
MANIFEST_FILE = "release.json"  # what the release serves (ports, bind), read back when restoring it


@dataclass(frozen=True)
class Tree:
    """A rendered nginx tree: relative path -> file text, and the digest that names it."""

    files: dict[str, str]
    digest: str

    def write(self, directory: Path | str) -> Path:
        """Write the tree under `directory` (created if missing); return it."""
        out = Path(directory)
        for name, text in self.files.items():
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        return out


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def digest_of(files: dict[str, str]) -> str:
    """sha256 over every file but the digest file, in path order."""
    h = hashlib.sha256()
    for name in sorted(files):
        if name != DIGEST_FILE:
            h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def sockets(settings: Settings, service: str) -> list[int]:
    """The instance ports one service listens on (`http`: the redirect, `tls`: the app): its plain
    port (unless the load balancer retired it: Settings.retiring), and for a network load balancer
    with proxy protocol on, its proxy port beside it."""
    ports = [p for p in [getattr(settings.ports, service)] if p not in settings.retired]
    if settings.load_balancer.type == "network" and settings.proxy_protocol:
        ports.append(getattr(settings.ports, f"proxy_{service}"))
    return ports


def served_ports(settings: Settings) -> set[int]:
    """Every port a host listens on with this environment's config."""
    return {*sockets(settings, "http"), *sockets(settings, "tls"), settings.ports.health}


def render(settings: Settings, bind: str | None = None) -> Tree:
    """Render the tree for hosts that listen on `bind` (None: every address)."""

    def listen(port: int) -> str:
        """`listen` arguments for `port`: `proxy_protocol` on the ports that get the header once the
        gate is open (classic: ports.http and ports.tls; network: the proxy ports), never elsewhere
        (the plain ports of a network load balancer's hosts, the health port)."""
        address = f"[{bind}]:{port}" if bind and ":" in bind else f"{bind}:{port}" if bind else str(port)
        reads = settings.proxy_protocol and port in settings.proxy_ports
        return f"{address} proxy_protocol" if reads else address

    env = _environment()
    names = sorted(n for n in env.list_templates() if n.endswith(".j2"))
    context = {"s": settings, "listen": listen, "sockets": lambda service: sockets(settings, service),
               "health_path": HEALTH_PATH, "bind": bind}
    try:
        files = {n[:-3]: env.get_template(n).render(context) for n in names if n[:-3] != DIGEST_FILE}
        digest = digest_of(files)
        files[DIGEST_FILE] = env.get_template(DIGEST_FILE + ".j2").render(digest=digest)
    except jinja2.TemplateError as exc:
        raise RenderError(f"template error: {exc}") from exc
    return Tree(files=files, digest=digest)


def render_hosts(settings: Settings, hosts: list[Host] | None = None) -> dict[str, Tree]:
    """One tree per host (default: the configured hosts), rendered once per distinct listen address."""
    trees: dict[str | None, Tree] = {}
    out: dict[str, Tree] = {}
    for host in settings.hosts if hosts is None else hosts:
        bind = settings.bind_of(host)
        if bind not in trees:
            trees[bind] = render(settings, bind)
        out[host.name] = trees[bind]
    return out
