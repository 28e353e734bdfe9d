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
STAGED = "wsgate: staged"  # printed once the uploaded tree is unpacked, before `nginx -t`
SWAPPED = "wsgate: swapped"  # printed once `current` points at the new release, before the reload
LOCKED = "wsgate: locked"  # printed once the rollout lock is held (and the state reported)
DONE = "wsgate: done"  # ends the answer to each session request, with its exit code
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


# The per-host session: one SSH command that takes the host's rollout lock, reports the live
# state, then serves one request a line until its stdin closes. The lock (an flock on fd 9)
# lasts exactly as long as the session, so a run that dies or loses the host never leaves a
# stale lock behind, and every step costs one round trip instead of a new remote shell.
_SESSION = r"""
exec 9>>"$R/.rollout.lock"
if ! flock -n 9; then printf 'locked\t%s\n' "$(cat "$R/.rollout.owner" 2>/dev/null)"; exit __LOCKED_EXIT__; fi
printf '%s\n' "$OWNER" > "$R/.rollout.owner"
BEFORE=$(readlink "$R/current" 2>/dev/null || true)
PREVIOUS=$(readlink "$R/previous" 2>/dev/null || true)
printf 'current\t%s\nprevious\t%s\n' "$BEFORE" "$PREVIOUS"
if running; then printf 'running\tyes\n'; else printf 'running\tno\n'; fi
echo "__LOCKED__"
set +e
exec 2>&1  # from here on, every answer carries its errors
S="$R/releases/$STAGE"
ngx() { "$N" -p "$R/" -c "$@" 9>&-; }
reload() { if running; then ngx "$R/current/nginx.conf" -s reload; else ngx "$R/current/nginx.conf"; fi; }
point() { ln -sfn "$1" "$R/current.new" && mv -T "$R/current.new" "$R/current"; }
switch() {
  old=$(readlink "$R/current" 2>/dev/null || true)
  if [ -n "$old" ]; then ln -sfn "$old" "$R/previous.new" && mv -T "$R/previous.new" "$R/previous" || return 1; fi
  point "$1"
}
prune() {
  keep=" $(readlink "$R/current" 2>/dev/null) $(readlink "$R/previous" 2>/dev/null) "
  ls -1t "$R/releases" | grep -v '^\.' | tail -n +__KEEP__ | while read -r d; do
    case "$keep" in *" releases/$d "*) ;; *) rm -rf "$R/releases/$d";; esac
  done
}
while read -r cmd; do
  case "$cmd" in
    stage) read -r payload
           rm -rf "$S" && mkdir -p "$S" && printf '%s' "$payload" | base64 -d | tar -xf - -C "$S" \
             && echo "__STAGED__" && ngx "$S/nginx.conf" -t; rc=$? ;;
    discard) rm -rf "$S"; rc=$? ;;
    live) D="$R/releases/$TARGET"
          { [ ! -d "$S" ] || { [ -d "$D" ] && rm -rf "$S"; } || mv -T "$S" "$D"; } \
            && [ -d "$D" ] && switch "releases/$TARGET" && echo "__SWAPPED__" && { prune; reload; }; rc=$? ;;
    back) [ -n "$PREVIOUS" ] && [ -d "$R/$PREVIOUS" ] && switch "$PREVIOUS" && echo "__SWAPPED__" && reload; rc=$? ;;
    reload) reload; rc=$? ;;
    restore) if [ -n "$BEFORE" ]; then point "$BEFORE" && reload; rc=$?
             else { ! running || ngx "$R/current/nginx.conf" -s quit; } && rm -f "$R/current"; rc=$?; fi ;;
    show) if cd "$R/current" 2>/dev/null; then
            find . -type f | sort | while read -r f; do printf '%s\0' "${f#./}"; cat "$f"; printf '\0'; done; cd /
          fi; echo; rc=0 ;;
    *) echo "unknown request: $cmd"; rc=2 ;;
  esac
  echo "__DONE__ $rc"
done
"""


@dataclass(frozen=True)
class Remote:
    """The shell of one host: the session script and the state report. POSIX sh; every value
    from settings is quoted, every request is a fixed word."""

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

    def _head(self, **values: str) -> str:
        q = shlex.quote
        assigned = "".join(f"{k}={q(v)}; " for k, v in {"R": self.root, "N": self.nginx, "P": self.pid_file,
                                                         **values}.items())
        return (f"set -e; {assigned}"
                'running() { [ -f "$P" ] && kill -0 "$(cat "$P")" 2>/dev/null; }; '
                '[ -x "$N" ] || { echo "nginx binary $N not found" >&2; exit 127; }; '
                'mkdir -p "$R/releases" "$R/logs" "$R/tmp"; ')

    def inspect(self) -> str:
        """The live state, one `key<TAB>value` a line, without a lock (for `fab status`)."""
        return self.wrap(self._head() + "printf 'current\\t%s\\nprevious\\t%s\\n' "
                         '"$(readlink "$R/current" 2>/dev/null || true)" "$(readlink "$R/previous" 2>/dev/null || true)"; '
                         "if running; then printf 'running\\tyes\\n'; else printf 'running\\tno\\n'; fi")

    def session(self, owner: str, stage: str, target: str = "") -> str:
        """The session command (see _SESSION). Requests: stage (+ a base64 tar line), discard,
        live (stage -> releases/<target> -> current, reload), back (previous -> current,
        reload), reload, restore (what was current when the session began), show."""
        script = (_SESSION.replace("__LOCKED_EXIT__", str(LOCKED_EXIT)).replace("__LOCKED__", LOCKED)
                  .replace("__STAGED__", STAGED).replace("__SWAPPED__", SWAPPED).replace("__DONE__", DONE)
                  .replace("__KEEP__", str(KEEP_RELEASES + 1)))
        return self.wrap(self._head(OWNER=owner, STAGE=stage, TARGET=target) + script)


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
