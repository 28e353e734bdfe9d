"""The commands a run sends to a host: its rollout session and the lock-free state report.

Pure: this only builds command lines. The shell itself is `core/session.sh` (read once, at
import); this module sets its values, quoted, and names the entry point. `remote/ssh.py` runs
the session (one request a line), `remote/rollout.py` sends the requests.

Layout on a host, under ROOT (nginx.root, or the host's root):
    releases/<digest>/       rendered trees, complete before they get this name
    releases/.stage-<run>/   a tree being uploaded and tested
    current -> releases/<digest>   what nginx runs (-c ROOT/current/nginx.conf)
    previous -> releases/<digest>  what ran before the last swap
    .rollout.lock            flocked by every session (exclusive for a rollout, shared for a check)
    .rollout.owner           the run that last held it exclusively
    .session.<pid>           a session's idle clock (removed when it ends)
    logs/, tmp/              nginx's logs and temp files (lab defaults)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import Enum
from importlib.resources import files

from core.settings import Host, Settings

LOCKED_EXIT = 75  # the session's exit code when another run holds the lock
LOCK_FAILED_EXIT = 71  # its exit code when `flock` itself fails (missing, or any error but a held lock)
STAGED = "wsgate: staged"  # printed once the uploaded tree is unpacked, before `nginx -t`
SWAPPED = "wsgate: swapped"  # printed once `current` points at the new release, before the reload
LOCKED = "wsgate: locked"  # printed once the rollout lock is held (and the state reported)
DONE = "wsgate: done"  # ends the answer to each session request, with its exit code
KEEP_RELEASES = 3  # the newest releases a host keeps (and any that `current` or `previous` names)

# What is sent: the file without its comment lines and blank lines (a command is read on every host).
SCRIPT = "\n".join(line for line in files("core").joinpath("session.sh").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))


class Mode(str, Enum):
    ROLLOUT = "x"  # exclusive lock: a rollout or a rollback
    CHECK = "s"  # shared lock: `fab check` (never races a rollout's cleanup, writes no owner)


@dataclass(frozen=True)
class Remote:
    """The shell of one host: the session command and the state report (core/session.sh).
    Every value from settings is quoted, every request is a fixed word."""

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

    def _command(self, entry: str, **values: str) -> str:
        """core/session.sh after its values, then its entry point."""
        assigned = "".join(f"{k}={shlex.quote(v)}; " for k, v in
                           {"R": self.root, "N": self.nginx, "P": self.pid_file, **values}.items())
        return self.wrap(f"set -e; {assigned}\n{SCRIPT}\n{entry}\n")

    def inspect(self) -> str:
        """The live state, one `key<TAB>value` a line, without a lock and without creating anything
        (for `fab status`: a doctor changes nothing; `root<TAB>missing` when ROOT is not there)."""
        return self._command("inspect", LOCK_FAILED_EXIT=str(LOCK_FAILED_EXIT))

    def session(self, owner: str, stage: str, target: str = "", mode: Mode = Mode.ROLLOUT, wait: int = 0) -> str:
        """The session command (see `session` in core/session.sh). Requests: ping, stage (+ a
        base64 tar line), discard, live (stage -> releases/<target> -> current, reload), back
        (previous -> current, reload), reload, restore (+ `current|previous|yes-or-no`: both
        links and nginx as they were), show."""
        return self._command(
            "session", OWNER=owner, STAGE=stage, TARGET=target, MODE=mode.value, WAIT=str(wait),
            T=str(self.command_timeout), IDLE=str(self.idle_timeout), KEEP=str(KEEP_RELEASES),
            LOCKED_EXIT=str(LOCKED_EXIT), LOCK_FAILED_EXIT=str(LOCK_FAILED_EXIT), MARK_LOCKED=LOCKED,
            MARK_STAGED=STAGED, MARK_SWAPPED=SWAPPED, MARK_DONE=DONE)
