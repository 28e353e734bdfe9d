"""The rollout driver: phases run as barriers across hosts, in parallel with a bound.

1. connect, lock and inspect every host (nothing changes): one session command per host;
2. upload and `nginx -t` the staged tree on every host that needs it (nothing live changes);
   any failure: discard every stage and stop;
3. per batch: swap, reload, probe; any failure: every host this run changed goes back to its
   previous tree, reloaded; later batches are never touched;
4. all ready: the readiness record is written while the locks are still held.

A host whose nginx already runs the target (asked through its health port) needs nothing:
no lock, no upload, no reload. Every other host's rollout lock is held from step 1 to the
end by its session (core.plan): the steps are requests to it, so each costs a round trip,
not a new remote shell, and the lock cannot outlive the run. The record is written under
every host's lock.
"""

from __future__ import annotations

import base64
import io
import secrets
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

from fabric import Connection

from core.errors import KitError
from core.plan import (DONE, LOCKED, LOCKED_EXIT, STAGED, SWAPPED, HostOutcome, Remote, Step, digest_of_link,
                       nginx_error, parse_files, parse_state, split, tree_diff)
from core.render import Tree
from core.settings import Host, Settings
from remote.probe import live, probe, wait_live
from remote.report import Reporter
from remote.ssh import Session, Ssh


class StepFailed(KitError):
    """A step ran and did not do what it must (nginx -t rejected, reload did not take, probe failed)."""


