"""A network load balancer over sequences of runs (hypothesis, stateful): proxyProtocol flips,
`fab rollout` with and without --apply (failing or not), `pulumi up` by hand cut short after any
prefix of its operations (registrations and listener changes in any order Pulumi may take, a
listener only after its own group's registrations, deregistrations last), the record deleted,
and deregistration delays running out. The load balancer's state carries over between runs, as
in AWS; every decision is the kit's own: `core.network.network_plan` and `core.network.network_layout`
(the program), `NetworkState.retired` and `Settings.retiring` (which plain ports the hosts drop),
`served_ports`, `proven_ports` and `plain_proven` (what a rollout serves and records), and the
order of `remote/cutover.py` and `remote/tasks.py` (refusals, the two-step turn-off).

A listener change reaches the load balancer's nodes over time, within `loadBalancer.switchDrain`
seconds (time passes in steps of a second or of switchDrain): until it has, the group the listener
left still gets new connections. AWS health-checks only a group some listener forwards to (a warm
listener counts): the others' targets report `unused`, and a target reports `initial` until its
first checks pass (after it registered, or its group came into use); `fab rollout --apply` waits
for them when a listener waits for the health of the group it moves to (its proxy group, or its
plain group on the way back). A proxy group its warm listener kept
checked reads `healthy` the moment its listener switches: only the switch time the update tags the
listener with (read back from AWS) holds its plain group's retirement back.

After every step: every target registered in a group a listener forwards to, or just left,
serves that group's port (reading the header on a proxy port), no such group is empty, and
every target registered or still draining in a plain group serves its port; and no listener ever
moved to a group (its proxy group, or back to its plain group) with a target AWS did not report
`healthy` at that moment; and no plain
group was retired (a member deregistered) within switchDrain of its listener's switch.
"""

from __future__ import annotations

from functools import cache

from hypothesis import settings as run_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from core import record as records
from core.errors import KitError
from core.listeners import PLAIN, PROXY, network_listeners
from core.network import (
    NetworkState,
    TargetGroupState,
    network_layout,
    network_plan,
    stamped,
    warm_group,
    warm_listeners,
)
from core.probe import plain_proven, proven_ports
from core.render import served_ports
from tests.conftest import settings_from

ENV = "staging"
START = 1_800_000_000.0  # the clock at the start (whole seconds: the switch tag keeps seconds)


@cache
def _settings(wanted: bool):
    return settings_from(ENV, proxy_protocol=wanted, load_balancer={"type": "network"})


