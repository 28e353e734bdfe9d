"""The rollout driver: phases run as barriers across hosts, in parallel with a bound.

1. connect, lock and inspect every host (nothing changes);
2. upload and `nginx -t` the staged tree on every host that needs it (nothing live changes);
   any failure: discard every stage and stop;
3. per batch: swap, reload, probe; any failure: every host this run changed goes back to its
   previous tree, reloaded; later batches are never touched;
4. all ready: `on_ready` (the readiness record) runs while the locks are still held.
"""

from __future__ import annotations

import io
import secrets
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from fabric import Connection

from core.errors import KitError
from core.plan import (LOCKED_EXIT, HostOutcome, Remote, Step, digest_of_link, nginx_error, parse_files,
                       parse_state, split, tree_diff)
from core.render import Tree
from core.settings import Host, Settings
from remote.probe import probe, wait_live
from remote.report import Reporter
from remote.ssh import Ssh


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


@dataclass
class _Host:
    host: Host
    remote: Remote
    tree: Tree | None  # None: roll back to the host's previous release
    outcome: HostOutcome
    conn: Connection | None = None
    link_before: str = ""  # `releases/<digest>` that was current before this run
    link_target: str = ""  # `releases/<digest>` to make current
    upload: bool = False  # the tree must be uploaded
    reload: bool = False  # nginx must (re)load the target


