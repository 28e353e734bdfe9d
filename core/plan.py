"""The rollout, decided: batches, the shell script of each remote step, and the outcome.

Pure: nothing here opens a connection. The driver in `remote/rollout.py` runs these
scripts (one remote command per step) and fills in the outcome.

Layout on a host, under ROOT (nginx.root, or the host's root):
    releases/<digest>/   rendered trees, complete before they get this name
    releases/.stage-<run>/  a tree being uploaded and tested
    current -> releases/<digest>   what nginx runs (-c ROOT/current/nginx.conf)
    previous -> releases/<digest>  what ran before the last swap
    .lock/owner          who is rolling out now
    logs/, tmp/          nginx's logs and temp files (lab defaults)
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from enum import Enum

from core.errors import KitError
from core.settings import Host, Settings

LOCKED_EXIT = 75  # the inspect step's exit code when another run holds the lock
KEEP_RELEASES = 3


class Step(str, Enum):
    CONNECT = "connect"
    LOCK = "lock"
    UPLOAD = "upload"
    TEST = "test"
    SWAP = "swap"
    RELOAD = "reload"
    PROBE = "probe"
    ROLLBACK = "rollback"
    DONE = "done"


class PlanError(KitError):
    """The rollout cannot be planned (bad --batch, hosts without instance IDs, ...)."""


def batches(spec: str | None, count: int) -> list[int]:
    """Cumulative batch sizes from a spec such as `1,25%,100%` (the last batch is always all)."""
    if count == 0:
        return []
    if not spec:
        return [count]
    sizes: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(%?)", part)
        if not m or int(m[1]) == 0 or (m[2] and int(m[1]) > 100):
            raise PlanError(f"--batch {spec!r}: {part!r} is not a host count or a percentage (1-100%)")
        size = math.ceil(count * int(m[1]) / 100) if m[2] else int(m[1])
        size = min(size, count)
        if sizes and size < sizes[-1]:
            raise PlanError(f"--batch {spec!r}: batches must not shrink ({part!r} is fewer hosts than before)")
        if not sizes or size > sizes[-1]:
            sizes.append(size)
    if sizes[-1] < count:
        sizes.append(count)
    return sizes


def split(items: list, spec: str | None) -> list[list]:
    """Items cut into the batches a spec describes."""
    out, start = [], 0
    for end in batches(spec, len(items)):
        out.append(items[start:end])
        start = end
    return out


@dataclass(frozen=True)
class Remote:
    """The shell scripts of one host's steps. Every value is quoted; every script is POSIX sh."""

    root: str
    nginx: str
    pid_file: str
    sudo: bool = False

    @classmethod
    def of(cls, settings: Settings, host: Host) -> Remote:
        root = settings.root_of(host)
        pid = settings.nginx.pid_file
        return cls(root=root, nginx=settings.nginx.binary,
                   pid_file=pid if pid.startswith("/") else f"{root}/{pid}", sudo=settings.ssh.sudo)

    def wrap(self, script: str) -> str:
        """One remote command: the script under sh (and sudo -n when asked)."""
        command = f"sh -c {shlex.quote(script)}"
        return f"sudo -n {command}" if self.sudo else command

    def _head(self) -> str:
        q = shlex.quote
        return (f"set -e; R={q(self.root)}; N={q(self.nginx)}; P={q(self.pid_file)}; "
                'running() { [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; }; ')

    def _nginx(self, conf: str = '"$R/current/nginx.conf"') -> str:
        return f'"$N" -p "$R/" -c {conf}'

    def inspect(self, owner: str | None) -> str:
        """Take the lock (when `owner` is set) and report the live state, one `key<TAB>value` a line."""
        lock = ""
        if owner is not None:
            lock = (f'if ! mkdir "$R/.lock" 2>/dev/null; then printf "locked\\t%s\\n" '
                    f'"$(cat "$R/.lock/owner" 2>/dev/null || echo unknown)"; exit {LOCKED_EXIT}; fi; '
                    f'printf "%s\\n" {shlex.quote(owner)} > "$R/.lock/owner"; ')
        return self.wrap(
            self._head()
            + 'mkdir -p "$R/releases" "$R/logs" "$R/tmp"; '
            + lock
            + 'printf "current\\t%s\\n" "$(readlink "$R/current" 2>/dev/null || true)"; '
            + 'printf "previous\\t%s\\n" "$(readlink "$R/previous" 2>/dev/null || true)"; '
            + 'if running; then echo "running\\tyes"; else echo "running\\tno"; fi; '
            + '[ -x "$N" ] || { echo "nginx binary $N not found" >&2; exit 127; }'
        )

    def stage_and_test(self, archive: str, stage: str) -> str:
        """Unpack the uploaded tree into the stage and `nginx -t` the whole staged tree."""
        q = shlex.quote
        return self.wrap(
            self._head()
            + f'S="$R/releases/"{q(stage)}; rm -rf "$S"; mkdir -p "$S"; '
            + f'tar -xf {q(archive)} -C "$S"; rm -f {q(archive)}; '
            + self._nginx('"$S/nginx.conf"') + " -t 2>&1"
        )

    def discard(self, stage: str) -> str:
        return self.wrap(self._head() + f'rm -rf "$R/releases/"{shlex.quote(stage)}')

    def swap(self, stage: str, digest: str) -> str:
        """Name the staged tree by its digest and make it current (previous: what was current)."""
        q = shlex.quote
        return self.wrap(
            self._head()
            + f'S="$R/releases/"{q(stage)}; D="$R/releases/"{q(digest)}; '
            + 'if [ -d "$D" ]; then rm -rf "$S"; else mv -T "$S" "$D"; fi; '
            + self._switch(f'"releases/"{q(digest)}')
        )

    def switch(self, link: str) -> str:
        """Make an existing release current (previous: what was current). For `fab rollback`."""
        return self.wrap(self._head() + f'[ -d "$R/"{shlex.quote(link)} ] || {{ echo "no release {link}" >&2; exit 1; }}; '
                         + self._switch(shlex.quote(link)))

    @staticmethod
    def _switch(link: str) -> str:
        """Atomic renames of two symlinks: never a moment without a `current`."""
        return ('old=$(readlink "$R/current" 2>/dev/null || true); '
                'if [ -n "$old" ]; then ln -sfn "$old" "$R/previous.new"; mv -T "$R/previous.new" "$R/previous"; fi; '
                f'ln -sfn {link} "$R/current.new"; mv -T "$R/current.new" "$R/current"')

    def reload(self) -> str:
        """Reload a running nginx, or start it. (Exit 0 does not prove the new config took.)"""
        return self.wrap(self._head() + "if running; then " + self._nginx() + " -s reload 2>&1; else "
                         + self._nginx() + " 2>&1; fi")

    def restore(self, link: str) -> str:
        """Point `current` back at `link` (a `releases/<digest>` path) and reload, or, when there
        was nothing before this run, remove `current` and stop the nginx this run started."""
        if link:
            return self.wrap(
                self._head()
                + f'ln -sfn {shlex.quote(link)} "$R/current.new"; mv -T "$R/current.new" "$R/current"; '
                + "if running; then " + self._nginx() + " -s reload 2>&1; else " + self._nginx() + " 2>&1; fi"
            )
        return self.wrap(self._head() + "if running; then " + self._nginx() + ' -s quit 2>&1; fi; rm -f "$R/current"')

    def unlock(self, owner: str, prune: bool) -> str:
        """Release our lock (never another run's) and keep only the newest releases."""
        q = shlex.quote
        tidy = ""
        if prune:
            tidy = ('keep="$(readlink "$R/current" 2>/dev/null || true) $(readlink "$R/previous" 2>/dev/null || true)"; '
                    f'ls -1t "$R/releases" | grep -v "^\\." | tail -n +{KEEP_RELEASES + 1} | while read -r d; do '
                    'case " $keep " in *" releases/$d "*) ;; *) rm -rf "$R/releases/$d";; esac; done; ')
        return self.wrap(
            self._head() + tidy
            + f'if [ "$(cat "$R/.lock/owner" 2>/dev/null)" = {q(owner)} ]; then rm -rf "$R/.lock"; fi'
        )

    def force_unlock(self) -> str:
        return self.wrap(self._head() + 'cat "$R/.lock/owner" 2>/dev/null || true; rm -rf "$R/.lock"')

    def show(self, digest_path: str = "current") -> str:
        """The files of a tree, for diffs: `path<NUL>content<NUL>` pairs."""
        return self.wrap(
            self._head()
            + f'cd "$R/{digest_path}" 2>/dev/null || exit 0; '
            + 'find . -type f | sort | while read -r f; do printf "%s\\0" "${f#./}"; cat "$f"; printf "\\0"; done'
        )


