"""A network load balancer: the state its ELBv2 API describes (read by `awsapi.network`) and the
decisions over it: where each listener forwards, who is registered in which target group, which
plain ports are retired, and when a move back to a plain group is refused. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from core.errors import KitError
from core.gate import Plan, plan_for
from core.health import described
from core.listeners import PLAIN, PROXY, NetworkHealthCheck, NetworkListener, TargetGroup, network_listeners
from core.record import ReadinessRecord
from core.settings import Settings

# The listener's tag saying when it switched to its proxy group (UTC, ISO-8601 seconds): AWS's
# clock for retiring its plain group (network_members), written by the update that switches.
SWITCHED_TAG = "wsgate:switched-to-proxy-at"


def stamp(at: float) -> str:
    """`at` (seconds since the epoch) as SWITCHED_TAG spells it."""
    return datetime.fromtimestamp(int(at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamped(value: str | None) -> float | None:
    """SWITCHED_TAG's value as seconds since the epoch; None: absent or not a time (treated as
    \"switched now\": see network_members)."""
    try:
        return datetime.strptime(value or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def network_forwarding(decision_ports: tuple[int, ...] | list[int], s: Settings) -> dict[int, str]:
    """Listener port -> PLAIN or PROXY: a listener forwards to its proxy group exactly when the
    gate's decision covers that group's port. Switching is one listener change; the hosts serve
    both ports all along. A proxy port the gate keeps that is no longer the configured one (the
    setting changed) does not keep its listener on proxy: the new group's port is unproven, and
    the plain group is always safe (client addresses are lost until it is proven, no request)."""
    return {x.port: PROXY if x.proxy.port in decision_ports else PLAIN for x in network_listeners(s)}


@dataclass(frozen=True)
class ListenerNow:
    """One network listener as the ELBv2 API says it is now (NetworkState.now)."""

    forwards: str | None  # PLAIN or PROXY: the kit's group of that kind it forwards to; None: elsewhere or absent
    proxy_healthy: bool  # its proxy group has targets and every one is `healthy`
    plain_retired: bool  # it forwards to its proxy group, and its plain group exists with no target registered
    plain_drained: bool = False  # retired, and not even a draining target left: the hosts may drop its port
    proxy_states: tuple[tuple[str, str], ...] = ()  # its proxy group's targets: (instance, state as AWS says it)
    plain_states: tuple[tuple[str, str], ...] = ()  # its plain group's targets, the same
    on_proxy: bool = False  # it forwards to its configured proxy group, and to nothing else
    exists: bool = True  # the load balancer has this listener
    switched_at: float | None = None  # its SWITCHED_TAG (seconds since the epoch); None: absent


UNSEEN = ListenerNow(None, False, False, exists=False)  # a listener the load balancer does not have (yet)


def switch_stamps(forwarding: dict[int, str], now: dict[int, ListenerNow], clock: float) -> dict[int, str | None]:
    """Listener port -> its SWITCHED_TAG as this update declares it (None: no tag). A listener
    that stays on its proxy group keeps the time AWS has, never a new one; one that switches now,
    or is on proxy without the tag (switched by an older kit, or by hand), gets `clock`; a
    listener on its plain group has none."""
    out: dict[int, str | None] = {}
    for port, kind in forwarding.items():
        was = now.get(port, UNSEEN)
        kept = was.switched_at if was.forwards == PROXY else None
        out[port] = None if kind != PROXY else stamp(clock if kept is None else kept)
    return out


def _retiring(s: Settings, x: NetworkListener, forwarding: dict[int, str], was: ListenerNow,
              clock: float) -> tuple[bool, str | None]:
    """(whether this update leaves `x`'s plain group empty, why it keeps it although the listener
    stays on its proxy group: None when it does not)."""
    if forwarding[x.port] != PROXY:
        return False, None
    if was.forwards == PROXY and was.plain_retired:
        return True, None  # stays retired while the listener stays on proxy, whatever the health says
    drain = s.load_balancer.switch_drain
    since = clock if was.forwards != PROXY or was.switched_at is None else was.switched_at
    until = since + drain
    if was.forwards == PROXY and was.proxy_healthy and clock >= until:
        return True, None
    if not was.exists:
        return False, None  # a listener this update creates: nothing to say yet
    if clock < until:
        why = (f"until {stamp(until)}: loadBalancer.switchDrain ({drain} s) after listener {x.port} switched to its "
               f"proxy group ({stamp(since)}, its {SWITCHED_TAG} tag), the load balancer's nodes may still send "
               "new connections there")
    else:
        why = f"until AWS says every target of its proxy group {x.proxy.name} is healthy"
    return False, (f"the plain group {x.plain.name} of listener {x.port} is kept (not retired) {why}; "
                   "the first `pulumi up` after that retires it")


def network_members(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow],
                    join: tuple[str, ...], clock: float) -> dict[str, tuple[str, ...]]:
    """Group key -> the instances registered in it. Every member in every group, except the plain
    group of a listener that stays on its proxy group: that one is retired (its members
    deregistered, so AWS drains them for `deregistrationDelay` and then lists none; only then do
    the hosts stop serving its port, NetworkState.retired). Retiring starts only in an update
    after the one that switched (the listener forwards to the proxy group already, every target
    healthy there: the switch is in use), and not before `loadBalancer.switchDrain` seconds passed
    since the switch by the listener's SWITCHED_TAG (`clock`: now, seconds since the epoch): a
    listener change reaches the load balancer's nodes over time, and until it has they may send
    new connections to the plain group. A listener on proxy without the tag counts as switched at
    `clock` (the update writes it: switch_stamps). A retired group stays empty while its listener
    stays on proxy."""
    out: dict[str, tuple[str, ...]] = {}
    for x in network_listeners(s):
        retire, _ = _retiring(s, x, forwarding, now.get(x.port, UNSEEN), clock)
        out[x.plain.key] = () if retire else join
        out[x.proxy.key] = join
    return out


