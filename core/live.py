"""What a host has live, as its session (or `inspect`) reports it, and how to read nginx's answers.

Pure: parsers of what core/session.sh prints. A run reads the live state before it changes
anything; a failure puts exactly that state back (`LiveState.restore_line`).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace

from core.session import Remote


@dataclass(frozen=True)
class LiveState:
    """What a host's session (or `inspect`) reported before anything changed."""

    current: str  # `releases/<digest>` or ""
    previous: str
    nginx: str  # no | ours | foreign
    pid: str
    cmdline: str
    manifest: dict  # the release.json of the release `current` names
    stale: int = 0
    previous_manifest: dict = field(default_factory=dict)  # and of the one `previous` names

    @classmethod
    def parse(cls, stdout: str) -> LiveState:
        s = parse_state(stdout)
        return cls(current=s.get("current", ""), previous=s.get("previous", ""), nginx=s.get("nginx", "no"),
                   pid=s.get("pid", ""), cmdline=s.get("cmdline", ""), manifest=_manifest(s.get("manifest")),
                   stale=int(s["stale"]) if s.get("stale", "").isdigit() else 0,
                   previous_manifest=_manifest(s.get("pmanifest")))

    def restore_line(self) -> bytes:
        """The `restore` request's payload: these links, and nginx running or not."""
        return f"{self.current}|{self.previous}|{'yes' if self.nginx == 'ours' else 'no'}".encode()

    def running(self, digest: str, manifest: dict) -> LiveState:
        """This state with `current` naming the release nginx runs (`digest`, with its manifest):
        a restore then brings back what ran, not what the link named."""
        return replace(self, current=f"releases/{digest}", manifest=manifest)

    def disagreement(self, running: str | None, target: str, remote: Remote) -> str | None:
        """Why this host must not be changed: the kit's nginx runs `running`, another release than
        `current` names (a run cut short between swap and reload, or a hand edit), so a restore,
        which reloads what `current` names, would end serving neither. None when they agree, when
        what runs is unknown, or when it runs `target` (its restore brings `target` back)."""
        if self.nginx != "ours" or not running or running in (digest_of_link(self.current), target):
            return None
        return (f"nginx runs {running[:12]} but `current` names {self.current or 'nothing'}: after a failure "
                "the restore would load what `current` names, not what runs, so the host is not touched. "
                f"Reconcile it first: `ln -sfn releases/{running} {remote.root}/current` (keeps what runs) or "
                f"`{remote.nginx} -p {remote.root}/ -c {remote.root}/current/nginx.conf -s reload` (runs what "
                "`current` names), then run again (docs/troubleshooting.md#nginx-runs-another-release)")

    def health_ports(self, address: str, port: int) -> list[tuple[str, int]]:
        """Where to ask what nginx runs, in order: the health port (and bind address) of the release
        `current` names, of the one `previous` names (what runs after a run cut short between its
        swap and its reload), then the settings' (`address`, `port`). Each pair once."""
        out = [health_address(m, address, port) for m in (self.manifest, self.previous_manifest) if health_of(m)]
        out.append((address, port))
        return list(dict.fromkeys(out))

    def unanswered(self, asked: list[tuple[str, int]], remote: Remote) -> str:
        """Why a host whose nginx is the kit's but answers on none of `asked` must not be changed:
        what it runs is unknown, so a restore could load another release than the one it serves."""
        ports = ", ".join(f"{a}:{p}" for a, p in asked)
        return (f"nginx pid {self.pid or '?'} runs from {remote.root}/current/nginx.conf but answers on none of the "
                f"health ports its releases and the settings name ({ports}): what it runs is unknown, so after a "
                "failure the restore could load another release than the one it serves, and the host is not "
                "touched. Find what it runs (its health port answers `ok DIGEST`), then reconcile it: "
                f"`ln -sfn releases/DIGEST {remote.root}/current` (keeps what runs) or "
                f"`{remote.nginx} -p {remote.root}/ -c {remote.root}/current/nginx.conf -s reload` (runs what "
                "`current` names), then run again (docs/troubleshooting.md#nginx-runs-another-release)")

    def foreign(self, remote: Remote) -> str | None:
        """Why the host is not ours to change (an nginx we did not start), or None."""
        if self.nginx != "foreign":
            return None
        return (f"nginx pid {self.pid or '?'} (pid file {remote.pid_file}) runs `{self.cmdline.strip() or '?'}`, "
                f"not {remote.root}/current/nginx.conf: wsgate never signals an nginx it did not start. "
                "Hand the host over first (docs/operations.md#handing-a-host-over)")


def _manifest(text: str | None) -> dict:
    """A release.json line as a dict ({} when absent or not an object)."""
    try:
        manifest = json.loads(text or "{}")
    except ValueError:
        return {}
    return manifest if isinstance(manifest, dict) else {}


def parse_state(stdout: str) -> dict[str, str]:
    """The `key<TAB>value` lines of `inspect` and of a session's start."""
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("\t")
        if sep:
            out[key] = value.strip()
    return out


def parse_files(stdout: str) -> dict[str, str]:
    """The answer to the session's `show`: path -> content."""
    parts = stdout.split("\0")[:-1]  # the last part is what follows the last file: a newline
    return {parts[i]: parts[i + 1] for i in range(0, len(parts) - 1, 2)}


def tree_diff(live: dict[str, str], new: dict[str, str]) -> str:
    """A unified diff, file by file, from the live tree to the new one."""
    out: list[str] = []
    for name in sorted(set(live) | set(new)):
        a, b = live.get(name), new.get(name)
        if a != b:
            out.extend(difflib.unified_diff(
                (a or "").splitlines(keepends=True), (b or "").splitlines(keepends=True),
                fromfile=f"live/{name}" if a is not None else "/dev/null",
                tofile=f"new/{name}" if b is not None else "/dev/null"))
    return "".join(out)


def digest_of_link(link: str) -> str | None:
    """`releases/<digest>` -> digest."""
    name = link.rstrip("/").rsplit("/", 1)[-1] if link else ""
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


def nginx_error(output: str) -> str:
    """nginx's own error line out of `nginx -t` (or reload) output."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for marker in ("[emerg]", "[alert]", "[crit]", "[error]"):
        for line in lines:
            if marker in line:
                return line
    return lines[-1] if lines else "no output"


def health_of(manifest: dict) -> int | None:
    """The health port a release's release.json names, or None (absent or not a port)."""
    ports = manifest.get("ports")
    health = ports.get("health") if isinstance(ports, dict) else None
    return health if isinstance(health, int) and not isinstance(health, bool) and 0 < health < 65536 else None


def health_address(manifest: dict, address: str, port: int) -> tuple[str, int]:
    """Where a release answers for its health: its release.json's bind address and health port,
    each falling back to `address` and `port` when it names none."""
    bind = manifest.get("bind")
    return (bind if isinstance(bind, str) and bind else address), health_of(manifest) or port