class Rollout:
    def __init__(self, settings: Settings, hosts: list[Host], trees: dict[str, Tree] | None, ssh: Ssh,
                 reporter: Reporter, parallel: int = 10, batch: str | None = None, dry_run: bool = False):
        """`trees`: host name -> tree to roll out; None rolls every host back to its previous release."""
        self.settings, self.ssh, self.reporter = settings, ssh, reporter
        self.parallel, self.batch, self.dry_run = max(1, parallel), batch, dry_run
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        self.stage = f".stage-{self.run_id}"
        self.hosts = [
            _Host(h, Remote.of(settings, h), trees[h.name] if trees else None,
                  HostOutcome(h.name, h.instance_id, h.address, target=trees[h.name].digest if trees else ""))
            for h in hosts
        ]
        self._archives: dict[str, bytes] = {}
        self.diffs: dict[str, str] = {}  # check: host -> unified diff of live vs new files

    @property
    def outcomes(self) -> list[HostOutcome]:
        return [h.outcome for h in self.hosts]

    # -- phases ------------------------------------------------------------------------------

    def run(self, on_ready: Callable[[list[HostOutcome]], None] | None = None) -> bool:
        """The whole rollout; True when every host is proven ready (and `on_ready` ran)."""
        try:
            if not self._each(self.hosts, self._prepare):
                return self._stopped()
            todo = [h for h in self.hosts if h.upload]
            if not self._each(todo, self._stage):
                self._each([h for h in todo if h.conn], self._discard, quiet=True)
                return self._stopped()
            for group in split([h for h in self.hosts if h.reload], self.batch):
                if not self._each(group, self._go_live):
                    self._roll_back()
                    return self._stopped()
            for h in self.hosts:
                if h.outcome.ok is None:
                    h.outcome.finish()
            if on_ready:
                on_ready(self.outcomes)
            return True
        except BaseException:
            self._roll_back()
            self._stopped()
            raise
        finally:
            self._each([h for h in self.hosts if h.conn], self._unlock, quiet=True)
            for h in self.hosts:
                if h.conn:
                    h.conn.close()
            self.ssh.close()

    def check(self) -> bool:
        """Dry run: stage and test on every host, report what would change, change nothing live."""
        try:
            ok = self._each(self.hosts, self._prepare)
            todo = [h for h in self.hosts if h.upload and h.conn]
            ok = self._each(todo, self._stage) and ok
            self._each(todo, self._discard, quiet=True)
            self._each(todo, self._diff, quiet=True)
            for h in self.hosts:
                if h.outcome.ok is None:
                    h.outcome.finish()
            return ok
        finally:
            for h in self.hosts:
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

    def _prepare(self, h: _Host) -> None:
        self._step(h, Step.CONNECT)
        h.conn = self.ssh.connect(h.host)
        self._step(h, Step.LOCK)
        r = self.ssh.run(h.conn, h.remote.inspect(None if self.dry_run else self.run_id))
        state = parse_state(r.stdout)
        if r.exited == LOCKED_EXIT:
            h.conn.close()
            h.conn = None  # not ours to unlock
            raise StepFailed(f"another rollout holds the lock on {h.remote.root} ({state.get('locked', '?')}); "
                          "wait for it, or `fab unlock` if it died")
        if not r.ok:
            raise StepFailed(f"cannot inspect {h.remote.root}: {nginx_error(r.stderr + r.stdout)}")
        h.link_before = state.get("current", "")
        h.outcome.before = digest_of_link(h.link_before)
        if h.tree is None:  # rollback: the previous release becomes current
            h.link_target = state.get("previous", "")
            h.outcome.target = digest_of_link(h.link_target) or ""
            if not h.outcome.target:
                raise StepFailed(f"no previous release to roll back to under {h.remote.root}")
            h.reload = True
            return
        h.outcome.target = h.tree.digest
        h.link_target = f"releases/{h.tree.digest}"
        h.upload = h.reload = h.outcome.before != h.tree.digest
        if not h.upload:  # same tree: only prove it is the one running
            running = state.get("running") == "yes"
            live = wait_live(self.ssh, h.conn, self.settings, self._address(h), h.tree.digest, timeout=0) \
                if running else None
            h.reload = live != h.tree.digest
            if not h.reload:
                h.outcome.after = live

    def _stage(self, h: _Host) -> None:
        self._step(h, Step.UPLOAD)
        data = self._archive(h.tree)
        remote_tar = f"/tmp/wsgate-{self.run_id}-{h.host.name}.tar"
        self.ssh.put(h.conn, data, remote_tar)
        self._step(h, Step.TEST)
        r = self.ssh.run(h.conn, h.remote.stage_and_test(remote_tar, self.stage))
        if not r.ok:
            raise StepFailed(f"nginx -t rejected the new config: {nginx_error(r.stdout + r.stderr)}")

    def _diff(self, h: _Host) -> None:
        r = self.ssh.run(h.conn, h.remote.show())
        self.diffs[h.host.name] = tree_diff(parse_files(r.stdout), h.tree.files)

    def _discard(self, h: _Host) -> None:
        self.ssh.run(h.conn, h.remote.discard(self.stage))

    def _go_live(self, h: _Host) -> None:
        digest = h.outcome.target
        if h.link_target != h.link_before:
            self._step(h, Step.SWAP)
            command = h.remote.swap(self.stage, digest) if h.upload else h.remote.switch(h.link_target)
            r = self.ssh.run(h.conn, command)
            if not r.ok:
                raise StepFailed(f"swap failed: {nginx_error(r.stderr + r.stdout)}")
            h.outcome.changed = True
        self._step(h, Step.RELOAD)
        r = self.ssh.run(h.conn, h.remote.reload())
        if not r.ok:
            raise StepFailed(f"reload failed: {nginx_error(r.stdout + r.stderr)}")
        self._step(h, Step.PROBE)
        problems = probe(self.ssh, h.conn, self.settings, self._address(h), digest)
        if problems:
            raise StepFailed("; ".join(problems))
        h.outcome.after = digest
        h.outcome.finish()
        self.reporter.done(h.outcome)

    def _roll_back(self) -> None:
        changed = [h for h in self.hosts if h.outcome.changed and h.conn]
        if changed:
            self.reporter.note(f"rolling back {len(changed)} host(s) this run changed")
            self._each(changed, self._restore, quiet=True)

    def _restore(self, h: _Host) -> None:
        note = h.outcome
        try:
            r = self.ssh.run(h.conn, h.remote.restore(h.link_before))
            if not r.ok:
                raise StepFailed(f"reload failed: {nginx_error(r.stdout + r.stderr)}")
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

    def _unlock(self, h: _Host) -> None:
        if not self.dry_run:
            r = self.ssh.run(h.conn, h.remote.unlock(self.run_id, prune=bool(h.outcome.ok)))
            if not r.ok:
                self.reporter.note(f"{h.host.name}: could not release the lock: {nginx_error(r.stderr + r.stdout)}")

    def _address(self, h: _Host) -> str:
        return self.settings.bind_of(h.host) or "127.0.0.1"

    def _archive(self, tree: Tree) -> bytes:
        if tree.digest not in self._archives:
            self._archives[tree.digest] = archive(tree)
        return self._archives[tree.digest]
