"""The gate over sequences of runs (hypothesis, stateful): settings change (ports, instances,
proxyProtocol), `fab rollout` proves hosts and writes the record, records go stale, partial,
foreign or unreadable, and `pulumi up` is cut short after any subset of its operations. The
load balancer's state carries over between runs, as in AWS; each `pulumi up` decides with the
same function the program uses (`core.gate.plan_for`) from what the load balancer has.

A second actor: `fab rollout --apply` runs step by step (its steps in remote/cutover.py's order:
the pre-flight over the record it would write, hosts going live one by one, the record, then
`pulumi up`; turning off: the record withdrawn, `pulumi up`, then the hosts one by one), and
between any two of its steps a `pulumi up` from another checkout may run, with that checkout's
own idea of proxyProtocol.

After every step: the policy is never on a port where a registered instance serves plain, and
a port only loses the policy through a run whose settings turn proxy protocol off.
"""

from __future__ import annotations

from functools import cache

from hypothesis import settings as run_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core import record as records
from core.gate import follow_refusal, plan_for
from tests.conftest import settings_from

POOL = [f"i-{n:017x}" for n in range(1, 5)]
ENV = "staging"


@cache
def _settings(wanted: bool, tls: int, instances: tuple[str, ...]):
    lb = {"instances": list(instances), "name": f"wsgate-{ENV}"}
    return settings_from(ENV, proxy_protocol=wanted, ports={"http": 80, "tls": tls}, load_balancer=lb)