class Runs(RuleBasedStateMachine):
    @initialize()
    def start(self):
        s = _settings(False)
        self.wanted = False
        self.instances = list(s.load_balancer.instances)
        self.listeners = network_listeners(s)
        self.groups = {g.key: g for x in self.listeners for g in (x.plain, x.proxy)}
        # what AWS has: every member in every group, the listeners on the plain groups
        self.members = {key: set(self.instances) for key in self.groups}
        self.draining: dict[str, set[str]] = {key: set() for key in self.groups}
        self.forwards = {x.port: PLAIN for x in self.listeners}
        # what the hosts serve: instance -> ports (the proxy ports read the header)
        self.serves = {i: set(served_ports(s)) for i in self.instances}
        self.record: records.ReadinessRecord | None = None
        # listener -> the group it forwarded to before its last change, while the change still
        # reaches the load balancer's nodes (new connections may still go there); the new group's
        # targets report `initial` until then (their first health checks take longer than that)
        self.lagging: dict[int, str] = {}
        self.clock = START
        self.switch_time: dict[int, float] = {}  # listener -> when it last changed (the model's truth)
        self.tags: dict[int, float] = {}  # listener -> its switch time tag in AWS
        self.early: list[str] = []  # a plain group retired within switchDrain of its listener's switch
        self.warm: dict[int, str] = {}  # listener -> the group key its warm listener forwards to
        self.fresh: set[tuple[str, str]] = set()  # (group key, instance): first health checks not passed yet
        self.holds: dict[int, str] = {}  # the last complete `pulumi up`'s listeners waiting for health
        self.bad_moves: list[str] = []  # a listener moved to a group (either kind) with a target not `healthy`

    # --- what AWS says, as network_state would read it -------------------------------------------

    def used(self) -> set[str]:
        """The groups AWS health-checks: some listener, or a warm one, forwards to them."""
        return {x.group(self.forwards[x.port]).key for x in self.listeners} | set(self.warm.values())

    def state(self) -> NetworkState:
        used = self.used()
        groups = {}
        for key, g in self.groups.items():
            states = {i: "initial" if (key, i) in self.fresh else
                      ("healthy" if g.port in self.serves[i] else "unhealthy")
                      if key in used else "unused" for i in sorted(self.members[key])}
            groups[g.name] = TargetGroupState(f"arn:{g.name}", g.name, g.port, g.proxy_protocol_v2,
                                              tuple(sorted(self.members[key])), states=states,
                                              draining=tuple(sorted(self.draining[key])))
        listeners = {x.port: (groups[x.group(self.forwards[x.port]).name],) for x in self.listeners}
        return NetworkState("arn:lb", listeners, present=tuple(sorted(set().union(*self.members.values()))),
                            groups=groups, switched=dict(self.tags))

    def header_ports(self) -> list[int]:
        return sorted(x.proxy.port for x in self.listeners if self.forwards[x.port] == PROXY)

    # --- pulumi up: the program's decisions, applied in an order Pulumi may take, maybe cut short ----

    def up(self, s, cut: int | None = None, order: list[int] | None = None) -> bool:
        """False when the program refuses (nothing declared, nothing changed)."""
        state = self.state()
        gated = network_plan(s, state, self.record, None if self.record else "no readiness record")
        try:
            layout = network_layout(s, gated, state.now(s), self.record, clock=self.clock)
        except KitError:
            return False
        members, forwarding, holds = layout.members, layout.forwarding, layout.holds
        tags = {port: stamped(at) for port, at in layout.switched.items()}
        warm = {x.port: warm_group(x, forwarding).key for x in warm_listeners(s, forwarding)}
        ops: list[tuple] = []
        for key, want in members.items():
            ops += [("register", key, i) for i in sorted(set(want) - self.members[key])]
        ops += [("warm", port, key) for port, key in sorted(warm.items()) if self.warm.get(port) != key]
        ops += [("listener", x.port, forwarding[x.port]) for x in self.listeners
                if forwarding[x.port] != self.forwards[x.port] or tags[x.port] != self.tags.get(x.port)]
        if order:  # another order Pulumi may take: a listener still after its own group's registrations
            ops = [ops[i] for i in order if i < len(ops)] + [op for n, op in enumerate(ops) if n not in order]
            for x in self.listeners:
                mine = [n for n, op in enumerate(ops) if op[0] == "listener" and op[1] == x.port]
                if mine:
                    target = x.group(forwarding[x.port]).key
                    last = max([n for n, op in enumerate(ops) if op[0] == "register" and op[1] == target], default=-1)
                    if last > mine[0]:
                        ops.insert(last, ops.pop(mine[0]))
        for key, want in members.items():  # deletions last
            ops += [("deregister", key, i) for i in sorted(self.members[key] - set(want))]
        ops += [("warm", port, None) for port in sorted(set(self.warm) - set(warm))]
        for op in ops[:cut]:
            used = self.used()
            if op[0] == "register":
                self.members[op[1]].add(op[2])
                self.draining[op[1]].discard(op[2])
                self.fresh.add((op[1], op[2]))
            elif op[0] == "deregister":
                x = next(x for x in self.listeners if x.plain.key == op[1] or x.proxy.key == op[1])
                since = self.clock - self.switch_time.get(x.port, START - s.load_balancer.switch_drain)
                if op[1] == x.plain.key and since < s.load_balancer.switch_drain:
                    self.early.append(f"{op[1]} retired {since:.0f} s after listener {x.port} switched")
                self.members[op[1]].discard(op[2])
                self.draining[op[1]].add(op[2])
            elif op[0] == "warm":
                if op[2] is None:
                    self.warm.pop(op[1], None)
                else:
                    self.warm[op[1]] = op[2]
            else:
                x = next(x for x in self.listeners if x.port == op[1])
                if op[2] != self.forwards[op[1]]:  # what AWS says of the group at the moment the listener moves there
                    to = x.group(op[2])
                    now = self.state().groups[to.name].states
                    sick = {i: w for i, w in now.items() if w != "healthy"}
                    if sick or not now:
                        self.bad_moves.append(f"listener {x.port} moved to {to.key}: {sick or 'no target'}")
                tag = tags[op[1]]  # the listener's tags change with it, in one operation
                if tag is None:
                    self.tags.pop(op[1], None)
                else:
                    self.tags[op[1]] = tag
                if op[2] != self.forwards[op[1]]:
                    self.lagging.setdefault(op[1], x.group(self.forwards[op[1]]).key)
                    self.switch_time[op[1]] = self.clock
                self.forwards[op[1]] = op[2]
            # a group that came into use gets its first health checks
            self.fresh |= {(key, i) for key in self.used() - used for i in self.members[key]}
        done = cut is None or cut >= len(ops)
        if done:
            self.holds = holds
        return done

    @rule(data=st.data())
    def pulumi_up_by_hand(self, data):
        cut = data.draw(st.one_of(st.none(), st.integers(0, 8)))
        order = data.draw(st.permutations(range(8)))
        self.up(_settings(self.wanted), cut, order)

    # --- the operator, time, and accidents ---------------------------------------------------------

    @rule(wanted=st.booleans())
    def set_proxy_protocol(self, wanted):
        self.wanted = wanted

    @rule()
    def listener_changes_reach_every_node(self):
        self.lagging = {}

    @rule(whole=st.booleans())
    def time_passes(self, whole):
        """A second, or switchDrain: by then every listener change reached every node."""
        self.advance(_settings(self.wanted).load_balancer.switch_drain if whole else 1)

    def advance(self, seconds: float) -> None:
        self.clock += seconds
        drain = _settings(self.wanted).load_balancer.switch_drain
        self.lagging = {port: key for port, key in self.lagging.items()
                        if self.clock - self.switch_time[port] < drain}

    @rule()
    def health_checks_pass(self):
        self.fresh = set()

    @rule()
    def deregistration_delay_passes(self):
        self.draining = {key: set() for key in self.groups}

    @rule()
    def record_deleted(self):
        self.record = None

    # --- fab rollout, in the order of remote/tasks.py and remote/cutover.py --------------------------

    def go_live(self, s, fails: bool, data) -> bool:
        """The hosts go live with `s` (a failure: every host back as it was), then the record."""
        if fails:
            return False
        for i in self.instances:
            self.serves[i] = set(served_ports(s))
        if s.proxy_protocol:
            self.record = records.build(ENV, proven_ports(s), {i: "d" * 64 for i in self.instances},
                                        load_balancer=s.load_balancer.name, plain_ports=plain_proven(s))
        return True

    def one_run(self, s, apply: bool, fails: bool, data) -> bool:
        turning_off = not s.proxy_protocol
        header, forwarded = self.header_ports(), sorted(
            x.group(self.forwards[x.port]).port for x in self.listeners)
        if set(forwarded) - served_ports(s) - set(header if turning_off else []):
            return False  # refused: a port a listener forwards to would no longer be served
        live = set().union(*self.serves.values())
        if turning_off and header and {s.ports.http, s.ports.tls} - live:
            return False  # refused: the plain ports are not served
        if turning_off and header and not apply:
            return False  # refused: the header is still sent
        dropped = live - served_ports(s) - s.retired  # retired: AWS drained their groups already
        if turning_off and header:
            # the header's proof withdrawn before the switch back (remote.readiness.withdraw_header); the
            # plain ports' proof stays: the program moves a listener back to a retired group only on it
            stored = self.record
            self.record = (stored.model_copy(update={"proxy_protocol_ports": []})
                           if stored and stored.plain_ports else None)
            self.meanwhile(data)
            self.holds = {}
            done = self.up(s, data.draw(st.one_of(st.none(), st.integers(0, 8))))
            if done and self.holds:
                # cutover._group_healthy: until AWS says the plain groups healthy (or its bound passes)
                healthy = data.draw(st.booleans(), label="plain groups healthy within the bound")
                if healthy:
                    self.fresh = set()
                    self.meanwhile(data)
                    done = self.up(s, data.draw(st.one_of(st.none(), st.integers(0, 8))))
                done = done and healthy
            if not done or self.header_ports():
                self.record = stored  # code 3: no host changed, so the record is true again
                return False
            dropped = {0}
            self.meanwhile(data)
        if dropped:  # the drain (cutover._drain): at least switchDrain, as long as a change takes to spread
            self.advance(s.load_balancer.switch_drain)
        if turning_off and not fails:
            self.record = None  # deleted before the hosts go live (put back if they roll back)
        if turning_off and header:
            self.record = None
            if fails:  # hosts not rolled back after the switch: some have the new config, some the old
                for i in data.draw(st.lists(st.sampled_from(self.instances), unique=True)):
                    self.serves[i] = set(served_ports(s))
                return False
            return self.go_live(s, False, data)
        if not self.go_live(s, fails, data):
            return False
        self.meanwhile(data)
        if apply:
            self.holds = {}
            if self.up(s, data.draw(st.one_of(st.none(), st.integers(0, 8)))) and self.holds:
                # cutover._group_healthy: until AWS says the proxy groups healthy (or its bound passes)
                if not data.draw(st.booleans(), label="healthy within the bound"):
                    return False
                self.fresh = set()
                self.meanwhile(data)
                self.up(s, data.draw(st.one_of(st.none(), st.integers(0, 8))))
        return True

    def meanwhile(self, data) -> None:
        """Between two steps of a run: maybe a `pulumi up` from CI or another checkout, with its own
        proxyProtocol, complete or cut short, in an order Pulumi may take."""
        if data.draw(st.booleans(), label="pulumi up elsewhere"):
            wanted = data.draw(st.booleans(), label="its proxyProtocol")
            self.up(_settings(wanted), data.draw(st.one_of(st.none(), st.integers(0, 8))),
                    data.draw(st.permutations(range(8))))

    @rule(apply=st.booleans(), fails=st.booleans(), data=st.data())
    def fab_rollout(self, apply, fails, data):
        s = _settings(self.wanted)
        retired = self.state().retired(s)
        if not self.wanted and apply and self.state().retired(_settings(True)):
            # step 1 of 2: the hosts serve both port sets again, proven and recorded
            if not self.one_run(_settings(True), False, data.draw(st.booleans()), data):
                return
            self.one_run(s, apply, fails, data)
            return
        self.one_run(s.retiring(retired) if self.wanted else s, apply, fails, data)

    @rule(data=st.data())
    def on_then_off_with_apply(self, data):
        """The cycle an operator runs most: the header turned on with --apply, then off with --apply,
        another checkout's `pulumi up` maybe landing between any two steps of either."""
        self.wanted = True
        self.fab_rollout(True, False, data)
        self.wanted = False
        self.fab_rollout(True, False, data)

    # --- what must hold after every step -----------------------------------------------------------

    @invariant()
    def every_listener_reaches_a_host_serving_its_group_port(self):
        for x in self.listeners:
            group = x.group(self.forwards[x.port])
            assert self.members[group.key], f"listener {x.port} forwards to the empty {group.key} group"
            for i in self.members[group.key]:
                assert group.port in self.serves[i], f"listener {x.port} -> {group.key}: {i} does not serve it"

    @invariant()
    def a_group_a_listener_just_left_still_reaches_hosts_serving_its_port(self):
        for port, key in self.lagging.items():
            group = self.groups[key]
            assert self.members[key], f"listener {port} left {key}, which nodes still use, with no target"
            for i in self.members[key]:
                assert group.port in self.serves[i], f"listener {port} left {key}: {i} no longer serves it"

    @invariant()
    def no_plain_group_is_retired_within_switch_drain_of_its_listeners_switch(self):
        assert not self.early, self.early

    @invariant()
    def no_listener_moved_to_a_group_not_proven_healthy(self):
        assert not self.bad_moves, self.bad_moves

    @invariant()
    def a_plain_port_is_served_while_its_group_may_send_to_it(self):
        for x in self.listeners:
            for i in self.members[x.plain.key] | self.draining[x.plain.key]:
                assert x.plain.port in self.serves[i], f"{i} dropped {x.plain.port} while in {x.plain.key}"


Runs.TestCase.settings = run_settings(max_examples=300, stateful_step_count=25, deadline=None)
TestNetworkSequences = Runs.TestCase
