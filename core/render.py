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
    """The instance ports one service listens on (`http`: the redirect, `tls`: the app) for one load
    balancer: its plain port (unless the load balancer retired it: Settings.retiring), and for a
    network load balancer with proxy protocol on, its proxy port beside it."""
    ports = [p for p in [getattr(settings.ports, service)] if p not in settings.retired]
    if settings.load_balancer.type == "network" and settings.proxy_protocol:
        ports.append(getattr(settings.ports, f"proxy_{service}"))
    return ports


def served_ports(settings: Settings) -> set[int]:
    """Every port a host listens on with this environment's config: those of every load balancer
    served (Settings.balancers: both during a move)."""
    return {port for b in settings.balancers
            for port in (*sockets(b, "http"), *sockets(b, "tls"), b.ports.health)}


def health_ports(settings: Settings) -> list[int]:
    """The health ports of the load balancers served, each once (two may share one), this one's first."""
    return list(dict.fromkeys(b.ports.health for b in settings.balancers))


def header_ports(settings: Settings) -> set[int]:
    """The ports nginx reads the PROXY header on: each load balancer's proxy ports where its proxy
    protocol is on (classic: ports.http and ports.tls; network: the proxy ports), never elsewhere."""
    return {port for b in settings.balancers if b.proxy_protocol for port in b.proxy_ports}


def manifest_ports(settings: Settings) -> dict[str, int]:
    """role -> port of what one load balancer's hosts serve (release.json names them so)."""
    p = settings.ports
    out = {role: getattr(p, role) for role in ("http", "tls") if getattr(p, role) not in settings.retired}
    out["health"] = p.health
    if settings.load_balancer.type == "network" and settings.proxy_protocol:
        out.update(proxyHttp=p.proxy_http, proxyTls=p.proxy_tls)
    return out


def render(settings: Settings, bind: str | None = None) -> Tree:
    """Render the tree for hosts that listen on `bind` (None: every address), serving the ports of
    every load balancer of `settings.balancers` (one without a move), each port framed as the load
    balancer that uses it frames its traffic."""
    balancers = settings.balancers
    reading = header_ports(settings)

    def listen(port: int) -> str:
        """`listen` arguments for `port`: `proxy_protocol` on the ports that get the header once the
        gate is open (classic: ports.http and ports.tls; network: the proxy ports), never elsewhere
        (the plain ports of a network load balancer's hosts, the health port)."""
        address = f"[{bind}]:{port}" if bind and ":" in bind else f"{bind}:{port}" if bind else str(port)
        return f"{address} proxy_protocol" if port in reading else address

    env = _environment()
    names = sorted(n for n in env.list_templates() if n.endswith(".j2"))
    context = {
        "s": settings, "balancers": balancers, "listen": listen, "sockets": sockets,
        "health_path": HEALTH_PATH, "bind": bind, "health_ports": health_ports(settings),
        "manifest_ports": manifest_ports,
        # http level, for every load balancer served: the header's client address believed from any of
        # their subnets, the proxy log format if any sends the header, timeouts above the longest idle
        "reads_header": any(b.proxy_protocol for b in balancers),
        "subnet_cidrs": list(dict.fromkeys(c for b in balancers if b.proxy_protocol
                                           for c in b.load_balancer.subnet_cidrs)),
        "lb_idle_timeout": max(b.lb_idle_timeout for b in balancers),
        "read_timeout": max(b.read_timeout for b in balancers),
        "send_timeout": max(b.send_timeout for b in balancers),
    }
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