def retire_waits(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow],
                 clock: float) -> dict[int, str]:
    """Listener port -> why its plain group is kept although the listener stays on (or moves to) its
    proxy group, and until when (the `retireWaiting` output, said in the preview too)."""
    out = {}
    for x in network_listeners(s):
        _, why = _retiring(s, x, forwarding, now.get(x.port, UNSEEN), clock)
        if why:
            out[x.port] = why
    return out


def back_refusal(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow],
                 record: ReadinessRecord | None, members: tuple[str, ...], record_problem: str | None = None
                 ) -> str | None:
    """Why a listener must not move back to its plain group now (None: it may): its plain group was
    retired (no target registered), so the hosts may no longer serve its port, and the readiness
    record does not prove every member serving it again (`fab rollout --apply` does that before it
    switches back). `record`: this environment's record (None: none, or not this environment's,
    `record_problem` says why)."""
    stuck = [x for x in network_listeners(s)
             if forwarding[x.port] == PLAIN and now.get(x.port, UNSEEN).plain_retired
             and now[x.port].forwards != PLAIN and not (record and record.proves_plain(x.plain.port, list(members)))]
    if not stuck:
        return None
    names = ", ".join(f"listener {x.port} (plain port {x.plain.port})" for x in stuck)
    proof = ("the readiness record does not prove every instance serving the plain port"
             + (f" ({record_problem})" if record_problem and not record else ""))
    if s.proxy_protocol:  # not a turn-off: a proxy port the gate cannot keep (changed, or not proven)
        what = ("its proxy port is not proven (ports.proxyHttp/proxyTls changed, or the record does not cover "
                "it): put the proxy ports back and change them only while proxy protocol is off")
    else:
        what = "run `fab rollout --apply`: it serves and proves the plain ports again, then switches back"
    return (f"{names} would move back to its plain target group, which was retired: the hosts may no longer "
            f"serve the plain port and {proof}, so every request through it would fail. Nothing was changed; {what}")


