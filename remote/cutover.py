"""The order of a run, in one place: what happens, in which order, and what a failure means.

Turning the PROXY protocol on (or changing config while it is on):
  1. connect, lock and inspect every host; nothing changes;
  2. every AWS read the run depends on: the stored record, and where the load balancer sends
     traffic and the PROXY header now (a rollback: only when turning off, or with --apply);
     a run that would break what the load balancer sends now is refused, and so is one the load
     balancer could not follow (--apply without a working applier; the header on while the gate
     over the record this run would write stays closed): nothing changed;
  3. upload and `nginx -t` every host; a failure discards every stage: nothing changed;
     a port some host stops serving first gets the load balancer's drain time (network:
     `deregistrationDelay`) to move off it;
  4. go live, batch by batch (swap, reload, probe), once the record claims nothing they stop serving;
  5. lock the hosts that had nothing to do and prove them under the lock;
  6. write the readiness record;
  7. with --apply, every host's lock still held (with --apply all are taken in step 1: the
     environment's lock): `pulumi up`, then check through the AWS API that the header goes to
     exactly `settings.proxy_ports` (none, with the protocol off): a Classic ELB's ProxyProtocol
     policy on the plain ports, or a network load balancer's listeners forwarding to the proxy
     target groups;
     any failure (or Ctrl-C) from 4 to 6, or a failed `pulumi up` that left a Classic ELB sending
     the header to none of the ports the hosts now read it on: every host this run may have
     changed is restored to exactly what it had, and the record is put back as it was (read back
     to prove it).

Turning it off runs 1-3 the same, then the load balancer stops sending the header before any
host stops reading it: with --apply, `pulumi up` detaches the policy or moves the listeners back
to the plain groups (checked through the AWS API; a network listener moves back only once AWS
says every target of its plain group healthy: the run waits for that, the hosts still reading
the header, and applies again; a network load balancer's then get `deregistrationDelay` seconds
to move, while the hosts still read it); without it, a header
still sent refuses the run. The record is deleted, then the hosts go live. Once this run stopped
the header the hosts are not restored after a failure: the old config would reject every
request the load balancer now sends. The failed hosts are named and the exit code says a
person is needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from core.errors import KitError
from core.gate import follow_refusal
from core.health import described, not_in_service, sick_groups
from core.listeners import PLAIN, PROXY, drain_seconds, network_listeners
from core.outcome import HostOutcome
from core.probe import plain_proven, proven_ports
from core.record import build
from core.render import served_ports
from remote.applier import Applier, ready
from remote.background import Background
from remote.readiness import ParameterRecord
from remote.report import Progress, reading
from remote.rollout import Rollout

if TYPE_CHECKING:
    from awsapi.balancer import Traffic

OK, FAILED, ATTENTION, INTERRUPTED = 0, 1, 3, 130  # exit codes
_RANK = {OK: 0, FAILED: 1, INTERRUPTED: 2, ATTENTION: 3}  # the code that says most wins


@dataclass
class Verdict:
    """How a run ended: the code the process exits with, and what a person must know."""

    code: int = OK
    problems: list[str] = field(default_factory=list)  # run-level failures (AWS, record, load balancer)

    @property
    def ok(self) -> bool:
        return self.code == OK

    def fail(self, problem: str | None, code: int = FAILED) -> None:
        if problem:
            self.problems.append(problem)
        self.code = max(self.code, code, key=_RANK.__getitem__)


def rollout(run: Rollout, record: ParameterRecord | None = None, applier: Applier | None = None,
            apply: bool = False, now: Traffic | None = None) -> Verdict:
    """One rollout (or rollback, with trees None) in the order above (`now`: the load balancer's
    traffic, when the caller read it already to render)."""
    cut = _Cutover(run, record, applier, apply)
    reading = cut.start_reading(now)  # in the background, overlapping step 1
    with run.guarded():
        try:
            cut.lock_and_inspect()                                            # 1
            cut.read_aws(reading)                                             # 2
            cut.refuse_what_would_break()
            cut.refuse_what_the_load_balancer_cannot_follow()
            cut.upload_and_test()                                             # 3
            cut.prepare_record()  # the record to write fits Parameter Store, known before any change
            cut.stop_the_header()  # turning off: the load balancer stops sending it first
            cut.drain()
            with cut.restored_on_failure():  # any failure from 4 to 7
                cut.withdraw_claims()
                cut.go_live()                                                 # 4
                if cut.record_needed():
                    cut.lock_unchanged()                                      # 5
                    cut.write_record()                                        # 6
                cut.apply_and_check()                                         # 7
        except _Stop:
            return cut.stopped()
        run.finish()
    return cut.verdict


class _Stop(Exception):
    """The run ends before its last step: the verdict and the hosts' table say why."""


