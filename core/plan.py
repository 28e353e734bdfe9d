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
import json
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
# state, then serves one request a line. The lock (an flock on fd 9) lasts exactly as long as
# the session, and the session ends on its own when its stdin closes or when no request (or
# heartbeat `ping`) came for IDLE seconds (a watchdog ends it; a payload that stops halfway
# counts as waiting): a controller that dies or loses the network leaves the lock behind for
# at most IDLE seconds plus a third of them, plus the request then running, bounded by T.
# MODE is `x` (rollout: exclusive; cleans stale stages, names itself in the owner file) or `s`
# (check: shared, writes nothing but its own stage). WAIT > 0 waits that long for the lock.
_SESSION = r"""
exec 9>>"$R/.rollout.lock"
if [ "$WAIT" -gt 0 ]; then flock "-$MODE" -w "$WAIT" 9; else flock "-$MODE" -n 9; fi || {
  printf 'locked\t%s\n' "$(cat "$R/.rollout.owner" 2>/dev/null)"; exit __LOCKED_EXIT__; }
STALE=0
if [ "$MODE" = x ]; then
  printf '%s\n' "$OWNER" > "$R/.rollout.owner"
  for d in "$R"/releases/.stage-*; do if [ -e "$d" ]; then rm -rf "$d"; STALE=$((STALE + 1)); fi; done
  rm -f "$R"/.session.*  # left by sessions that were killed (none runs beside an exclusive lock)
fi
BEFORE=$(readlink "$R/current" 2>/dev/null || true)
PREVIOUS=$(readlink "$R/previous" 2>/dev/null || true)
printf 'current\t%s\nprevious\t%s\nstale\t%s\n' "$BEFORE" "$PREVIOUS" "$STALE"
state_report
printf 'manifest\t%s\n' "$(tr -d '\n' < "$R/current/release.json" 2>/dev/null)"
echo "__LOCKED__"
set +e
exec 2>&1  # from here on, every answer carries its errors
S="$R/releases/$STAGE"
ngx() { timeout "$T" "$N" -p "$R/" -c "$@" 9>&-; }
reload() {
  nginx_state
  case $NGX in
    ours) ngx "$R/current/nginx.conf" -s reload ;;
    no) ngx "$R/current/nginx.conf" ;;
    *) echo "the pid file $P names an nginx wsgate did not start (pid $NPID): not signalling it"; return 1 ;;
  esac
}
put() {  # put NAME TARGET: the link ROOT/NAME -> TARGET, atomically; an empty TARGET removes it
  if [ -n "$2" ]; then ln -sfn "$2" "$R/$1.new" && mv -T "$R/$1.new" "$R/$1"; else rm -f "$R/$1"; fi
}
switch() { old=$(readlink "$R/current" 2>/dev/null || true); { [ -z "$old" ] || put previous "$old"; } && put current "$1"; }
prune() {
  keep=" $BEFORE $PREVIOUS $(readlink "$R/current" 2>/dev/null) $(readlink "$R/previous" 2>/dev/null) "
  ls -1t "$R/releases" | grep -v '^\.' | tail -n +__KEEP__ | while read -r d; do
    case "$keep" in *" releases/$d "*) ;; *) rm -rf "$R/releases/$d";; esac
  done
}
# The idle clock: a watchdog that ends this shell (and so the lock) after IDLE seconds spent
# waiting for a request. The shell writes its state to a file with builtins (`w K` while
# waiting for the K-th request, `b` while one runs): a request costs no process.
F="$R/.session.$$"
echo b > "$F"
trap 'kill "$WD" 2>/dev/null; rm -f "$F"' EXIT
(
  tick=$((IDLE / 3)); [ "$tick" -ge 1 ] || tick=1  # one wake-up per tick: a short run sees none
  n=0; last=""
  while kill -0 "$$" 2>/dev/null; do
    sleep "$tick"
    { read -r state < "$F"; } 2>/dev/null || exit 0
    if [ "${state%% *}" = w ] && [ "$state" = "$last" ]; then n=$((n + tick)); else n=0; fi
    last=$state
    if [ "$n" -ge "$IDLE" ]; then kill -TERM "$$" 2>/dev/null; exit 0; fi
  done
) 9>&- >/dev/null 2>&1 </dev/null &
WD=$!
K=0
while K=$((K + 1)); echo "w $K" > "$F"; IFS= read -r cmd; do
  case "$cmd" in stage|restore) IFS= read -r payload || break ;; esac  # still on the idle clock
  echo b > "$F"
  case "$cmd" in
    ping) rc=0 ;;
    stage) rm -rf "$S" && mkdir -p "$S" && printf '%s' "$payload" | base64 -d | tar -xf - -C "$S" \
             && echo "__STAGED__" && ngx "$S/nginx.conf" -t; rc=$? ;;
    discard) rm -rf "$S"; rc=$? ;;
    live) D="$R/releases/$TARGET"
          { [ ! -d "$S" ] || { [ -d "$D" ] && rm -rf "$S"; } || mv -T "$S" "$D"; } \
            && [ -d "$D" ] && switch "releases/$TARGET" && echo "__SWAPPED__" && { prune; reload; }; rc=$? ;;
    back) if [ -z "$PREVIOUS" ] || [ ! -d "$R/$PREVIOUS" ]; then echo "the previous release ${PREVIOUS:-(none)} is not on the host"; rc=1
          else switch "$PREVIOUS" && echo "__SWAPPED__" && reload; rc=$?; fi ;;
    reload) reload; rc=$? ;;
    restore) IFS='|' read -r WC WP WR <<EOF_RESTORE
$payload
EOF_RESTORE
             # the links as they were, and whether nginx ran
             nginx_state; st=$NGX; was_pid=$NPID
             if [ "$st" = foreign ]; then reload; rc=$?  # refuses, and says why
             elif [ -n "$WC" ] && [ ! -d "$R/$WC" ]; then echo "release $WC is gone"; rc=1
             elif [ -n "$WP" ] && [ ! -d "$R/$WP" ]; then echo "release $WP is gone"; rc=1
             else put current "$WC" && put previous "$WP" && echo "__SWAPPED__" && \
                  if [ "$WR" = yes ]; then reload; elif [ "$st" = ours ]; then kill -QUIT "$was_pid"; fi; rc=$?; fi ;;
    show) if cd "$R/current" 2>/dev/null; then
            find . -type f | sort | while read -r f; do printf '%s\0' "${f#./}"; cat "$f"; printf '\0'; done; cd /
          fi; echo; rc=0 ;;
    *) echo "unknown request: $cmd"; rc=2 ;;
  esac
  echo "__DONE__ $rc"
done
"""