def stranded_refusal(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow]) -> str | None:
    """Why an update must not move a listener off a proxy group that is not its configured one (an
    old ports.proxyHttp/proxyTls: a target group's port cannot change, so the setting made a new
    group and the old one goes with this update) to its plain group while AWS does not say every
    target there `healthy` (None: it may). Such a listener cannot wait where it is (health_holds
    keeps a listener on its group; this one goes away), and a plain group no listener used is
    `unused`, not health-checked: new connections would meet targets never checked. The retired
    case is back_refusal's."""
    stranded = []
    for x in network_listeners(s):
        was = now.get(x.port, UNSEEN)
        if not (was.exists and was.forwards == PROXY and not was.on_proxy and forwarding[x.port] == PLAIN):
            continue
        states = dict(was.plain_states)
        sick = {i: w for i, w in states.items() if w != "healthy"}
        if sick or not states:
            seen = described(sick) or "no target registered"
            stranded.append(f"listener {x.port} (on an old proxy group, not {x.proxy.name}) would move to its plain "
                            f"group {x.plain.name}, which AWS has not proven healthy ({seen})")
    if not stranded:
        return None
    return ("; ".join(stranded) + ": new connections would meet targets AWS never checked. Nothing was changed; "
            "put ports.proxyHttp/proxyTls back, turn proxy protocol off (`fab rollout --apply` waits for the "
            "plain groups' health), change the proxy ports, then turn it on again")


def health_holds(s: Settings, forwarding: dict[int, str], now: dict[int, ListenerNow],
                 join: tuple[str, ...]) -> dict[int, str]:
    """Listener port -> why it stays where it forwards now although `forwarding` moves it to its
    other group: AWS does not say every target of that group `healthy` (a group no listener uses is
    `unused` and not health-checked; a new target is `initial` until its first checks pass), or an
    instance this update registers there is not in it yet. Both ways: to its proxy group (from its
    plain group, or from elsewhere), and back from its proxy group to its plain group (a turn-off:
    the hosts keep reading the header meanwhile). Only a switch waits: a listener already on the group
    `forwarding` names stays there, and one this update creates carries no connection yet (AWS
    checks its group from the start; during a move a new load balancer has no DNS weight until
    proven)."""
    out = {}
    for x in network_listeners(s):
        was = now.get(x.port, UNSEEN)
        if not was.exists:
            continue
        if forwarding[x.port] == PROXY and not was.on_proxy:
            group, states, stays, then = x.proxy, dict(was.proxy_states), x.plain, "switches"
        elif forwarding[x.port] == PLAIN and was.on_proxy:
            group, states, stays, then = x.plain, dict(was.plain_states), x.proxy, "switches it back"
        else:
            continue
        sick = {i: w for i, w in states.items() if w != "healthy"}
        sick.update({i: "not registered yet" for i in join if i not in states})
        if not sick and states:
            continue
        seen = described(sick) or "no target registered yet"
        out[x.port] = (f"listener {x.port} stays on its {stays.kind} group until AWS says every target of its "
                       f"{group.kind} group {group.name} is healthy ({seen}): the warm listener on port "
                       f"{x.warm_port} makes AWS health-check it; the next `pulumi up` {then} (`fab rollout "
                       "--apply` waits for it)")
    return out


def warm_listeners(s: Settings, forwarding: dict[int, str]) -> list[NetworkListener]:
    """The listeners whose warm listener exists: each that does not forward to the group of the kind
    proxyProtocol wants (its proxy group while true, its plain group while false), so that AWS
    health-checks that group before the listener moves there (once it forwards there, its own
    traffic keeps the group checked)."""
    wanted = PROXY if s.proxy_protocol else PLAIN
    return [x for x in network_listeners(s) if forwarding[x.port] != wanted]


def warm_group(x: NetworkListener, forwarding: dict[int, str]) -> TargetGroup:
    """The group `x`'s warm listener forwards to: the one `x` does not forward to (`forwarding`)."""
    return x.group(PLAIN if forwarding[x.port] == PROXY else PROXY)