class _NotReady(Exception):
    """A host step failed (the host's outcome says why): the hosts are put back."""


class _Cutover:
    """One run through the steps above: each method is a step, and keeps what the steps after it need."""

    def __init__(self, run: Rollout, record: ParameterRecord | None, applier: Applier | None, apply: bool):
        self.run, self.record, self.applier, self.apply = run, record, applier, apply
        self.verdict = Verdict()
        self.turning_off = not run.settings.proxy_protocol
        # no load balancer served sends the header (during a move: neither): no readiness record
        self.unrecorded = not any(b.proxy_protocol for b in run.settings.balancers)
        self.now: Traffic | None = None  # where the load balancer sends traffic (step 2)
        self.header_ports: list[int] = []  # the ports it sends the PROXY header to (step 2)
        self.detached = False  # this run stopped the header (turning off)
        self.dropped: set[int] = set()  # ports some host serves now and stops serving

    def start_reading(self, now: Traffic | None) -> Background[Traffic]:
        """The load balancer's traffic, read in the background. The ports that get the header matter
        when turning off (refuse, or stop it) and for --apply (its check at the end needs the same
        read). Read on every run: it also refuses a load balancer of the other kind under this name.
        A rollback reads only what it needs (an emergency path must not wait on more of AWS)."""
        reads = bool(self.applier and (self.turning_off or self.apply or not self.run.rolling_back))
        return Background(lambda: now if now else _traffic(self.run.settings, reads))

    def lock_and_inspect(self) -> None:
        """1. Connect, lock and inspect every host; nothing changes. With --apply every host's lock is
        taken, also of those with nothing to do, and held until after `pulumi up`: the environment's
        lock, so no other run changes a host while the load balancer may change."""
        if not self.run.prepare():
            raise _Stop
        if self.apply and not self.run.lock_unchanged():
            raise _Stop

    def read_aws(self, reading: Background) -> None:
        """2. The stored record, and where the load balancer sends traffic and the header now."""
        try:
            if self.record:
                self.record.load()
            now = reading.result()
        except KitError as exc:
            self._stop(f"before any change: {exc}")
        self.now, self.header_ports = now, now.header_ports
        self._say_the_classic_window()

    def _say_the_classic_window(self) -> None:
        """A Classic ELB turns the header on or off in place, node by node: say what that costs,
        and the way that costs nothing (a second load balancer and a DNS switch)."""
        s = self.run.settings
        if s.load_balancer.type != "classic" or not self.apply or self.run.rolling_back or s.moving_to is not None:
            return
        want = [] if self.turning_off else sorted(s.proxy_ports)
        if sorted(self.header_ports) == want:
            return
        self.run.reporter.note(
            f"a Classic ELB turns the PROXY header {'off' if self.turning_off else 'on'} in place, node by node: "
            "requests that meet a node and a host that disagree fail for a few seconds (the cutover window: "
            "docs/concepts.md#the-cutover-window); to fail none, move to a new load balancer with moveTo and dns "
            "(docs/moving.md)")

    def refuse_what_would_break(self) -> None:
        """2, still: a run that would leave a listener on a port no host serves, or the header sent
        to hosts that stop reading it, is refused before any change (a rollback is never refused)."""
        assert self.now is not None
        run, s, forwarded = self.run, self.run.settings, self.now.forwarded
        network = s.load_balancer.type == "network"
        # network, turning off: the listeners leave the proxy ports; a Classic listener stays on its port
        lost = sorted(set(forwarded) - served_ports(s) - set(self.header_ports if self.turning_off and network else []))
        # the listeners go back to the plain ports: served now?
        if network and self.turning_off and self.header_ports and forwarded:
            unserved = {s.ports.http, s.ports.tls} - run.live_ports()
            retired = sorted(unserved & set(self.now.retired))
            if retired and not run.rolling_back:
                self._stop(f"the hosts no longer serve plain ports {retired} (the load balancer retired their "
                           "groups) and the listeners would go back there: `fab rollout --apply` serves and "
                           "proves them again first, then switches back; nothing was changed")
            if unserved and not run.rolling_back:
                self._stop(f"the listeners would go back to plain ports {sorted(unserved)}, which no host serves "
                           "yet: change ports.http/ports.tls while proxy protocol is on (the hosts then serve "
                           "them before any listener moves back); nothing was changed")
        if lost and not run.rolling_back:
            self._stop(f"the load balancer's listeners forward to ports {lost}, which the new config no longer "
                       f"serves: every request through them would fail until the listeners move. {_moving(s)}; "
                       "nothing was changed")
        if self.turning_off and self.header_ports and not self.apply:
            self._stop(f"the load balancer still sends the PROXY header to ports {self.header_ports}: nginx must keep "
                       "reading it until the load balancer stops. Run `pulumi up` with proxyProtocol: false "
                       "first, or `fab rollout --apply`; nothing was changed")

    def refuse_what_the_load_balancer_cannot_follow(self) -> None:
        """2, still: with --apply, the applier can run (the CLI is there, the stack exists); with the
        header on, the gate over the record this run would write sends it to every proxy port (every
        instance it waits for is one of this run's hosts). Else the hosts would read a header the
        load balancer never sends: refused before any change."""
        assert self.now is not None
        if self.apply and self.applier is not None:
            try:
                ready(self.applier)
            except KitError as exc:
                self._stop(f"before any change: --apply cannot run pulumi up: {exc}; nothing was changed")
        s = self.run.settings
        if self.turning_off or self.run.rolling_back:
            return
        served = self.run.targets()
        prospective = build(s.env, proven_ports(s), served, load_balancer=s.load_balancer.name,
                            plain_ports=plain_proven(s))
        refused = follow_refusal(s, reached=set(served), registered=self.now.registered,
                                 header_ports=self.header_ports, record=prospective, present=self.now.present)
        if refused:
            self._stop(refused)

    def upload_and_test(self) -> None:
        """3. Upload and `nginx -t` every host; a failure discards every stage: nothing changed."""
        if not self.run.stage():
            raise _Stop

    def prepare_record(self) -> None:
        """3, still: the record this run will write, from each host's target, must fit Parameter Store
        (a sharded one's shards are written ahead); else the run stops with nothing changed."""
        if self.unrecorded or not self.record:
            return
        try:
            self.record.prepare({o.instance: o.target for o in self.run.outcomes if o.instance and o.target})
        except (KitError, KeyboardInterrupt) as exc:
            self._put_record_back()
            self._stop(f"before any change: {exc}" if isinstance(exc, KitError) else "interrupted before any change")

    def stop_the_header(self) -> None:
        """Turning off: with --apply, `pulumi up` stops the header before any host stops reading it.
        The record's proof is withdrawn first: a `pulumi up` from elsewhere in between must not put
        the header back on its proof (the gate is sticky: the hosts would then drop what it sends).
        The switch fails: no host changed and they still read the header, so the record goes back."""
        if not (self.turning_off and self.header_ports):
            return
        assert self.applier is not None
        try:
            if self.record:
                self.record.withdraw_header()
            _apply(self.run, self.applier, want=[], before=self.header_ports)
        except KitError as exc:
            if self._header_stopped():  # it detached, then failed on something else: go on turning off
                self.run.reporter.note(f"pulumi up failed ({exc}), but the load balancer no longer sends the PROXY "
                                       "header: the hosts stop reading it")
            else:
                self._put_record_back()
                self._stop(f"stopping the PROXY header at the load balancer: {exc}; no host was changed", ATTENTION)
        self.detached = True

    def _header_stopped(self) -> bool:
        """The load balancer sends the header to no port now (read; unreadable: not known, False)."""
        from awsapi.balancer import header_ports

        try:
            return not header_ports(self.run.settings)
        except KitError:
            return False

    def _put_record_back(self) -> None:
        """No host changed: the record goes back as it was (a failure to is the verdict's)."""
        if self.record:
            try:
                self.record.undo()
            except KitError as exc:
                self.verdict.fail(str(exc), ATTENTION)

    def drain(self) -> None:
        """Whoever moved the load balancer off the ports the hosts drop, and whenever: it may still
        send there (a retired plain port: AWS itself drained its group for deregistrationDelay already)."""
        assert self.now is not None
        self.dropped = self.run.dropped_ports()
        if self.detached or self.dropped - set(self.now.retired):
            _drain(self.run)

    @contextlib.contextmanager
    def restored_on_failure(self) -> Iterator[None]:
        """Any failure (or Ctrl-C) from 4 to 6: every host this run may have changed goes back to
        exactly what it had, and the record as it was; once this run stopped the header, no host
        goes back (the old config would reject what the load balancer now sends)."""
        try:
            yield
            return
        except _NotReady:
            pass
        except Exception as exc:  # noqa: BLE001 - whatever fails after a swap, the hosts go back
            self.verdict.fail(str(exc) if isinstance(exc, KitError) else f"{type(exc).__name__}: {exc}")
        if self.detached:
            self.verdict.fail("the load balancer no longer sends the PROXY header, so no host was put back on a "
                              "config that reads it; fix the failed hosts and run `fab rollout` again",
                              code=ATTENTION)
        else:
            _restore(self.run, self.record, self.verdict)
        raise _Stop

    def withdraw_claims(self) -> None:
        """Before any host goes live, the record stops claiming what the hosts stop serving: deleted
        when turning off, or without the plain ports dropped (never a claim of a port no longer served)."""
        if self.unrecorded and self.record:
            self.record.delete()
        elif self.record and not self.run.rolling_back and self.dropped:
            self.record.withdraw_plain(self.dropped)

    def go_live(self) -> None:
        """4. Go live, batch by batch (swap, reload, probe)."""
        if not self.run.go_live():
            raise _NotReady

    def record_needed(self) -> bool:
        """Whether steps 5 and 6 run: the record must change (never when turning off)."""
        return not self.unrecorded and self.record is not None and self.record.needs(self.run.outcomes)

    def lock_unchanged(self) -> None:
        """5. Lock the hosts that had nothing to do and prove them under the lock."""
        if not self.run.lock_unchanged():
            raise _NotReady

    def write_record(self) -> None:
        """6. Write the readiness record (every host's lock held)."""
        assert self.record is not None
        self.record.write(self.run.outcomes)

    def apply_and_check(self) -> None:
        """7. With --apply, every host's lock still held: `pulumi up`, then check through the AWS API.
        If it fails while the load balancer sends the header to none of the ports a Classic ELB's
        hosts now read it on, those hosts would reject every request: they are put back, and the
        record with them. A network load balancer's hosts serve both ports: they stay."""
        applies = self.apply and self.applier and not self.detached
        if self.run.interrupted.is_set():
            if applies and self._hosts_cannot_wait(self._unsent()):  # no pulumi up will come: they cannot stay
                self.verdict.fail("interrupted before pulumi up: the load balancer sends the PROXY header to none "
                                  "of the ports the hosts now read it on, so every host this run changed is put "
                                  "back", INTERRUPTED)
                self._back_without_proof()
            self.verdict.fail("interrupted after the last step: every host is ready and recorded", INTERRUPTED)
            return
        if not applies:
            return
        assert self.applier is not None
        want = [] if self.turning_off else sorted(self.run.settings.proxy_ports)
        try:
            _apply(self.run, self.applier, want=want, before=self.header_ports)
        except KeyboardInterrupt:
            self.verdict.fail("interrupted during pulumi up: every host is ready and recorded; run `pulumi up` "
                              "(or `fab status`) to see where the load balancer stands", INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - whatever failed, what the load balancer does now decides
            why = str(exc) if isinstance(exc, KitError) else f"{type(exc).__name__}: {exc}"
            short = self._unsent()
            if self._hosts_cannot_wait(short):
                self.verdict.fail(f"{why}; the load balancer sends the PROXY header to none of the ports the hosts "
                                  "now read it on, so every host this run changed is put back")
                self._back_without_proof()
            if short:
                self.verdict.fail(f"{why}; the load balancer does not send the PROXY header to port(s) {short}, "
                                  "which the hosts read it on: requests through them fail until `pulumi up` "
                                  "succeeds (run `fab rollout --apply` again)", ATTENTION)
            else:
                self.verdict.fail(f"every host is ready and recorded, but {why}")

    def _back_without_proof(self) -> NoReturn:
        """The hosts go back; the record's proof goes first (a `pulumi up` from elsewhere in between
        must not attach the policy on it while the hosts already read it no more). If the record
        cannot be put back, the hosts stay reading the header: a later `pulumi up` then follows them."""
        if self.record:
            try:
                self.record.undo()
            except KitError as exc:
                self.verdict.fail(f"{exc}; so the hosts stay on the config that reads the header: run `pulumi up` "
                                  "(or `fab rollout --apply`) again", ATTENTION)
                raise _Stop from None
        raise _NotReady

    def _unsent(self) -> list[int]:
        """After a failed `pulumi up`, Classic: the proxy ports the hosts this run made read the header
        on that the load balancer does not send it to, as AWS says now (one read); [] when none, when
        not known (an unreadable load balancer: the hosts stay, the verdict says what failed), or for
        a network load balancer, whose hosts serve both port sets."""
        s = self.run.settings
        if s.load_balancer.type == "network" or self.turning_off or not self.run.touched:
            return []
        from awsapi.balancer import header_ports

        try:
            return sorted(set(s.proxy_ports) - set(header_ports(s)))
        except KitError:
            return []

    def _hosts_cannot_wait(self, unsent: list[int]) -> bool:
        """`unsent` (`_unsent`) is every proxy port: the header reaches none the hosts read it on."""
        return bool(unsent) and set(unsent) == set(self.run.settings.proxy_ports)

    def stopped(self) -> Verdict:
        """The run ended early: unused stages discarded, hosts that never got their turn marked."""
        self.run.stopped()
        self.verdict.fail(None, INTERRUPTED if self.run.interrupted.is_set() else FAILED)
        return self.verdict

    def _stop(self, problem: str, code: int = FAILED) -> NoReturn:
        self.verdict.fail(problem, code)
        raise _Stop


def _moving(settings) -> str:
    """How to move a port a listener forwards to (docs/concepts.md#a-forwarded-port-does-not-change)."""
    if settings.load_balancer.type == "network":
        return ("Change a port while no listener forwards to it (the plain ports while proxy protocol is on, the "
                "proxy ports while it is off)")
    return ("A Classic listener's instance port changes only by deleting and recreating the listener (new "
            "connections refused in between, open WebSockets cut): keep ports.http/ports.tls, or accept that "
            "window: `pulumi up` first (the listener moves to the new port), then `fab rollout --apply`, or "
            "avoid it with a new environment whose load balancer forwards to the new port from the start, DNS "
            "moved over (docs/concepts.md#a-forwarded-port-does-not-change)")


def _traffic(settings, reads: bool) -> Traffic:
    """Where the load balancer sends traffic now (an empty read when the run needs none); botocore
    is imported here, in the background read, not before the first connection."""
    from awsapi.balancer import Traffic, traffic

    return traffic(settings) if reads else Traffic([], [])


def _restore(run: Rollout, record: ParameterRecord | None, verdict: Verdict) -> None:
    """After a failure: every host this run changed, and the record, back as they were."""
    all_back = False
    try:
        all_back = run.restore()
        if not all_back:
            verdict.fail("not every host could be put back: see RESTORE FAILED", code=ATTENTION)
    except Exception as exc:  # noqa: BLE001 - the record is still put back, the table still printed
        verdict.fail(f"restoring: {type(exc).__name__}: {exc}", code=ATTENTION)
    if record:
        try:
            record.undo(all_back)
        except Exception as exc:  # noqa: BLE001
            verdict.fail(str(exc) if isinstance(exc, KitError) else f"{type(exc).__name__}: {exc}", code=ATTENTION)


def _drain(run: Rollout) -> None:
    """The hosts keep reading the header while the load balancer moves off the ports it sent it to
    (core.listeners.drain_seconds); an interrupt ends the wait."""
    seconds = drain_seconds(run.settings)
    if seconds:
        run.reporter.note(f"the hosts keep serving the ports they drop for {seconds}s while the load balancer "
                          "moves off them (loadBalancer.deregistrationDelay, at least switchDrain)")
        run.interrupted.wait(seconds)


def _apply(run: Rollout, applier: Applier, want: list[int], before: list[int]) -> None:
    """`pulumi up`, then prove through the AWS API that the header goes to exactly the ports `want`
    (`before`: where it went when the run started; a switch is then followed by a health proof)."""
    outputs = applier.apply(run.reporter.note)
    waiting = sorted(int(port) for port in outputs.get("healthWaiting") or {})
    if waiting:  # a listener stayed where it was until AWS says the group it moves to healthy: wait, then switch
        _group_healthy(run, waiting, PROXY if want else PLAIN)
        outputs = applier.apply(run.reporter.note)
    from awsapi.balancer import header_ports

    have = header_ports(run.settings)
    if have != want:
        held = "; ".join((outputs.get("healthWaiting") or {}).values())
        raise KitError(f"after pulumi up the load balancer sends the PROXY header to ports {have or 'none'}, "
                       f"expected {want or 'none'}; gate: {outputs.get('proxyProtocolGate')}: "
                       f"{outputs.get('gateMessage')}" + (f"; {held}" if held else ""))
    run.reporter.note(f"verified: the load balancer sends the PROXY header to ports {have or 'none'}")
    if run.settings.load_balancer.type == "network" and have != before:
        _healthy(run)


INTERRUPTED_AFTER = "interrupted while waiting for the targets to be healthy after the switch"


def _pause(run: Rollout, seconds: float, interrupted: str) -> None:
    """A wait's rest between two reads of AWS; an interrupt ends the wait with `interrupted`."""
    if run.interrupted.wait(seconds):
        raise KitError(interrupted)


def _healthy(run: Rollout, timeout: float = 300, every: float = 5) -> None:
    """A network load balancer does not health-check a group no listener uses: after a switch,
    prove every instance in the groups the listeners forward to now healthy (those waiting to join
    are the gate's: `fab status` names them)."""
    from awsapi.balancer import health

    progress = Progress()
    deadline = progress.start + timeout
    while True:
        now = reading(lambda: health(run.settings), deadline, lambda: _pause(run, every, INTERRUPTED_AFTER),
                      run.reporter.note)
        if now is None:
            raise KitError("the network load balancer is gone after pulumi up")
        sick = not_in_service(now.states, now.registered)
        if not sick:
            run.reporter.note("verified: every registered instance is healthy in the groups the listeners forward to")
            return
        _still_waiting(run, progress, timeout, described(sick))
        _pause(run, every, INTERRUPTED_AFTER)
        if time.monotonic() > deadline:
            raise KitError("after the switch not every instance is healthy in the target groups the listeners "
                           f"forward to: {described(sick)}")


def _group_healthy(run: Rollout, ports: list[int], kind: str, timeout: float = 900, every: float = 5) -> None:
    """The listeners on `ports` stayed where they were: wait until AWS says every target of the
    group each moves to `healthy` (`kind`: PROXY, their proxy groups when turning on; PLAIN, their
    plain groups on the way back), which their warm listeners make AWS check (a few health-check
    intervals; AWS says first checks "can take a few minutes"); then the caller applies again."""
    from awsapi.network import network_state

    s = run.settings
    waited = [x for x in network_listeners(s) if x.port in ports]
    groups = [x.group(kind).name for x in waited]
    stay = "plain groups" if kind == PROXY else "proxy groups (the hosts keep reading the header)"
    check = ("that the hosts serve the proxy ports" if kind == PROXY
             else f"that the hosts answer the health port {s.ports.health}")
    run.reporter.note(f"waiting for AWS to report every target of {', '.join(groups)} healthy before the switch"
                      f"{' back' if kind == PLAIN else ''} (at most {timeout:.0f}s)")
    progress = Progress()
    deadline = progress.start + timeout
    while True:
        state = reading(lambda: network_state(s), deadline, lambda: _pause(
            run, every, f"interrupted while waiting for AWS to answer; the listeners stay on the {stay}: run "
                        "`fab rollout --apply` again"), run.reporter.note)
        if state is None:
            raise KitError("the network load balancer is gone after pulumi up")
        sick = sick_groups(state, groups)
        if not sick:
            run.reporter.note(f"verified: every target of {', '.join(groups)} is healthy")
            return
        seen = "; ".join(f"{name}: " + ", ".join(f"{i} {w}" for i, w in sorted(states.items()))
                         for name, states in sorted(sick.items()))
        # nothing forwards to a group any more (another update removed its warm listener): AWS never checks it
        unchecked = [x.group(kind).name for x in waited if x.group(kind).name in sick and x.group(kind).name not in
                     {g.name for g in (*state.listeners.get(x.port, ()), *state.warm.get(x.warm_port, ()))}]
        if unchecked:
            raise KitError(f"no listener forwards to {', '.join(unchecked)} any more, so AWS does not health-check "
                           f"it ({seen}): another update changed the load balancer meanwhile; the listeners stay on "
                           f"the {stay}: run `fab rollout --apply` again")
        _still_waiting(run, progress, timeout, seen)
        _pause(run, every, f"interrupted while waiting for the {kind} groups to be healthy ({seen}); the listeners "
                           f"stay on the {stay}: run `fab rollout --apply` again")
        if time.monotonic() > deadline:
            raise KitError(f"the {kind} groups are not healthy after {timeout:.0f}s ({seen}), so the listeners stay "
                           f"on the {stay}: check {check} (`fab status`) and that the load balancer's security "
                           "group reaches them, then run `fab rollout --apply` again")


def _still_waiting(run: Rollout, progress: Progress, timeout: float, seen: str) -> None:
    """When `progress` says so: what the wait still waits for (a wait of minutes must not look hung)."""
    if progress.due():
        run.reporter.note(f"still waiting for AWS ({progress.waited():.0f}s of at most {timeout:.0f}s): {seen}")
        progress.said()


def failed_hosts(outcomes: list[HostOutcome]) -> list[HostOutcome]:
    """The hosts whose own step failed (not those put back because another failed)."""
    return [o for o in outcomes if o.ok is False and not o.error.startswith("restored")]