# What the pid file names: `no` nginx, `ours` (started from ROOT/current/nginx.conf), or
# `foreign` (anything else: the packaged nginx, another prefix). The kit signals only `ours`.
_STATE = r"""
# Builtins where they do (a process costs milliseconds on a busy host): NGX = no | ours |
# foreign, NPID = the pid file's live process, NCMD = its command line.
nginx_state() {
  NGX=no; NPID=""; NCMD=""
  { read -r NPID < "$P"; } 2>/dev/null || { NPID=""; return 0; }
  if [ -z "$NPID" ] || ! { kill -0 "$NPID" 2>/dev/null || [ -d "/proc/$NPID" ]; }; then NPID=""; return 0; fi
  NCMD=$({ tr '\0\n' '  ' < "/proc/$NPID/cmdline" || ps -o args= -p "$NPID"; } 2>/dev/null)
  case " $NCMD " in *" -c $R/current/nginx.conf "*) NGX=ours ;; *) NGX=foreign ;; esac
}
state_report() {
  nginx_state
  printf 'nginx\t%s\npid\t%s\ncmdline\t%s\n' "$NGX" "$NPID" "$NCMD"
}
"""


class Mode(str, Enum):
    ROLLOUT = "x"  # exclusive lock: a rollout or a rollback
    CHECK = "s"  # shared lock: `fab check` (never races a rollout's cleanup, writes no owner)