def warm_outputs(s: Settings, forwarding: dict[int, str], warm: tuple[int, ...] | list[int]) -> dict[str, str]:
    """The `warmListeners` output: warm listener port -> the group it forwards to (warm_group), for
    the listeners `warm` names (warm_listeners)."""
    return {str(x.warm_port): warm_group(x, forwarding).name for x in network_listeners(s) if x.port in warm}


@dataclass(frozen=True)
class NetworkLayout:
    """What one update declares for a network load balancer (network_layout)."""

    members: dict[str, tuple[str, ...]]  # group key -> the instances registered there (network_members)
    forwarding: dict[int, str]  # listener port -> PLAIN or PROXY
    holds: dict[int, str]  # listener port -> why it waits for its other group's health (health_holds)
    retire_waits: dict[int, str]  # listener port -> why its plain group is kept, until when (retire_waits)
    switched: dict[int, str | None]  # listener port -> its SWITCHED_TAG (switch_stamps)


def network_layout(s: Settings, gated: Plan, now: dict[int, ListenerNow], record: ReadinessRecord | None,
                   record_problem: str | None = None, *, clock: float) -> NetworkLayout:
    """The layout for the gate's plan and what AWS has now (NetworkState.now) at `clock` (seconds
    since the epoch); refuses a move back to a retired plain group not proven. A listener moves to
    its other group, either way, only once AWS says that group healthy (health_holds). A listener
    held on its proxy group on its way back counts as on its way for its plain group: filled, never
    retired (AWS health-checks only a group with targets), and a retired one only on the proof. A
    listener stranded on an old proxy group goes to its plain group only once AWS says it healthy
    (stranded_refusal)."""
    wanted = network_forwarding(gated.decision.ports, s)
    holds = health_holds(s, wanted, now, gated.join)
    forwarding = {port: (PROXY if kind == PLAIN else PLAIN) if port in holds else kind for port, kind in wanted.items()}
    # where each listener is or is going: on proxy only when it stays there and is meant to
    heading = {port: PROXY if kind == wanted[port] == PROXY else PLAIN for port, kind in forwarding.items()}
    foreign = record.foreign(s.env, s.load_balancer.name) if record else None
    own = None if foreign else record
    refused = (back_refusal(s, heading, now, own, gated.join, foreign or (None if record else record_problem))
               or stranded_refusal(s, forwarding, now))
    if refused:
        raise KitError(refused)
    return NetworkLayout(network_members(s, heading, now, gated.join, clock), forwarding, holds,
                         retire_waits(s, heading, now, clock), switch_stamps(forwarding, now, clock))


@dataclass(frozen=True)
class TargetGroupState:
    arn: str
    name: str
    port: int  # the instance port
    proxy_protocol_v2: bool
    targets: tuple[str, ...]  # instances registered in it (draining ones are leaving: not counted)
    health: NetworkHealthCheck | None = None  # its health check (None: off)
    protocol: str = "TCP"  # to the instances: TCP, or TLS (where the header would travel inside TLS)
    states: dict[str, str] = field(default_factory=dict)  # instance -> `healthy`, or its state and why
    draining: tuple[str, ...] = ()  # instances deregistered, still within the deregistration delay


