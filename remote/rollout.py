"""The host half of a run: each phase on every host, in parallel with a bound, and the restore.

The order of the phases (and what a failure between them means) is `remote/cutover.py`'s;
this module does the work on the hosts:

- prepare: connect, take each host's rollout lock and read what is live (nothing changes);
- stage: upload and `nginx -t` the whole staged tree (nothing live changes);
- go live: per batch, swap, reload, probe;
- lock the unchanged hosts and prove them under the lock, before the record is written;
- restore (after a failure): every host this run may have changed goes back to exactly what it had.

A host whose nginx already runs the target, from the release its `current` link names (the
health port says both), needs nothing: no lock, no upload, no reload. Every other host's lock
is held by its session (core/session.sh): the steps are requests to it. A host counts as possibly
changed from the moment its swap request is sent; if its session is lost, the restore
reconnects (strict host keys, as ever) and waits for the host's lock to restore it.

Ctrl-C never interrupts a step: it is noted, the steps in flight end, and the run restores
the hosts it changed; further interrupts while restoring are deferred until every host is back.

A rollback (`fab rollback`, trees None) is a run like any other whose target is each host's
previous release; if it fails, it is restored the same way.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import secrets
import signal
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fabric import Connection

from core.batches import split
from core.errors import KitError
from core.live import LiveState, digest_of_link, health_address, nginx_error, parse_files, parse_state, tree_diff
from core.outcome import HostOutcome, Step
from core.probe import Health
from core.render import MANIFEST_FILE, Tree
from core.session import DONE, LOCK_FAILED_EXIT, LOCKED, LOCKED_EXIT, STAGED, SWAPPED, Mode, Remote
from core.settings import Host, Settings
from remote.heartbeat import Heartbeat
from remote.probe import live, probe, wait_live
from remote.report import Reporter
from remote.ssh import Session, Ssh, SshError

INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a run as Ctrl-C does: restored
# After a reload an old worker answers a connection or two until it has taken the signal (longer
# on a loaded host): an answer that disagrees with the links is asked again this often, this far
# apart, before it counts (a real disagreement stays; a refusal waits about a second for it).
REASKS, REASK_PAUSE = 4, 0.25


class StepFailed(KitError):
    """A step ran and did not do what it must (nginx -t rejected, reload did not take, probe failed)."""


class Interrupted(KitError):
    """Ctrl-C: the run stops after the steps in flight."""


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
    session: Session | None = None  # open while this run holds the host's rollout lock
    before: LiveState | None = None  # what the host had when this run locked it
    upload: bool = False  # the tree must be uploaded
    reload: bool = False  # nginx must (re)load the target
    touched: bool = False  # a request that changes the live config was sent


class Rollout:
    def __init__(self, settings: Settings, hosts: list[Host], trees: dict[str, Tree] | None, ssh: Ssh,
                 reporter: Reporter, parallel: int = 10, batch: str | None = None, take_over: bool = False):
        """`trees`: host name -> tree to roll out; None rolls every host back to its previous release.
        `take_over`: a host whose live release is another environment's is taken, not refused."""
        self.settings, self.ssh, self.reporter = settings, ssh, reporter
        self.take_over = take_over
        self.parallel, self.batch = max(1, parallel), batch
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        self.hosts = [
            _Host(h, Remote.of(settings, h), trees[h.name] if trees else None,
                  HostOutcome(h.name, h.instance_id, h.address, target=trees[h.name].digest if trees else ""))
            for h in hosts
        ]
        self._payloads: dict[str, bytes] = {}
        self.diffs: dict[str, str] = {}  # check: host -> unified diff of live vs new files
        self.interrupted = threading.Event()
        self._restoring = False
        self._sigints = 0
        self._ended = threading.Event()

    @property
    def outcomes(self) -> list[HostOutcome]:
        return [h.outcome for h in self.hosts]

    def targets(self) -> dict[str, str]:
        """Instance ID -> the digest this run puts it on (hosts with an instance ID and a tree)."""
        return {h.host.instance_id: h.tree.digest for h in self.hosts if h.host.instance_id and h.tree}

    @property
    def touched(self) -> bool:
        return any(h.touched for h in self.hosts)

    def dropped_ports(self) -> set[int]:
        """The ports some host serves now (its live release's manifest) that its new config does not."""
        from core.render import served_ports

        return self.live_ports(changing=True) - served_ports(self.settings)

    def live_ports(self, changing: bool = False) -> set[int]:
        """The ports the hosts' live releases serve (their manifests), of the hosts this run changes."""
        out: set[int] = set()
        for h in self.hosts:
            ports = h.before.manifest.get("ports") if h.before and (h.reload or not changing) else None
            if isinstance(ports, dict):
                out |= {int(p) for p in ports.values() if str(p).isdigit()}
        return out

    @property
    def rolling_back(self) -> bool:
        """`fab rollback`: every host goes to its previous release (no tree of ours)."""
        return all(h.tree is None for h in self.hosts)

    # -- the run's frame: interrupts, heartbeat, closing ---------------------------------------

    @contextlib.contextmanager
    def guarded(self) -> Iterator[Rollout]:
        """While the run lasts: Ctrl-C, SIGTERM and SIGHUP (a cancelled CI job, a closed terminal)
        are noted alike (never raised mid-step: the run restores what it changed), every open
        session hears from us (or the host ends it after ssh.idleTimeout), and everything is closed
        at the end; the previous signal handlers are put back."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_interrupt) for sig in INTERRUPTS}
        heartbeat = Heartbeat(self._open_sessions, max(1.0, self.settings.ssh.idle_timeout / 3)).start()
        threading.Thread(target=self._watch_interrupts, daemon=True).start()
        try:
            yield self
        finally:
            self._ended.set()
            heartbeat.stop()
            self._close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_interrupt(self, signum, frame) -> None:
        self._sigints += 1  # only this: a handler that prints or takes a lock can break the main thread

    def _watch_interrupts(self) -> None:
        seen = 0
        while not self._ended.wait(0.05):
            if self._sigints == seen:
                continue
            seen = self._sigints
            if self._restoring:
                self.reporter.note("interrupt: restoring the hosts; the interrupt is deferred until every host is back")
            elif not self.interrupted.is_set():
                self.reporter.note("interrupt: stopping after the steps in flight; every host this run changed "
                                   "will be put back")
            self.interrupted.set()

    def _open_sessions(self) -> list[Session]:
        """The sessions the heartbeat pings (a broken one is not: nothing more is sent on it)."""
        return [s for h in self.hosts if (s := h.session) is not None and not s.broken]

    def _close(self) -> None:
        """Release every lock (closing a session ends the command holding it) and disconnect."""
        for h in self.hosts:
            if h.session:
                h.session.close()
            if h.conn:
                h.conn.close()
        self.ssh.close()

    # -- phases ------------------------------------------------------------------------------

    def prepare(self, mode: Mode = Mode.ROLLOUT) -> bool:
        """Connect, lock and read every host that needs work; nothing changes."""
        return self._each(self.hosts, lambda h: self._prepare(h, mode))

    def stage(self) -> bool:
        """Upload and `nginx -t` on every host that needs the tree (`stopped` discards the stages)."""
        return self._each([h for h in self.hosts if h.upload], self._stage)

    def discard(self) -> None:
        """Remove the stage of every host that has one and was not swapped."""
        self._each([h for h in self.hosts if h.upload and not h.touched and h.session and not h.session.broken],
                   self._discard, quiet=True, always=True)

    def go_live(self) -> bool:
        """Batch by batch: swap, reload, probe. Stops at the first batch with a failure."""
        for group in split([h for h in self.hosts if h.reload], self.batch):
            if not self._each(group, self._go_live):
                return False
        return True

    def lock_unchanged(self) -> bool:
        """Lock every host that had nothing to do and prove, under the lock, that it still serves
        the target from `current` (the record is written while every host's lock is held)."""
        return self._each([h for h in self.hosts if not h.session], self._confirm_unchanged)

    def finish(self) -> None:
        for h in self.hosts:
            if h.outcome.ok is None:
                h.outcome.finish()

    def stopped(self) -> None:
        """Discard what was staged and not used; mark hosts that never got their turn."""
        self.discard()
        why = "stopped: interrupted" if self.interrupted.is_set() else "stopped: another host failed"
        for h in self.hosts:
            if h.outcome.ok is None and not h.outcome.error:
                h.outcome.error = why

    def restore(self) -> bool:
        """After a failure: every host this run may have changed goes back to what it had; False if
        any could not."""
        todo = [h for h in self.hosts if h.touched]
        if not todo:
            return True
        self._restoring = True
        if self.interrupted.is_set():
            self.reporter.note("restoring: further interrupts are deferred until it ends")
        self.reporter.note(f"restoring {len(todo)} host(s) this run changed")
        self._each(todo, self._restore, quiet=True, always=True)
        return not any(h.outcome.restore_failed for h in todo)

    def check(self) -> bool:
        """Dry run: stage and test on every host, report what would change, change nothing live."""
        with self.guarded():
            ok = self.prepare(Mode.CHECK)
            todo = [h for h in self.hosts if h.upload and h.session]
            ok = self._each(todo, self._stage) and ok
            self._each(todo, self._discard, quiet=True)
            self._each(todo, self._diff, quiet=True)
            for h in self.hosts:
                if h.outcome.ok is None and not h.outcome.error:
                    h.outcome.finish()
                h.outcome.planned = "would change" if h.upload or h.reload else "unchanged"
            return ok

    def _each(self, hosts: list[_Host], fn: Callable[[_Host], None], quiet: bool = False,
              always: bool = False) -> bool:
        """Run `fn` on every host, `parallel` at a time; False if any host failed (or Ctrl-C came,
        unless `always`: the restore runs to its end)."""
        def guarded(h: _Host) -> bool:
            try:
                if self.interrupted.is_set() and not always:
                    raise Interrupted("interrupted before this step")
                fn(h)
                return True
            except Interrupted:
                return False
            except KitError as exc:
                if not quiet:
                    h.outcome.fail(h.outcome.step, str(exc))
                    self.reporter.failed(h.outcome)
                return False

        if not hosts:
            return not self.interrupted.is_set() or always
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(hosts))) as pool:
            ok = all(list(pool.map(guarded, hosts)))
        return ok and (always or not self.interrupted.is_set())

    def _step(self, h: _Host, step: Step) -> None:
        h.outcome.step = step
        self.reporter.step(h.outcome)

    # -- per host ----------------------------------------------------------------------------

    def _address(self, h: _Host) -> str:
        return self.settings.bind_of(h.host) or "127.0.0.1"

    def _prepare(self, h: _Host, mode: Mode) -> None:
        """Connect; if nginx already runs the target from `current`, that is all; else lock and read."""
        self._step(h, Step.CONNECT)
        h.conn = self.ssh.connect(h.host)
        if h.tree is not None:  # one channel to the health port, no remote shell
            seen = live(self.ssh, h.conn, self._address(h), self.settings.ports.health)
            if seen and seen.serves(h.tree.digest):
                h.outcome.before = h.outcome.after = seen.digest
                return
        state = self._lock(h, mode)
        h.before = state
        h.outcome.before = digest_of_link(state.current)
        if h.tree is None:  # rollback: the previous release becomes current
            h.outcome.target = digest_of_link(state.previous) or ""
            if not h.outcome.target:
                raise StepFailed(f"no previous release to roll back to under {h.remote.root}")
        if mode is Mode.ROLLOUT:
            h.before = self._as_it_runs(h, state)
        if h.tree is None:
            h.reload = True
            return
        h.upload = h.outcome.before != h.tree.digest
        if not h.upload:  # `current` names the target: is it what nginx runs? (asked again, under the lock)
            seen = live(self.ssh, h.conn, self._address(h), self.settings.ports.health)
            if seen and seen.digest == h.tree.digest:
                h.outcome.after = seen.digest
                return
        h.reload = True  # the tree is new, or it is current but not what nginx runs

    def _as_it_runs(self, h: _Host, state: LiveState) -> LiveState:
        """What a restore must bring back: the state as reported, or, when nginx runs this run's
        target while `current` names another release, with `current` naming the target. A host
        whose nginx runs a third release is refused (a restore would load the wrong one), and so is
        one whose nginx answers on none of the health ports its releases and the settings name
        (what it runs is unknown: a run that changes the health port asks the new one, where the
        release nginx still runs does not answer)."""
        if state.nginx != "ours":
            return state
        asked = state.health_ports(self._address(h), self.settings.ports.health)
        seen = None
        for address, port in asked:
            seen = live(self.ssh, h.conn, address, port)  # type: ignore[arg-type]
            if seen:
                break
        if seen is None:
            raise StepFailed(state.unanswered(asked, h.remote))
        target = h.outcome.target
        seen = self._reasked(h, address, port, seen, lambda d: not state.disagreement(d, target, h.remote))
        running = seen.digest
        why = state.disagreement(running, target, h.remote)
        if why:
            raise StepFailed(why)
        if running == target and digest_of_link(state.current) != target:
            if h.tree:
                manifest = json.loads(h.tree.files.get(MANIFEST_FILE) or "{}")
            else:  # a rollback: the target is the release `previous` names
                manifest = state.previous_manifest if digest_of_link(state.previous) == target else {}
            return state.running(target, manifest if isinstance(manifest, dict) else {})
        return state

    def _lock(self, h: _Host, mode: Mode = Mode.ROLLOUT, wait: int = 0) -> LiveState:
        """Open the host's session: take its rollout lock; the live state it reports. Refuses a
        host whose pid file names an nginx this kit did not start."""
        self._step(h, Step.LOCK)
        assert h.conn is not None
        stage = f".stage-{self.run_id}"
        command = h.remote.session(self.run_id, stage, h.outcome.target, mode, wait)
        timeout = wait + self.settings.ssh.command_timeout if wait else None
        r, session = self.ssh.hold(h.conn, command, LOCKED, DONE, timeout=timeout)
        if r.exited == LOCKED_EXIT:
            raise StepFailed(f"another run holds the lock on {h.remote.root} "
                             f"(run {parse_state(r.stdout).get('locked') or '?'}); it is released when that run ends")
        if r.exited == LOCK_FAILED_EXIT:
            raise StepFailed(f"cannot take the lock: {nginx_error(r.stderr)}: util-linux's flock must work on "
                             "the host (docs/troubleshooting.md#flock-failed)")
        if session is None:
            raise StepFailed(f"cannot inspect {h.remote.root}: {nginx_error(r.stderr + r.stdout)}")
        h.session = session
        state = LiveState.parse(r.stdout)
        foreign = state.foreign(h.remote)
        if foreign:
            raise StepFailed(foreign)
        theirs = state.manifest.get("env")
        if theirs and theirs != self.settings.env and mode is Mode.ROLLOUT:
            if not self.take_over:
                raise StepFailed(
                    f"the live release under {h.remote.root} is environment {theirs!r}'s, not {self.settings.env!r}'s: "
                    "two environments must not share a host's nginx.root (the other one's load balancer would "
                    "lose what it sends to). Give each its own root, or take the host over on purpose with "
                    f"`fab rollout --env {self.settings.env} --take-over` "
                    "(docs/operations.md#taking-a-host-from-another-environment)")
            self.reporter.note(f"{h.host.name}: taking the host over from environment {theirs!r} (--take-over)")
        if state.stale:
            self.reporter.note(f"{h.host.name}: removed {state.stale} stage(s) left by interrupted runs")
        return state

    def _reasked(self, h: _Host, address: str, port: int, seen: Health, agrees: Callable[[str], bool]) -> Health:
        """`seen`, or, when `agrees` says no to what it runs, a later answer from the same port: an old
        worker may answer just after a reload (REASKS)."""
        for _ in range(REASKS):
            if agrees(seen.digest):
                break
            time.sleep(REASK_PAUSE)
            seen = live(self.ssh, h.conn, address, port) or seen  # type: ignore[arg-type]
        return seen

    def _confirm_unchanged(self, h: _Host) -> None:
        state = self._lock(h)
        address, target = self._address(h), h.outcome.target
        seen = live(self.ssh, h.conn, address, self.settings.ports.health)  # type: ignore[arg-type]
        if seen:
            seen = self._reasked(h, address, self.settings.ports.health, seen, lambda d: d == target)
        if digest_of_link(state.current) != target or not seen or seen.digest != target:
            raise StepFailed(f"changed since it was inspected: `current` names {state.current or 'nothing'}, "
                             f"nginx runs {(seen.digest if seen else 'unknown')[:12]}, expected {target[:12]}")

    def _stage(self, h: _Host) -> None:
        """Upload the tree into the stage and `nginx -t` the whole staged tree: one request."""
        self._step(h, Step.UPLOAD)
        assert h.session is not None and h.tree is not None
        r = h.session.request("stage", self._payload(h.tree))
        if STAGED not in r.stdout:
            raise StepFailed(f"upload failed: {nginx_error(r.stdout)}")
        h.outcome.step = Step.TEST
        if not r.ok:
            raise StepFailed(f"nginx -t rejected the new config: {nginx_error(r.stdout.split(STAGED)[-1])}")

    def _diff(self, h: _Host) -> None:
        assert h.session is not None and h.tree is not None
        self.diffs[h.host.name] = tree_diff(parse_files(h.session.request("show").stdout), h.tree.files)

    def _discard(self, h: _Host) -> None:
        assert h.session is not None
        h.session.request("discard")

    def _go_live(self, h: _Host) -> None:
        """Swap (when the tree changes) and reload: one request; then the probe."""
        assert h.session is not None and h.conn is not None
        digest = h.outcome.target
        self._step(h, Step.SWAP)
        h.touched = True  # from here on the host may have changed, whatever answer comes back
        if h.tree is None or h.upload:
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
        problems = self._rollback_probe(h, digest) if h.tree is None else None
        if problems is None:
            problems = probe(self.ssh, h.conn, self.settings, self._address(h), digest)
        if problems:
            raise StepFailed("; ".join(problems))
        h.outcome.after = digest
        h.outcome.finish()
        self.reporter.done(h.outcome)

    def _rollback_probe(self, h: _Host, digest: str) -> list[str] | None:
        """A rollback onto a release that serves other ports than the settings name (its release.json
        says so: the ports changed since): proven on its own health port and address, since the
        settings' port checks would ask ports it does not serve; None: the usual probe applies."""
        from core.render import manifest_ports

        assert h.before is not None and h.conn is not None
        manifest = h.before.previous_manifest
        ports, settings_ports = manifest.get("ports"), manifest_ports(self.settings)
        if not isinstance(ports, dict) or ports == settings_ports:
            return None
        address, port = health_address(manifest, self._address(h), self.settings.ports.health)
        seen = wait_live(self.ssh, h.conn, address, port, digest)
        if not seen or seen.digest != digest:
            return [f"port {port} says {seen.digest[:12] if seen else 'nothing'} after the rollback to {digest[:12]}"]
        self.reporter.note(f"{h.host.name}: its previous release serves ports {ports}, not the settings' "
                           f"{settings_ports}: proven on its own health port {port} only")
        return []

    def _restore(self, h: _Host) -> None:
        """Both links and nginx exactly as they were when this run locked the host, proven on the
        restored release's own health port."""
        note, step = h.outcome, h.outcome.step
        assert h.before is not None
        try:
            if h.session is None or h.session.broken:
                self._reconnect(h)
            assert h.session is not None
            try:
                r = h.session.request("restore", h.before.restore_line())
            except SshError:  # the session was dead without anyone noticing yet (idle, a lost probe)
                self._reconnect(h)
                assert h.session is not None
                r = h.session.request("restore", h.before.restore_line())
            assert h.conn is not None
            if not r.ok:
                raise StepFailed(f"restore failed: {nginx_error(r.stdout.split(SWAPPED)[-1])}")
            before = digest_of_link(h.before.current)
            if before and h.before.nginx == "ours":
                address, port = health_address(h.before.manifest, self._address(h), self.settings.ports.health)
                seen = wait_live(self.ssh, h.conn, address, port, before)
                if not seen or seen.digest != before:
                    raise StepFailed(f"port {port} says {seen.digest[:12] if seen else 'nothing'} after restoring "
                                     f"{before[:12]}")
            note.restored, note.step = True, step
            if note.ok:  # it was ready, then put back because another host failed
                note.ok, note.error = False, "restored: another host failed"
            self.reporter.restored(note)
        except KitError as exc:
            note.ok, note.restore_failed, note.step = False, True, step
            known = (f"`current` was {h.before.current or 'absent'}, `previous` {h.before.previous or 'absent'} "
                     "before this run")
            note.error = f"{note.error}; RESTORE FAILED: {exc} ({known})".lstrip("; ")
            self.reporter.failed(note)

    def _reconnect(self, h: _Host) -> None:
        """A fresh connection and session for a host whose session was lost; waits for its lock
        (the lost session's command may still hold it until its request ends)."""
        self.reporter.note(f"{h.host.name}: reconnecting to restore it")
        if h.session:
            h.session.close()
        if h.conn:
            h.conn.close()
        h.session = None
        h.conn = self.ssh.reconnect(h.host)  # bounded retries: a bastion that dropped once is tried again
        wait = self.settings.ssh.command_timeout + self.settings.ssh.idle_timeout
        self._lock(h, Mode.ROLLOUT, wait)

    def _payload(self, tree: Tree) -> bytes:
        """The tree as one base64 line (a tar), made once per distinct tree."""
        if tree.digest not in self._payloads:
            self._payloads[tree.digest] = base64.b64encode(archive(tree))
        return self._payloads[tree.digest]