@dataclass(frozen=True)
class Remote:
    """The shell of one host: the session script and the state report. POSIX sh (and GNU
    coreutils' `timeout`); every value from settings is quoted, every request is a fixed word."""

    root: str
    nginx: str
    pid_file: str
    sudo: bool = False
    command_timeout: int = 120
    idle_timeout: int = 30

    @classmethod
    def of(cls, settings: Settings, host: Host) -> Remote:
        root = settings.root_of(host)
        pid = settings.nginx.pid_file
        return cls(root=root, nginx=settings.nginx.binary,
                   pid_file=pid if pid.startswith("/") else f"{root}/{pid}", sudo=settings.ssh.sudo,
                   command_timeout=settings.ssh.command_timeout, idle_timeout=settings.ssh.idle_timeout)

    def wrap(self, script: str) -> str:
        """One remote command: the script under sh (and sudo -n when asked)."""
        command = f"sh -c {shlex.quote(script)}"
        return f"sudo -n {command}" if self.sudo else command

    def _head(self, **values: str) -> str:
        q = shlex.quote
        assigned = "".join(f"{k}={q(v)}; " for k, v in {"R": self.root, "N": self.nginx, "P": self.pid_file,
                                                         **values}.items())
        return (f"set -e; {assigned}" + _STATE +
                '[ -x "$N" ] || { echo "nginx binary $N not found" >&2; exit 127; }; '
                'mkdir -p "$R/releases" "$R/logs" "$R/tmp"; ')

    def inspect(self) -> str:
        """The live state, one `key<TAB>value` a line, without a lock (for `fab status`)."""
        return self.wrap(self._head() + "printf 'current\\t%s\\nprevious\\t%s\\n' "
                         '"$(readlink "$R/current" 2>/dev/null || true)" "$(readlink "$R/previous" 2>/dev/null || true)"; '
                         "state_report; "
                         # held: a rollout runs (a shared try never blocks one for more than an instant)
                         'if [ -e "$R/.rollout.lock" ]; then exec 9<"$R/.rollout.lock"; '
                         "if flock -n -s 9; then printf 'locked\\t\\n'; "
                         """else printf 'locked\\t%s\\n' "$(cat "$R/.rollout.owner" 2>/dev/null || echo '?')"; fi; fi""")

    def session(self, owner: str, stage: str, target: str = "", mode: Mode = Mode.ROLLOUT, wait: int = 0) -> str:
        """The session command (see _SESSION). Requests: ping, stage (+ a base64 tar line),
        discard, live (stage -> releases/<target> -> current, reload), back (previous ->
        current, reload), reload, restore (+ `current|previous|yes-or-no`: both links and
        nginx as they were), show."""
        script = (_SESSION.replace("__LOCKED_EXIT__", str(LOCKED_EXIT)).replace("__LOCKED__", LOCKED)
                  .replace("__STAGED__", STAGED).replace("__SWAPPED__", SWAPPED).replace("__DONE__", DONE)
                  .replace("__KEEP__", str(KEEP_RELEASES + 1)))
        return self.wrap(self._head(OWNER=owner, STAGE=stage, TARGET=target, MODE=mode.value, WAIT=str(wait),
                                    T=str(self.command_timeout), IDLE=str(self.idle_timeout)) + script)


@dataclass(frozen=True)
class LiveState:
    """What a host's session (or `inspect`) reported before anything changed."""

    current: str  # `releases/<digest>` or ""
    previous: str
    nginx: str  # no | ours | foreign
    pid: str
    cmdline: str
    manifest: dict
    stale: int = 0

    @classmethod
    def parse(cls, stdout: str) -> LiveState:
        s = parse_state(stdout)
        try:
            manifest = json.loads(s.get("manifest") or "{}")
        except ValueError:
            manifest = {}
        return cls(current=s.get("current", ""), previous=s.get("previous", ""), nginx=s.get("nginx", "no"),
                   pid=s.get("pid", ""), cmdline=s.get("cmdline", ""),
                   manifest=manifest if isinstance(manifest, dict) else {},
                   stale=int(s["stale"]) if s.get("stale", "").isdigit() else 0)

    def restore_line(self) -> bytes:
        """The `restore` request's payload: these links, and nginx running or not."""
        return f"{self.current}|{self.previous}|{'yes' if self.nginx == 'ours' else 'no'}".encode()

    def foreign(self, remote: Remote) -> str | None:
        """Why the host is not ours to change (an nginx we did not start), or None."""
        if self.nginx != "foreign":
            return None
        return (f"nginx pid {self.pid or '?'} (pid file {remote.pid_file}) runs `{self.cmdline.strip() or '?'}`, "
                f"not {remote.root}/current/nginx.conf: wsgate never signals an nginx it did not start. "
                "Hand the host over first (README: Handing a host over)")


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
    rollback_failed: bool = False  # could not be put back (or not proven back): needs a person
    planned: str = ""  # a dry run's verdict: "would change" or "unchanged"
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
        if self.rollback_failed:
            return "ROLLBACK FAILED"
        if not self.ok:
            return "FAILED, restored" if self.restored else "FAILED"
        if self.restored:
            return "restored"
        if self.planned:
            return self.planned
        return "changed" if self.changed else "unchanged"

    def as_dict(self) -> dict:
        return {"host": self.host, "instance": self.instance, "address": self.address, "step": self.step.value,
                "result": self.result, "ok": self.ok, "changed": self.changed, "restored": self.restored,
                "rollback_failed": self.rollback_failed,
                "before": self.before, "after": self.after, "target": self.target, "error": self.error,
                "seconds": round(self.elapsed, 3)}