def parse_state(stdout: str) -> dict[str, str]:
    """The `key<TAB>value` lines of `inspect`."""
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("\t")
        if sep:
            out[key] = value.strip()
    return out


def parse_files(stdout: str) -> dict[str, str]:
    """The output of `Remote.show`: path -> content."""
    parts = stdout.split("\0")
    return {parts[i]: parts[i + 1] for i in range(0, len(parts) - 1, 2)}


def tree_diff(live: dict[str, str], new: dict[str, str]) -> str:
    """A unified diff, file by file, from the live tree to the new one."""
    out = []
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


@dataclass
class HostOutcome:
    """What happened on one host, for the table a person reads."""

    host: str
    instance: str | None
    address: str
    step: Step = Step.CONNECT
    ok: bool | None = None  # None: still running or never started
    changed: bool = False  # this run swapped the live config
    restored: bool = False  # put back after a failure
    before: str | None = None  # live digest before the run
    after: str | None = None  # live digest proven by the probe
    target: str = ""
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0

    def fail(self, step: Step, error: str) -> None:
        self.step, self.ok, self.error = step, False, error
        self.elapsed = time.monotonic() - self.started

    def finish(self) -> None:
        self.step, self.ok = Step.DONE, True
        self.elapsed = time.monotonic() - self.started

    @property
    def result(self) -> str:
        if self.ok is None:
            return "not run" if self.step is Step.CONNECT else "stopped"
        if not self.ok:
            return "FAILED, restored" if self.restored else "FAILED"
        if self.restored:
            return "restored"
        return "changed" if self.changed else "unchanged"

    def as_dict(self) -> dict:
        return {"host": self.host, "instance": self.instance, "address": self.address, "step": self.step.value,
                "result": self.result, "ok": self.ok, "changed": self.changed, "restored": self.restored,
                "before": self.before, "after": self.after, "target": self.target, "error": self.error,
                "seconds": round(self.elapsed, 3)}