class Runs(RuleBasedStateMachine):
    @initialize(instances=st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True))
    def start(self, instances):
        self.wanted, self.tls, self.instances = False, 81, list(instances)
        self.hosts: dict[str, dict[int, bool]] = {i: {80: False, 81: False} for i in instances}  # port -> reads PROXY
        self.record_text: str | None = None
        self.attached: set[int] = set()  # what the load balancer has
        self.registered: set[str] = set()
        self.detached_while_wanted: set[int] = set()

    # --- the operator changes the settings ------------------------------------------------------

    def settings(self):
        return _settings(self.wanted, self.tls, tuple(self.instances))

    @rule(wanted=st.booleans())
    def set_proxy_protocol(self, wanted):
        self.wanted = wanted

    @rule(tls=st.sampled_from([81, 82]))
    def change_tls_port(self, tls):
        self.tls = tls

    @rule(instance=st.sampled_from(POOL))
    def scale_out(self, instance):
        if instance not in self.instances:
            self.instances.append(instance)  # back in the settings: its host is as it was left
            self.hosts.setdefault(instance, {80: False, self.tls: False})  # new: plain nginx, passes health checks

    @precondition(lambda self: len(self.instances) > 1)
    @rule(data=st.data())
    def scale_in(self, data):
        self.instances.remove(data.draw(st.sampled_from(self.instances)))

    # --- fab rollout ----------------------------------------------------------------------------

    @rule(fails=st.booleans())
    def rollout(self, fails):
        """`fab rollout` (no --apply): every host or none (a failure restores them all); turning
        off is refused while the policy is attached; the record proves what the hosts serve."""
        s = self.settings()
        if fails or (not self.wanted and self.attached):
            return
        for i in self.instances:
            self.hosts[i] = {p: self.wanted for p in s.ports.proxied}
        if self.wanted:
            self.record_text = records.build(ENV, list(s.ports.proxied), {i: "d" * 64 for i in self.instances},
                                             load_balancer=s.load_balancer.name).to_json()
        else:
            self.record_text = None

    @rule(data=st.data())
    def turn_off_with_apply(self, data):
        """`fab rollout --apply` with proxyProtocol false: detach first, hosts go plain only
        once the load balancer sends no header."""
        if self.wanted:
            return
        self.pulumi_up(data)
        if not self.attached:
            self.rollout(fails=False)

    # --- fab rollout --apply, a step at a time, with pulumi up from elsewhere between its steps ----

    @rule(data=st.data())
    def rollout_with_apply(self, data):
        """`fab rollout --apply` as remote/cutover.py orders it, every host's lock held throughout
        (no other rollout runs meanwhile), while between any two of its steps CI or another
        checkout may run `pulumi up` on the same stack with its own proxyProtocol."""
        s = self.settings()
        before, stored = {i: dict(self.hosts[i]) for i in self.instances}, self.record_text
        if s.proxy_protocol:  # refused before any change when the load balancer could not follow
            prospective = records.build(ENV, list(s.proxy_ports), {i: "d" * 64 for i in self.instances},
                                        load_balancer=s.load_balancer.name)
            if follow_refusal(s, reached=set(self.instances), registered=sorted(self.registered),
                              header_ports=sorted(self.attached), record=prospective):
                return
            for i in self.instances:  # go live, host by host
                self._meanwhile(data)
                self.hosts[i] = {p: True for p in s.ports.proxied}
            self._meanwhile(data)
            self.record_text = prospective.to_json()
            self._meanwhile(data)
            self._pulumi_up(s, data)
            if not set(s.proxy_ports) & self.attached:  # failed before the policy: the proof goes, then the hosts
                self.record_text = stored
                self._meanwhile(data)
                self.hosts.update(before)
            return
        self.record_text = None  # turning off: the proof goes before the switch back
        self._meanwhile(data)
        self._pulumi_up(s, data)
        if self.attached:  # not detached (cut short): the hosts keep reading it
            return
        for i in self.instances:
            self._meanwhile(data)
            self.hosts[i] = {p: False for p in s.ports.proxied}

    @rule(data=st.data())
    def on_then_off_with_apply(self, data):
        """The cycle an operator runs most, with the second actor between any two of its steps."""
        self.wanted = True
        self.rollout_with_apply(data)
        self.wanted = False
        self.rollout_with_apply(data)

    def _meanwhile(self, data):
        if data.draw(st.booleans(), label="pulumi up elsewhere"):
            wanted = data.draw(st.booleans(), label="its proxyProtocol")
            self._pulumi_up(_settings(wanted, self.tls, tuple(self.instances)), data)

    # --- the record goes wrong ------------------------------------------------------------------

    @rule(kind=st.sampled_from(["deleted", "partial", "fewer-ports", "other-env", "other-lb", "corrupt"]),
          data=st.data())
    def record_goes_wrong(self, kind, data):
        """What the store can hold besides the last rollout's record: nothing; a true record of
        some hosts or some ports (an older or cut-short write); a record that is not this
        environment's (whatever it claims); text that is not a record."""
        if kind in ("partial", "fewer-ports"):
            some = (data.draw(st.lists(st.sampled_from(self.instances), min_size=1, unique=True), label="hosts")
                    if kind == "partial" else self.instances)
            reads = set.intersection(*({p for p, on in self.hosts[i].items() if on} for i in some))
            ports = sorted(reads) if kind == "partial" else sorted(reads)[:1]
            self.record_text = records.build(ENV, ports, {i: "e" * 64 for i in some},
                                             load_balancer=f"wsgate-{ENV}").to_json() if ports else None
            return
        self.record_text = {
            "deleted": None,
            "other-env": records.build("prod", [80, 81, 82], {i: "e" * 64 for i in POOL}).to_json(),
            "other-lb": records.build(ENV, [80, 81, 82], {i: "e" * 64 for i in POOL}, load_balancer="x").to_json(),
            "corrupt": '{"version": 1',
        }[kind]

    # --- pulumi up, complete or cut short -------------------------------------------------------

    @rule(data=st.data())
    def pulumi_up(self, data):
        self._pulumi_up(self.settings(), data)

    def _pulumi_up(self, s, data):
        record, problem = None, None
        if self.record_text is not None:
            try:
                record = records.ReadinessRecord.from_json(self.record_text)
            except records.RecordError as exc:
                problem = str(exc)
        gated = plan_for(s, registered=sorted(self.registered), header_ports=sorted(self.attached), record=record,
                         record_problem=problem)
        want_ports, join = set(gated.decision.ports), set(gated.join)
        ops = sorted([("attach", str(p)) for p in want_ports - self.attached]
                     + [("detach", str(p)) for p in self.attached - want_ports]
                     + [("register", i) for i in join - self.registered]
                     + [("deregister", i) for i in self.registered - join])
        done = data.draw(st.lists(st.sampled_from(ops), unique=True) if ops else st.just([]), label="applied")
        for op, what in done:  # a cut-short update: any subset, in any order
            before = set(self.attached)
            if op == "attach":
                self.attached.add(int(what))
            elif op == "detach":
                self.attached.discard(int(what))
            elif op == "register":
                self.registered.add(what)
            else:
                self.registered.discard(what)
            if s.proxy_protocol:
                self.detached_while_wanted |= before - self.attached

    # --- what must hold after every step --------------------------------------------------------

    @invariant()
    def no_header_to_a_plain_port(self):
        for port in self.attached:
            for instance in self.registered:
                assert self.hosts.get(instance, {}).get(port) is not False, (
                    f"policy on {port} while {instance} serves it plain")

    @invariant()
    def a_port_loses_the_policy_only_when_turning_off(self):
        assert not self.detached_while_wanted


TestRuns = Runs.TestCase
TestRuns.settings = run_settings(max_examples=500, stateful_step_count=20, deadline=None)