def archive(tree: Tree) -> bytes:
    """The tree as an uncompressed tar, with fixed metadata (same tree, same bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(tree.files):
            data = tree.files[name].encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class RecordSink(Protocol):
    """Where proven readiness goes (the readiness record)."""

    def needs(self, outcomes: list[HostOutcome]) -> bool: ...

    def write(self, outcomes: list[HostOutcome]) -> None: ...


@dataclass
class _Host:
    host: Host
    remote: Remote
    tree: Tree | None  # None: roll back to the host's previous release
    outcome: HostOutcome
    conn: Connection | None = None
    session: Session | None = None  # open while this run holds the host's rollout lock
    link_before: str = ""  # `releases/<digest>` that was current before this run
    upload: bool = False  # the tree must be uploaded
    reload: bool = False  # nginx must (re)load the target


class Rollout:
    def __init__(self, settings: Settings, hosts: list[Host], trees: dict[str, Tree] | None, ssh: Ssh,
                 reporter: Reporter, parallel: int = 10, batch: str | None = None):
        """`trees`: host name -> tree to roll out; None rolls every host back to its previous release."""
        self.settings, self.ssh, self.reporter = settings, ssh, reporter
        self.parallel, self.batch = max(1, parallel), batch
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        self.hosts = [
            _Host(h, Remote.of(settings, h), trees[h.name] if trees else None,
                  HostOutcome(h.name, h.instance_id, h.address, target=trees[h.name].digest if trees else ""))
            for h in hosts
        ]
        self._payloads: dict[str, bytes] = {}
        self.diffs: dict[str, str] = {}  # check: host -> unified diff of live vs new files

    @property
    def outcomes(self) -> list[HostOutcome]:
        return [h.outcome for h in self.hosts]

    # -- phases ------------------------------------------------------------------------------

    def run(self, record: RecordSink | None = None) -> bool:
        """The whole rollout; True when every host is proven ready (and the record is written)."""
        try:
            if not self._each(self.hosts, self._prepare):
                return self._stopped()
            todo = [h for h in self.hosts if h.upload]
            if not self._each(todo, self._stage):
                self._each([h for h in todo if h.session], self._discard, quiet=True)
                return self._stopped()
            for group in split([h for h in self.hosts if h.reload], self.batch):
                if not self._each(group, self._go_live):
                    self._roll_back()
                    return self._stopped()
            for h in self.hosts:
                if h.outcome.ok is None:
                    h.outcome.finish()
            if record and record.needs(self.outcomes):
                # The record is written under every host's lock (hosts with nothing to do had none).
                if not self._each([h for h in self.hosts if not h.session], self._lock):
                    return self._stopped()
                record.write(self.outcomes)
            return True
        except BaseException:
            self._roll_back()
            self._stopped()
            raise
        finally:
            self._close()

    def check(self) -> bool:
        """Dry run: stage and test on every host, report what would change, change nothing live."""
        try:
            ok = self._each(self.hosts, self._prepare)
            todo = [h for h in self.hosts if h.upload and h.session]
            ok = self._each(todo, self._stage) and ok
            self._each(todo, self._discard, quiet=True)
            self._each(todo, self._diff, quiet=True)
            for h in self.hosts:
                if h.outcome.ok is None:
                    h.outcome.finish()
            return ok
        finally:
            self._close()

    def _close(self) -> None:
        """Release every lock (closing a session ends the command holding it) and disconnect."""
        for h in self.hosts:
            if h.session:
                h.session.close()
            if h.conn:
                h.conn.close()
        self.ssh.close()

    def _each(self, hosts: list[_Host], fn: Callable[[_Host], None], quiet: bool = False) -> bool:
        """Run `fn` on every host, `parallel` at a time; False if any host failed."""
        def guarded(h: _Host) -> bool:
            try:
                fn(h)
                return True
            except KitError as exc:
                if not quiet:
                    h.outcome.fail(h.outcome.step, str(exc))
                    self.reporter.failed(h.outcome)
                return False

        if not hosts:
            return True
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(hosts))) as pool:
            return all(list(pool.map(guarded, hosts)))

    def _step(self, h: _Host, step: Step) -> None:
        h.outcome.step = step
        self.reporter.step(h.outcome)

    def _stopped(self) -> bool:
        for h in self.hosts:
            if h.outcome.ok is None and not h.outcome.error:
                h.outcome.error = "stopped: another host failed"
        return False

    # -- per host ----------------------------------------------------------------------------

    def _prepare(self, h: _Host) -> None:
        """Connect; if nginx already runs the target, that is all; else lock and read the state."""
        self._step(h, Step.CONNECT)
        h.conn = self.ssh.connect(h.host)
        if h.tree is not None:  # one channel to the health port, no remote shell
            seen = live(self.ssh, h.conn, self.settings, self._address(h))
            if seen == h.tree.digest:
                h.outcome.before = h.outcome.after = seen
                return
        state = self._lock(h)
        h.link_before = state.get("current", "")
        h.outcome.before = digest_of_link(h.link_before)
        if h.tree is None:  # rollback: the previous release becomes current
            h.outcome.target = digest_of_link(state.get("previous", "")) or ""
            if not h.outcome.target:
                raise StepFailed(f"no previous release to roll back to under {h.remote.root}")
            h.reload = True
            return
        h.upload = h.outcome.before != h.tree.digest
        h.reload = True  # the tree is new, or it is current but not what nginx runs

    def _lock(self, h: _Host) -> dict[str, str]:
        """Open the host's session: take its rollout lock; the live state it reports."""
        self._step(h, Step.LOCK)
        stage = f".stage-{self.run_id}"
        r, h.session = self.ssh.hold(h.conn, h.remote.session(self.run_id, stage, h.outcome.target), LOCKED, DONE)
        state = parse_state(r.stdout)
        if r.exited == LOCKED_EXIT:
            raise StepFailed(f"another rollout holds the lock on {h.remote.root} (run {state.get('locked') or '?'}); "
                             "it is released when that run ends")
        if h.session is None:
            raise StepFailed(f"cannot inspect {h.remote.root}: {nginx_error(r.stderr + r.stdout)}")
        return state

    def _stage(self, h: _Host) -> None:
        """Upload the tree into the stage and `nginx -t` the whole staged tree: one request."""
        self._step(h, Step.UPLOAD)
        r = h.session.request("stage", self._payload(h.tree))
        if STAGED not in r.stdout:
            raise StepFailed(f"upload failed: {nginx_error(r.stdout)}")
        h.outcome.step = Step.TEST
        if not r.ok:
            raise StepFailed(f"nginx -t rejected the new config: {nginx_error(r.stdout.split(STAGED)[-1])}")

    def _diff(self, h: _Host) -> None:
        self.diffs[h.host.name] = tree_diff(parse_files(h.session.request("show").stdout), h.tree.files)

    def _discard(self, h: _Host) -> None:
        h.session.request("discard")

    def _go_live(self, h: _Host) -> None:
        """Swap (when the tree changes) and reload: one request; then the probe."""
        digest = h.outcome.target
        if h.tree is None or h.upload:
            self._step(h, Step.SWAP)
            r = h.session.request("back" if h.tree is None else "live")
            if SWAPPED not in r.stdout:
                raise StepFailed(f"swap failed: {nginx_error(r.stdout)}")
            h.outcome.changed = True
        else:
            r = h.session.request("reload")
        h.outcome.step = Step.RELOAD
        if not r.ok:
            raise StepFailed(f"reload failed: {nginx_error(r.stdout.split(SWAPPED)[-1])}")
        self._step(h, Step.PROBE)
        problems = probe(self.ssh, h.conn, self.settings, self._address(h), digest)
        if problems:
            raise StepFailed("; ".join(problems))
        h.outcome.after = digest
        h.outcome.finish()
        self.reporter.done(h.outcome)

    def _roll_back(self) -> None:
        changed = [h for h in self.hosts if h.outcome.changed and h.session]
        if changed:
            self.reporter.note(f"rolling back {len(changed)} host(s) this run changed")
            self._each(changed, self._restore, quiet=True)

    def _restore(self, h: _Host) -> None:
        note = h.outcome
        try:
            r = h.session.request("restore")
            if not r.ok:
                raise StepFailed(f"reload failed: {nginx_error(r.stdout)}")
            if note.before:
                seen = wait_live(self.ssh, h.conn, self.settings, self._address(h), note.before)
                if seen != note.before:
                    raise StepFailed(f"live config is {seen[:12] if seen else 'unknown'} after restoring")
            note.restored = True
            if note.ok:  # it was ready, then put back because another host failed
                note.ok, note.error = False, "restored: another host failed"
            self.reporter.restored(note)
        except KitError as exc:
            note.ok = False
            note.error = f"{note.error}; ROLLBACK FAILED: {exc}".lstrip("; ")
            self.reporter.failed(note)

    def _address(self, h: _Host) -> str:
        return self.settings.bind_of(h.host) or "127.0.0.1"

    def _payload(self, tree: Tree) -> bytes:
        """The tree as one base64 line (a tar), made once per distinct tree."""
        if tree.digest not in self._payloads:
            self._payloads[tree.digest] = base64.b64encode(archive(tree))
        return self._payloads[tree.digest]