@dataclass(frozen=True)
class NetworkState:
    """A network load balancer as the ELBv2 API describes it now."""

    arn: str
    listeners: dict[int, tuple[TargetGroupState, ...]]  # listener port -> the groups it forwards to
    protocols: dict[int, str] = field(default_factory=dict)  # listener port -> "TCP" or "TLS"
    present: tuple[str, ...] = ()  # instances in any of the kit's groups, forwarded to or not
    security_groups: tuple[str, ...] = ()  # the load balancer's own
    groups: dict[str, TargetGroupState] = field(default_factory=dict)  # the kit's groups that exist, by name
    # the warm listeners (on loadBalancer.warmPort and the next port): port -> the groups each forwards
    # to. Not in `listeners`: nobody reaches them, so they send nobody's traffic or header anywhere
    warm: dict[int, tuple[TargetGroupState, ...]] = field(default_factory=dict)
    switched: dict[int, float] = field(default_factory=dict)  # listener port -> its SWITCHED_TAG (epoch seconds)

    def now(self, settings: Settings) -> dict[int, ListenerNow]:
        """Per listener of the kit: which of its groups it forwards to, whether every target of its
        proxy group is healthy, and whether its plain group is retired (ListenerNow)."""
        out = {}
        for x in network_listeners(settings):
            forwarded = self.listeners.get(x.port, ())
            # PROXY: the header goes out there, whichever proxy port (an old one after a setting change)
            forwards = (PLAIN if [g.name for g in forwarded] == [x.plain.name]
                        else PROXY if forwarded and all(g.proxy_protocol_v2 for g in forwarded) else None)
            proxy, plain = self.groups.get(x.proxy.name), self.groups.get(x.plain.name)
            out[x.port] = ListenerNow(
                forwards=forwards,
                proxy_healthy=proxy is not None and bool(proxy.targets) and all(
                    proxy.states.get(i) == "healthy" for i in proxy.targets),
                # only ever retired from the proxy side: an empty plain group of a listener not on its
                # proxy group (a first update cut short, say) is just not filled yet
                plain_retired=forwards == PROXY and plain is not None and not plain.targets,
                plain_drained=forwards == PROXY and plain is not None and not (plain.targets or plain.draining),
                proxy_states=tuple(sorted(proxy.states.items())) if proxy else (),
                plain_states=tuple(sorted(plain.states.items())) if plain else (),
                on_proxy=[g.name for g in forwarded] == [x.proxy.name], exists=x.port in self.listeners,
                switched_at=self.switched.get(x.port))
        return out

    def retired(self, settings: Settings) -> list[int]:
        """The plain instance ports the hosts may stop serving: their listener forwards to its proxy
        group and their plain group holds no target, not even a draining one (so the load balancer
        forwarded there last at least `deregistrationDelay` ago, by AWS's own clock)."""
        now = self.now(settings)
        return sorted(x.plain.port for x in network_listeners(settings)
                      if now[x.port].forwards == PROXY and now[x.port].plain_drained)

    @property
    def header_ports(self) -> list[int]:
        """The header ports: instance ports that get the PROXY header now: those of a `proxy_protocol_v2` group that a
        listener forwards to."""
        return sorted({g.port for groups in self.listeners.values() for g in groups if g.proxy_protocol_v2})

    @property
    def forwarded_ports(self) -> list[int]:
        """Instance ports the listeners send traffic to now, with the header or without."""
        return sorted({g.port for groups in self.listeners.values() for g in groups})

    @property
    def serving(self) -> list[str]:
        """Instances registered in a group a listener forwards to. A group no listener uses is not
        the load balancer's (the API does not list it with it) and sends nothing to anyone."""
        return sorted({i for groups in self.listeners.values() for g in groups for i in g.targets})


def network_plan(settings: Settings, state: NetworkState | None, record: ReadinessRecord | None,
                 record_problem: str | None) -> Plan:
    """The gate for a network load balancer as it is now: the Pulumi program's and the lab's."""
    return plan_for(settings, registered=state.serving if state else [],
                    header_ports=state.header_ports if state else [],
                    present=list(state.present) if state else [], record=record, record_problem=record_problem)


def group_health(state: NetworkState) -> dict[str, dict[str, str]]:
    """Target group name -> instance ID -> its state there (`healthy`, or the state and why), over
    the groups the listeners forward to now (as `awsapi.network.network_state` read them)."""
    return {g.name: dict(g.states) for forwarded in state.listeners.values() for g in forwarded}


def target_health(groups: dict[str, dict[str, str]]) -> dict[str, str]:
    """Instance ID -> InService, or OutOfService (group: why), healthy only when healthy in every
    group (`group_health`): what `instance_health` says of a Classic ELB."""
    out: dict[str, str] = {}
    for name, targets in sorted(groups.items()):
        for instance, word in sorted(targets.items()):
            if word == "healthy":
                out.setdefault(instance, "InService")
            elif not out.get(instance, "").startswith("OutOfService"):
                out[instance] = f"OutOfService ({name}: {word})"
    return out
