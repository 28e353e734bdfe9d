"""The order of a run, in one place: what happens, in which order, and what a failure means.

Turning the PROXY protocol on (or changing config while it is on):
  1. connect, lock and inspect every host; nothing changes;
  2. every AWS read the run depends on: the stored record, and where the load balancer sends
     traffic and the PROXY header now (a rollback: only when turning off, or with --apply);
  3. upload and `nginx -t` every host; a failure discards every stage: nothing changed;
  4. go live, batch by batch (swap, reload, probe);
  5. lock the hosts that had nothing to do and prove them under the lock;
  6. write the readiness record;
     any failure (or Ctrl-C) from 4 to 6: every host this run may have changed goes back to
     exactly what it had, and the record is put back as it was (read back to prove it);
  7. with --apply, after the locks are released: `pulumi up`, then check through the AWS API
     that the header goes to exactly `settings.proxy_ports` (none, with the protocol off): a
     Classic ELB's ProxyProtocol policy on the plain ports, or a network load balancer's
     listeners forwarding to the proxy target groups.

Turning it off runs 1-3 the same, then the load balancer stops sending the header before any
host stops reading it: with --apply, `pulumi up` detaches the policy or moves the listeners back
to the plain groups (checked through the AWS API; a network load balancer's then get
`deregistrationDelay` seconds to move, while the hosts still read it); without it, a header
still sent refuses the run. The record is deleted, then the hosts go live. Once this run stopped
the header the hosts are not rolled back on a failure: the old config would reject every
request the load balancer now sends. The failed hosts are named and the exit code says a
person is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.elb import drain_seconds
from core.errors import KitError
from core.plan import HostOutcome
from core.render import served_ports
from remote.background import Background
from remote.balancer import Balancer, Traffic, header_ports, traffic
from remote.readiness import ParameterRecord
from remote.rollout import Rollout

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


def rollout(run: Rollout, record: ParameterRecord | None = None, balancer: Balancer | None = None,
            apply: bool = False, now: Traffic | None = None) -> Verdict:
    """One rollout (or rollback, with trees None) in the order above (`now`: the load balancer's
    traffic, when the caller read it already to render)."""
    verdict = Verdict()
    turning_off = not run.settings.proxy_protocol
    # The ports that get the header matter when turning off (refuse, or stop it) and for --apply
    # (its check at the end needs the same read), overlapping step 1.
    # Read on every run: it also refuses a load balancer of the other kind under this name.
    # A rollback reads only what it needs (an emergency path must not wait on more of AWS).
    reads = balancer and (turning_off or apply or not run.rolling_back)
    read = now
    traffic_read = Background(lambda: read if read else traffic(run.settings) if reads else Traffic([], []))
    with run.guarded():
        if not run.prepare():                                                 # 1
            return _stopped(run, verdict)
        try:                                                                  # 2
            if record:
                record.load()
            now = traffic_read.result()
            attached, forwarded = now.header, now.forwarded
        except KitError as exc:
            verdict.fail(f"before any change: {exc}")
            return _stopped(run, verdict)
        lost = sorted(set(forwarded) - served_ports(run.settings) - set(attached if turning_off else []))
        if turning_off and attached and forwarded:  # the listeners go back to the plain ports: served now?
            unserved = {run.settings.ports.http, run.settings.ports.tls} - run.live_ports()
            retired = sorted(unserved & set(now.retired))
            if retired and not run.rolling_back:
                verdict.fail(f"the hosts no longer serve plain ports {retired} (the load balancer retired their "
                             "groups) and the listeners would go back there: `fab rollout --apply` serves and "
                             "proves them again first, then switches back; nothing was changed")
                return _stopped(run, verdict)
            if unserved and not run.rolling_back:
                verdict.fail(f"the listeners would go back to plain ports {sorted(unserved)}, which no host serves "
                             "yet: change ports.http/ports.tls while proxy protocol is on (the hosts then serve "
                             "them before any listener moves back); nothing was changed")
                return _stopped(run, verdict)
        if lost and not run.rolling_back:
            verdict.fail(f"the load balancer's listeners forward to ports {lost}, which the new config no longer "
                         "serves: every request through them would fail until the listeners move. Change a port "
                         "while no listener forwards to it (the plain ports while proxy protocol is on, the proxy "
                         "ports while it is off); nothing was changed")
            return _stopped(run, verdict)
        if turning_off and attached and not apply:
            verdict.fail(f"the load balancer still sends the PROXY header to ports {attached}: nginx must keep "
                         "reading it until the load balancer stops. Run `pulumi up` with proxyProtocol: false "
                         "first, or `fab rollout --apply`; nothing was changed")
            return _stopped(run, verdict)
        if not run.stage():                                                   # 3
            return _stopped(run, verdict)
        detached = False
        if turning_off and attached:
            assert balancer is not None
            try:
                _apply(run, balancer, want=[], before=attached)
            except KitError as exc:
                verdict.fail(f"stopping the PROXY header at the load balancer: {exc}; no host was changed",
                             code=ATTENTION)
                return _stopped(run, verdict)
            detached = True
        dropped = run.dropped_ports()
        if detached or dropped - set(now.retired):
            # whoever moved the load balancer off those ports, and whenever: it may still send there
            # (a retired plain port: AWS itself drained its group for deregistrationDelay already)
            _drain(run)
        try:
            if turning_off and record:
                record.delete()
            elif record and not run.rolling_back and dropped:
                record.withdraw_plain(dropped)  # written ahead: never a claim of a port no longer served
            ready = run.go_live()                                             # 4
            if ready and not turning_off and record and record.needs(run.outcomes):
                ready = run.lock_unchanged()                                  # 5
                if ready:
                    record.write(run.outcomes)                                # 6
        except Exception as exc:  # noqa: BLE001 - whatever fails after a swap, the hosts go back
            ready = False
            verdict.fail(str(exc) if isinstance(exc, KitError) else f"{type(exc).__name__}: {exc}")
        if not ready:
            if detached:
                verdict.fail("the load balancer no longer sends the PROXY header, so no host was put back on a "
                             "config that reads it; fix the failed hosts and run `fab rollout` again", code=ATTENTION)
            else:
                _roll_back(run, record, verdict)
            return _stopped(run, verdict)
        run.finish()
    if run.interrupted.is_set():
        verdict.fail("interrupted after the last step: every host is ready and recorded", INTERRUPTED)
        return verdict
    if apply and balancer and not detached:                                   # 7
        try:
            _apply(run, balancer, want=[] if turning_off else sorted(run.settings.proxy_ports), before=attached)
        except KitError as exc:
            verdict.fail(f"every host is ready and recorded, but {exc}")
        except KeyboardInterrupt:
            verdict.fail("interrupted during pulumi up: every host is ready and recorded; run `pulumi up` "
                         "(or `fab status`) to see where the load balancer stands", INTERRUPTED)
    return verdict


def _roll_back(run: Rollout, record: ParameterRecord | None, verdict: Verdict) -> None:
    all_back = False
    try:
        all_back = run.roll_back()
        if not all_back:
            verdict.fail("not every host could be put back: see ROLLBACK FAILED", code=ATTENTION)
    except Exception as exc:  # noqa: BLE001 - the record is still put back, the table still printed
        verdict.fail(f"rolling back: {type(exc).__name__}: {exc}", code=ATTENTION)
    if record:
        try:
            record.undo(all_back)
        except Exception as exc:  # noqa: BLE001
            verdict.fail(str(exc) if isinstance(exc, KitError) else f"{type(exc).__name__}: {exc}", code=ATTENTION)


def _drain(run: Rollout) -> None:
    """The hosts keep reading the header while the load balancer moves off the ports it sent it to
    (core.elb.drain_seconds); an interrupt ends the wait."""
    seconds = drain_seconds(run.settings)
    if seconds:
        run.reporter.note(f"the hosts keep serving the ports they drop for {seconds}s while the load balancer "
                          "moves off them (loadBalancer.deregistrationDelay)")
        run.interrupted.wait(seconds)


def _stopped(run: Rollout, verdict: Verdict) -> Verdict:
    run.stopped()
    verdict.fail(None, INTERRUPTED if run.interrupted.is_set() else FAILED)
    return verdict


def _apply(run: Rollout, balancer: Balancer, want: list[int], before: list[int]) -> None:
    """`pulumi up`, then prove through the AWS API that the header goes to exactly the ports `want`
    (`before`: where it went when the run started; a switch is then followed by a health proof)."""
    outputs = balancer.apply(run.reporter.note)
    have = header_ports(run.settings)
    if have != want:
        raise KitError(f"after pulumi up the load balancer sends the PROXY header to ports {have or 'none'}, "
                       f"expected {want or 'none'}; gate: {outputs.get('proxyProtocolGate')}: "
                       f"{outputs.get('gateMessage')}")
    run.reporter.note(f"verified: the load balancer sends the PROXY header to ports {have or 'none'}")
    if run.settings.load_balancer.type == "network" and have != before:
        _healthy(run)


def _healthy(run: Rollout, timeout: float = 300, every: float = 5) -> None:
    """A network load balancer does not health-check a group no listener uses: after a switch,
    prove every instance in the groups the listeners forward to now healthy (those waiting to join
    are the gate's: `fab status` names them)."""
    from remote import aws

    deadline = time.monotonic() + timeout
    while True:
        state = aws.network_state(run.settings)
        if state is None:
            raise KitError("the network load balancer is gone after pulumi up")
        health = aws.target_health(aws.group_health(state))
        sick = {i: health.get(i, "no health reported") for i in state.serving
                if not health.get(i, "").startswith("InService")}
        if not sick:
            run.reporter.note("verified: every registered instance is healthy in the groups the listeners forward to")
            return
        if run.interrupted.wait(every):
            raise KitError("interrupted while waiting for the targets to be healthy after the switch")
        if time.monotonic() > deadline:
            raise KitError("after the switch not every instance is healthy in the target groups the listeners "
                           "forward to: " + "; ".join(f"{i}: {why}" for i, why in sorted(sick.items())))


def failed_hosts(outcomes: list[HostOutcome]) -> list[HostOutcome]:
    """The hosts whose own step failed (not those put back because another failed)."""
    return [o for o in outcomes if o.ok is False and not o.error.startswith("restored")]
