"""Moves between load balancers over sequences of runs cut short in any order (hypothesis,
stateful), against the lab's AWS endpoint (moto: the load balancers, Parameter Store, Route 53).

Every actor is the kit's own code: `fab move` (remote.move.Move) with `pulumi up` failing before
or after it applied (AWS refusing, a failure reported late), Ctrl-C, a rollout failing, a drain
that meets held connections and ends at its bound (with and without --cut); a `pulumi up` by
hand (the lab applier, the program's decisions) and a `fab rollout` by hand between them. The
hosts are modelled by what they serve (port -> framing), set by the rollouts the move asks for,
and their connections on the old load balancer's ports.

After every step: every load balancer that DNS gives weight exists and frames its traffic as the
hosts expect (each port a listener forwards to is served, with the PROXY header exactly where
the load balancer sends it); never every record at weight 0; the old load balancer was deleted
only with no connection open on its ports (or --cut said so).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as run_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from core.errors import KitError
from core.move import MoveError, served
from core.record import ReadinessRecord
from core.settings import Settings, from_config
from tests.conftest import stack_config

pytestmark = pytest.mark.integration

SERVICES = ("ec2", "elb", "elbv2", "ssm", "sts", "route53")
ZONE = "lab.test"
NEW_PORTS = {"http": 18090, "tls": 18091, "health": 18082, "proxyHttp": 18093, "proxyTls": 18094}


def lab_settings(url: str, kind: str) -> Settings:
    """The lab environment against `url`, with DNS and a move of the given kind."""
    from awsapi.clients import client
    from lab.applier import lab_network

    config = {**stack_config("lab"), "aws:endpoints": [{s: url for s in SERVICES}]}
    base = from_config("lab", config, "Pulumi.lab.yaml")
    zone = client(base, "route53").create_hosted_zone(Name=ZONE, CallerReference="moves")["HostedZone"]["Id"]
    vpc, subnets = lab_network(base)
    classic = dict(config["wsgate:loadBalancer"])
    network = {k: v for k, v in classic.items() if k not in ("availabilityZones", "connectionDraining")}
    network.update(type="network", subnets=subnets, vpcId=vpc, deregistrationDelay=1, switchDrain=1)
    if kind == "classic-to-network":
        source, target, on = classic, {**network, "name": "wsgate-lab-nlb"}, True
    elif kind == "network-to-classic":
        source, target, on = {**network, "name": "wsgate-lab-nlb"}, {**classic, "name": "wsgate-lab-b"}, True
    else:  # a Classic ELB's header off -> on, the window-free way
        source, target, on = classic, {**classic, "name": "wsgate-lab-b"}, True
        config["wsgate:proxyProtocol"] = False
    config.update({"wsgate:loadBalancer": source,
                   "wsgate:dns": {"zoneId": zone.rsplit("/", 1)[-1], "name": f"ws.{ZONE}", "ttl": 1, "quiet": 1,
                                  "drainMax": 3, "pause": 1, "steps": [50, 100]},
                   "wsgate:moveTo": {"loadBalancer": target, "proxyProtocol": on, "ports": NEW_PORTS}})
    return from_config("lab", config, "Pulumi.lab.yaml")


class VirtualClock:
    """Time for the move that passes only when it waits: no test sleeps."""

    def __init__(self):
        import threading

        self.t = 0.0
        self.start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.interrupted = threading.Event()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.t)

    def monotonic(self) -> float:
        return self.t

    def wait(self, seconds: float) -> bool:
        self.t += max(seconds, 0.01)
        return False


KINDS = ["classic-off-to-on", "classic-to-network", "network-to-classic"]


class Moves(RuleBasedStateMachine):
    url = ""

    def __init__(self):
        super().__init__()
        self.clock = VirtualClock()
        self.serving: dict[int, str] = {}
        self.open = 0  # connections the hosts hold on the old load balancer's ports
        self.applies = 0
        self.rollouts = 0
        self.fail_apply: tuple[int, str] | None = None
        self.fail_rollout: int | None = None
        self.cut = False

    # --- the actors --------------------------------------------------------------------------------

    def rollout(self, balancers: list[Settings]) -> bool:
        """The hosts' rollout: all of them serve these load balancers' ports, proven and recorded."""
        from awsapi.parameters import write_record

        self.rollouts += 1
        if self.fail_rollout == self.rollouts:
            return False  # a host failed: every host put back, the record unchanged
        serving: dict[int, str] = {}
        for b in balancers:
            serving.update({p: framing for p, (framing, _) in b.served().items()})
        self.serving = serving
        write_record(self.s, ReadinessRecord(
            env=self.s.env, load_balancers=[b.load_balancer.name for b in balancers],
            written_at=datetime.now(timezone.utc),
            proxy_protocol_ports=sorted(p for p, f in serving.items() if f != "plain"),
            plain_ports=sorted(p for p, f in serving.items() if f == "plain"),
            digests={"d" * 64: self.s.instances}))
        return True

    def apply(self, note) -> dict:
        from lab.applier import LabApplier

        self.applies += 1
        source_was = self._exists(self.s)
        fault = self.fail_apply[1] if self.fail_apply and self.fail_apply[0] == self.applies else None
        if fault == "refused":
            raise KitError("AWS refused the update (injected)")
        if fault == "interrupted":
            raise KeyboardInterrupt
        out = LabApplier(self.s).apply(note)
        if source_was and not self._exists(self.s):
            assert self.open == 0 or self.cut, "the old load balancer was deleted while connections were open"
        if fault == "late":
            raise KitError("pulumi up failed after it applied (injected)")
        return out

    def check(self) -> None:
        pass

    @staticmethod
    def _exists(s: Settings) -> bool:
        from remote.move import exists

        return exists(s)

    # --- the rules ---------------------------------------------------------------------------------

    @initialize(kind=st.sampled_from(KINDS))
    def start(self, kind):
        from tests.support.moto import reset

        reset(self.url)
        self.s = lab_settings(self.url, kind)
        self.rollout([self.s])  # the hosts serve the old load balancer alone, as before any move
        self.apply(lambda _: None)  # it exists, with its record at weight 100

    # a fault in one move of three or so: most moves run to their end, or to the drain's bound
    @rule(cut=st.booleans(), fail_apply=st.sampled_from([None, None]) | st.tuples(st.integers(1, 6), st.sampled_from(
        ["refused", "late", "interrupted"])), fail_rollout=st.sampled_from([None, None, None, 1, 2]),
        held=st.sampled_from([0, 1, 2]))
    def move(self, cut, fail_apply, fail_rollout, held):
        """`fab move`, with `held` connections open on the old ports throughout (WebSockets that
        never close: the drain meets its bound)."""
        from remote.move import Move, MoveStopped

        self.open = held

        self.applies, self.rollouts = 0, 0
        self.fail_apply, self.fail_rollout, self.cut = fail_apply, fail_rollout, cut
        move = Move(self.s, self.s.hosts, self, self.rollout, lambda _: None, cut=cut, clock=self.clock,
                    connections=lambda ports: {"lab1": {ports[0]: self.open}})
        try:
            move.run()
        except (MoveStopped, MoveError):
            pass
        finally:
            self.fail_apply, self.fail_rollout = None, None

    @rule()
    def pulumi_up_by_hand(self):
        from lab.applier import LabApplier

        try:
            LabApplier(self.s).apply(lambda _: None)
        except KitError:
            pass

    @rule()
    def rollout_by_hand(self):
        from awsapi.parameters import read_move

        self.rollout(served(self.s, read_move(self.s)))

    # --- what must hold ----------------------------------------------------------------------------

    @invariant()
    def dns_sends_only_where_the_hosts_agree(self):
        from awsapi import route53
        from awsapi.balancer import traffic

        weights = route53.weights(self.s)
        if not weights:
            return
        assert sum(weights.values()) > 0, f"every record at weight 0: {weights}"
        by_name = {b.load_balancer.name: b for b in (self.s, self.s.moving_to)}
        for name, weight in weights.items():
            if not weight:
                continue
            b = by_name[name]
            assert self._exists(b), f"DNS gives {name} weight {weight}, and it does not exist"
            now = traffic(b)
            for port in now.forwarded:
                assert port in self.serving, f"{name} forwards to port {port}, which the hosts do not serve"
                sends = port in now.header_ports
                reads = self.serving[port] != "plain"
                assert sends == reads, (f"{name} {'sends' if sends else 'does not send'} the header to port {port}, "
                                        f"the hosts {'read' if reads else 'do not read'} it there")


@pytest.mark.timeout(900)  # hypothesis shrinking a failure takes longer than a run
def test_moves_cut_short_in_any_order_never_send_where_the_hosts_disagree(aws):
    class Run(Moves):
        url = aws.url

    run_state_machine_as_test(Run, settings=run_settings(
        max_examples=8, stateful_step_count=8, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
