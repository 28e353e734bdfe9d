"""A network listener moves to its proxy target group only once AWS says every target there is
healthy, and AWS health-checks only a group some listener forwards to: a warm listener (TCP, on
loadBalancer.warmPort and the next port, reachable by nobody) forwards to each proxy group until
its listener does. The turn-off is the mirror: a listener goes back to its plain group only once
AWS says that group healthy, its warm listener forwarding there meanwhile.

moto says `healthy` for every registered target, used or not, so it cannot show the fault: the
AWS endpoint here is moto behind tests.support.faults.AwsFaults, whose DescribeTargetHealth
answers as AWS does (`unused` in a group no listener forwards to, `initial` for its first reads
once one does). The Pulumi program runs under Pulumi's mock runtime fed from that endpoint
(as in test_program_network.py); the lab's applier, its stand-in for `pulumi up`, makes the same
changes there with boto3, and both must decide alike at every step.
"""

from __future__ import annotations

import pytest

import awsapi.balancer
import awsapi.network
import tests.test_program_network as program
from core.listeners import PLAIN, PROXY, network_listeners
from core.network import (
    SWITCHED_TAG,
    ListenerNow,
    health_holds,
    network_forwarding,
    stranded_refusal,
    warm_listeners,
)
from core.settings import from_config
from lab.applier import apply
from tests.conftest import settings_from, stack_config
from tests.support.faults import AwsFaults

INSTANCES, REGION = program.INSTANCES, program.REGION
WARM = {"64080": "wsgate-staging-proxy-82", "64081": "wsgate-staging-proxy-83"}
NOT_YET = 10**6  # `initial` for this many reads: as long as a test needs


@pytest.fixture
def endpoint(aws):
    """moto behind a proxy whose target health is AWS's."""
    proxy = AwsFaults(aws.url)
    proxy.health_as_aws(REGION, initial_reads=NOT_YET)
    yield proxy
    proxy.stop()


def lab_settings(url: str, changes: dict | None = None, **lb):
    """The settings the program runs with (program.run, with the same config `changes`), for the lab's applier."""
    config = {**stack_config("staging"), "aws:endpoints": program.endpoints(url),
              "wsgate:loadBalancer": program.network_lb(**lb), **(changes or {})}
    program._live_placement(config, url)
    return from_config("staging", config, "Pulumi.staging.yaml")


def warm_declared(mocks) -> dict[str, str]:
    """Warm listener port -> the target group it forwards to, as the program declares them."""
    out = {}
    for r in mocks.of(program.LISTENER):
        if r.inputs["port"] in (80, 443):
            continue
        assert r.inputs["protocol"] == "TCP" and "certificateArn" not in r.inputs
        (action,) = r.inputs["defaultActions"]
        out[str(int(r.inputs["port"]))] = action["targetGroupArn"].rsplit("/", 2)[-2]
    return out


def warm_in_aws(s) -> dict[str, list[str]]:
    """Warm listener port -> the target groups it forwards to, as the endpoint has them."""
    state = awsapi.network.network_state(s)
    assert state is not None
    return {str(port): [g.name for g in groups] for port, groups in state.warm.items()}


def both_decide(url: str, monkeypatch, **changes) -> tuple[dict, dict]:
    """One `pulumi up` (stack config `changes`): the program's decisions (mock runtime), then the lab's
    applier applying the same from the same state; they must agree. Returns (the program's exports,
    the applier's outputs)."""
    mocks, exports, warnings = program.run(url, monkeypatch, **changes)
    s = lab_settings(url, changes)
    out = apply(s)
    kinds = {port: mocks.forwards_to(port) for port in (80, 443)}
    keys = ("listenerTargets", "healthWaiting", "warmListeners", "proxyProtocolGate", "retiredPlainGroups")
    assert {k: out[k] for k in keys} == {k: exports[k] for k in keys}
    assert set(out["retireWaiting"]) == set(exports["retireWaiting"])  # its words name the time of each run
    assert registered_in_aws(s) == mocks.attached()
    # the switch time: declared on a listener on its proxy group, in AWS as the applier left it
    assert {port: SWITCHED_TAG in mocks.listener(port).inputs["tags"] for port in (80, 443)} == \
        {port: kind == PROXY for port, kind in kinds.items()}
    assert {port: tag is not None for port, tag in program.switch_tags(url).items()} == \
        {port: kind == PROXY for port, kind in kinds.items()}
    assert exports["listenerTargets"] == {str(port): kind for port, kind in kinds.items()}
    assert exports["warmListeners"] == warm_declared(mocks)
    assert warm_in_aws(s) == {port: [name] for port, name in exports["warmListeners"].items()}
    for why in exports["healthWaiting"].values():
        assert any(why in w for w in warnings)  # the preview says it too
    return exports, out


def test_no_listener_moves_to_a_proxy_group_aws_has_not_proven_healthy(endpoint, monkeypatch):
    """Every instance proven, the gate open: the first update keeps both listeners on plain and
    declares the warm listeners (the groups are `unused`), the next one still waits while AWS says
    `initial`, and once it says `healthy` the listeners switch and the warm listeners go."""
    url = endpoint.url
    program.nlb_in_aws(url, {80: PLAIN, 443: PLAIN})
    program.write_record(url, INSTANCES)  # on 82 and 83
    s = lab_settings(url)

    exports, _ = both_decide(url, monkeypatch)
    assert exports["proxyProtocolGate"] == "open" and exports["listenerTargets"] == program.BOTH_PLAIN
    assert exports["warmListeners"] == WARM
    assert set(exports["healthWaiting"]) == {"80", "443"}
    assert "wsgate-staging-proxy-82 is healthy" in exports["healthWaiting"]["80"]
    assert "unused" in exports["healthWaiting"]["80"] and "port 64080" in exports["healthWaiting"]["80"]
    # the warm listeners send nobody's traffic: not taken for listeners sending the header
    assert awsapi.balancer.header_ports(s) == []

    exports, _ = both_decide(url, monkeypatch)  # health-checked now, first checks not passed
    assert exports["listenerTargets"] == program.BOTH_PLAIN and exports["warmListeners"] == WARM
    assert "initial" in exports["healthWaiting"]["443"] and "unused" not in exports["healthWaiting"]["443"]

    endpoint.health_as_aws(REGION)  # every target passed its first checks
    exports, _ = both_decide(url, monkeypatch)
    assert exports["listenerTargets"] == program.BOTH_PROXY and exports["healthWaiting"] == {}
    assert exports["warmListeners"] == {}  # the listeners' own traffic keeps the groups checked
    assert awsapi.balancer.header_ports(s) == [82, 83]
    tags = program.switch_tags(url)

    # seconds later every proxy target reads `healthy` (the warm listener had them checked), while the
    # load balancer's nodes may still send new connections to the plain groups: both keep them
    exports, _ = both_decide(url, monkeypatch)
    assert exports["retiredPlainGroups"] == [] and set(exports["retireWaiting"]) == {"80", "443"}
    assert registered_in_aws(s) == {p: INSTANCES for p in (80, 81, 82, 83)}
    assert program.switch_tags(url) == tags  # the switch time as AWS has it, never a new one


OFF = {"wsgate:proxyProtocol": "false"}
WARM_BACK = {"64080": "wsgate-staging-plain-80", "64081": "wsgate-staging-plain-81"}


def test_no_listener_moves_back_to_a_plain_group_aws_has_not_proven_healthy(endpoint, monkeypatch):
    """Turning off after the plain groups were retired (step 2 of `fab rollout --apply`: the record
    proves the plain ports served again, no longer the proxy ones): the first update registers the
    members in the plain groups but keeps both listeners on their proxy groups, the warm listeners
    forwarding to the plain groups (no listener uses them: `unused`, not health-checked); once AWS
    says every target there `healthy`, the next update moves the listeners back."""
    url = endpoint.url
    proxied = {key: list(INSTANCES) for key in ("http-proxy", "tls-proxy")}
    program.nlb_in_aws(url, {80: PROXY, 443: PROXY}, registered=proxied)  # the plain groups retired
    program.write_record(url, INSTANCES, ports=[], plain=[80, 81])
    s = lab_settings(url, OFF)

    exports, _ = both_decide(url, monkeypatch, **OFF)
    assert exports["listenerTargets"] == program.BOTH_PROXY and exports["warmListeners"] == WARM_BACK
    assert set(exports["healthWaiting"]) == {"80", "443"}
    assert "stays on its proxy group until AWS says every target of its plain group wsgate-staging-plain-80 is " \
           "healthy" in exports["healthWaiting"]["80"]
    assert "not registered yet" in exports["healthWaiting"]["80"] and "port 64080" in exports["healthWaiting"]["80"]
    assert exports["retireWaiting"] == {} and exports["retiredPlainGroups"] == []
    assert registered_in_aws(s) == {p: INSTANCES for p in (80, 81, 82, 83)}  # filled, to be checked
    assert awsapi.balancer.header_ports(s) == [82, 83]  # the hosts keep reading it meanwhile

    endpoint.health_as_aws(REGION)  # the warm listeners had every target checked (`initial`: as turning on)
    exports, _ = both_decide(url, monkeypatch, **OFF)
    assert exports["listenerTargets"] == program.BOTH_PLAIN and exports["healthWaiting"] == {}
    assert exports["warmListeners"] == {} and awsapi.balancer.header_ports(s) == []
    back = [(port, state) for port, arn, state in endpoint.moves if port in (80, 443) and "-plain-" in arn]
    assert back and all(state == "healthy" for _, state in back), endpoint.moves


def test_the_wait_ends_at_once_when_nothing_has_aws_check_the_group_any_more(endpoint):
    """`fab rollout --apply` waits for the group a listener moves to; when another update meanwhile
    removed its warm listener (a `pulumi up` from elsewhere with the other proxyProtocol), AWS will
    never check that group: the wait ends at once, saying so, not after its 15 minutes."""
    import threading
    from types import SimpleNamespace

    from core.errors import KitError
    from remote.cutover import _group_healthy

    program.nlb_in_aws(endpoint.url, {80: PROXY, 443: PROXY})  # no warm listener: the plain groups `unused`
    run = SimpleNamespace(settings=lab_settings(endpoint.url, OFF), interrupted=threading.Event(),
                          reporter=SimpleNamespace(note=lambda line: None))
    with pytest.raises(KitError, match="no listener forwards to wsgate-staging-plain-80 any more") as caught:
        _group_healthy(run, [80], PLAIN, timeout=600, every=60)
    assert "unused" in str(caught.value) and "stay on the proxy groups" in str(caught.value)
    # with its warm listener the wait goes on until the group is healthy: the `fab rollout --apply` tests below


def test_a_long_wait_for_health_says_what_it_still_waits_for(endpoint, monkeypatch):
    """A wait of up to 15 minutes must not look hung: every PROGRESS_EVERY seconds it says which
    targets AWS does not yet say healthy, and how long it has waited, until they are."""
    import threading
    from types import SimpleNamespace

    import remote.report
    from remote.cutover import _group_healthy

    url = endpoint.url
    program.nlb_in_aws(url, {80: PROXY, 443: PROXY})
    apply(lab_settings(url, OFF))  # the listeners stay on proxy, the warm listeners forward to the plain groups
    endpoint.health_as_aws(REGION, initial_reads=1)  # `initial` for the first read
    notes: list[str] = []
    run = SimpleNamespace(settings=lab_settings(url, OFF), interrupted=threading.Event(),
                          reporter=SimpleNamespace(note=notes.append))
    monkeypatch.setattr(remote.report, "PROGRESS_EVERY", 0.0)
    _group_healthy(run, [80, 443], PLAIN, timeout=120, every=0.05)
    waiting = [n for n in notes if n.startswith("still waiting for AWS (")]
    assert waiting and "of at most 120s): wsgate-staging-plain-80: " in waiting[0] and "initial" in waiting[0]
    assert notes[-1] == "verified: every target of wsgate-staging-plain-80, wsgate-staging-plain-81 is healthy"


def registered_in_aws(s) -> dict[int, list[str]]:
    """Instance port -> the instances registered (not draining) in the kit's group of that port."""
    state = awsapi.network.network_state(s)
    assert state is not None
    return {g.port: sorted(g.targets) for g in sorted(state.groups.values(), key=lambda g: g.port) if g.targets}


def test_a_listener_this_update_creates_is_no_switch(endpoint, monkeypatch):
    """No load balancer yet, a record proving everyone: its listeners carry no connection before
    they exist, so they forward to the proxy groups from the start (AWS checks them from then)."""
    program.write_record(endpoint.url, INSTANCES)
    mocks, exports, _ = program.run(endpoint.url, monkeypatch)
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PROXY)
    assert warm_declared(mocks) == {} and exports["healthWaiting"] == {}


def test_a_warm_listener_is_reachable_by_nobody(endpoint, monkeypatch):
    """No security group rule names its port: AWS health-checks the group whoever may connect."""
    mocks, _, _ = program.run(endpoint.url, monkeypatch)
    assert warm_declared(mocks) == WARM  # proxy protocol on, no listener on its proxy group
    ports = {r.inputs.get("fromPort") for r in mocks.of(program.INGRESS)}
    assert not ports & {64080, 64081} and sorted(p for p in ports if p in (80, 443)) == [80, 443]


def test_a_warm_listener_only_for_a_listener_not_where_proxy_protocol_wants_it(endpoint, monkeypatch):
    """Proxy protocol on: none for a listener on its proxy group. Off: one for a listener still on its
    proxy group, forwarding to its plain group (registered, never retired, but `unused`: no listener
    uses it), the listener kept there; none for a listener on its plain group."""
    program.nlb_in_aws(endpoint.url, {80: PROXY, 443: PLAIN})
    mocks, exports, _ = program.run(endpoint.url, monkeypatch)
    assert warm_declared(mocks) == {"64081": "wsgate-staging-proxy-83"} and exports["healthWaiting"] == {}
    mocks, exports, warnings = program.run(endpoint.url, monkeypatch, **OFF)
    assert warm_declared(mocks) == exports["warmListeners"] == {"64080": "wsgate-staging-plain-80"}
    assert (mocks.forwards_to(80), mocks.forwards_to(443)) == (PROXY, PLAIN)
    assert list(exports["healthWaiting"]) == ["80"] and "unused" in exports["healthWaiting"]["80"]
    assert any(exports["healthWaiting"]["80"] in w for w in warnings)  # the preview says it


def test_a_proxy_port_changed_while_on_is_refused_while_aws_has_not_checked_the_plain_group(endpoint, monkeypatch):
    """AWS says `unused` for the plain groups no listener forwarded to: the program declares nothing
    rather than move listener 80 off its old proxy group (82, replaced by 92) onto them."""
    program.nlb_in_aws(endpoint.url, {80: PROXY, 443: PROXY})
    program.write_record(endpoint.url, INSTANCES, ports=[82, 83])
    ports = {**stack_config("staging")["wsgate:ports"], "proxyHttp": 92}
    with pytest.raises(Exception, match=r"listener 80 \(on an old proxy group, not wsgate-staging-proxy-92\) would "
                                        r"move to its plain group wsgate-staging-plain-80, which AWS has not proven "
                                        r"healthy \(.*: unused"):
        program.run(endpoint.url, monkeypatch, **{"wsgate:ports": ports})


def test_a_listener_on_its_proxy_group_stays_there_while_a_target_is_not_healthy(endpoint, monkeypatch):
    """Health decides a switch, not a listener already switched (a sticky gate keeps it)."""
    program.nlb_in_aws(endpoint.url, {80: PROXY, 443: PROXY})
    program.write_record(endpoint.url, INSTANCES)
    mocks, exports, _ = program.run(endpoint.url, monkeypatch)  # `initial` there
    assert exports["listenerTargets"] == program.BOTH_PROXY and exports["healthWaiting"] == {}


# --- pure ----------------------------------------------------------------------------------

def test_health_holds_name_each_target_that_is_not_healthy_or_not_registered():
    s = settings_from("staging", load_balancer=program.network_lb())
    forwarding = network_forwarding((82, 83), s)
    healthy = ListenerNow(PLAIN, True, False, proxy_states=tuple((i, "healthy") for i in INSTANCES))
    assert health_holds(s, forwarding, {80: healthy, 443: healthy}, tuple(INSTANCES)) == {}
    new = "i-0123456789abcdef9"
    held = health_holds(s, forwarding, {80: healthy, 443: healthy}, (*INSTANCES, new))
    assert set(held) == {80, 443} and f"{new}: not registered yet" in held[80]
    sick = ListenerNow(PLAIN, False, False, proxy_states=((INSTANCES[0], "healthy"),
                                                          (INSTANCES[1], "unhealthy: Health checks failed")))
    held = health_holds(s, forwarding, {80: sick, 443: healthy}, tuple(INSTANCES))
    assert list(held) == [80] and f"{INSTANCES[1]}: unhealthy: Health checks failed" in held[80]
    assert INSTANCES[0] not in held[80]
    assert health_holds(s, network_forwarding((), s), {}, tuple(INSTANCES)) == {}  # the gate keeps plain


def test_health_holds_back_name_the_plain_group_and_keep_the_listener_on_its_proxy_group():
    s = settings_from("staging", proxy_protocol=False, load_balancer=program.network_lb())
    back = network_forwarding((), s)
    unused = ListenerNow(PROXY, True, False, on_proxy=True, plain_states=tuple((i, "unused") for i in INSTANCES))
    held = health_holds(s, back, {80: unused, 443: unused}, tuple(INSTANCES))
    assert set(held) == {80, 443} and f"{INSTANCES[0]}: unused" in held[443]
    assert held[80].startswith("listener 80 stays on its proxy group until AWS says every target of its plain "
                               "group wsgate-staging-plain-80 is healthy") and "switches it back" in held[80]
    healthy = ListenerNow(PROXY, True, False, on_proxy=True, plain_states=tuple((i, "healthy") for i in INSTANCES))
    assert health_holds(s, back, {80: healthy, 443: healthy}, tuple(INSTANCES)) == {}
    retired = health_holds(s, back, {80: ListenerNow(PROXY, True, True, on_proxy=True)}, tuple(INSTANCES))
    assert list(retired) == [80] and f"{INSTANCES[1]}: not registered yet" in retired[80]
    on_plain = ListenerNow(PLAIN, True, False, plain_states=tuple((i, "unused") for i in INSTANCES))
    assert health_holds(s, back, {80: on_plain}, tuple(INSTANCES)) == {}  # where it should be already
    assert [x.port for x in warm_listeners(s, {80: PROXY, 443: PLAIN})] == [80]


def test_a_listener_stranded_on_an_old_proxy_group_goes_plain_only_to_a_plain_group_aws_checked():
    """ports.proxyHttp changed while on: listener 80 forwards to the old port's group, which this
    update replaces, so it cannot wait there; its plain group, which no listener used, is `unused`."""
    s = settings_from("staging", ports={"proxyHttp": 92}, load_balancer=program.network_lb())
    plain = network_forwarding((83,), s)  # 92 unproven: listener 80 goes plain, 443 stays on 83
    stranded = ListenerNow(PROXY, True, False, plain_states=tuple((i, "unused") for i in INSTANCES))
    on_83 = ListenerNow(PROXY, True, False, on_proxy=True)
    refused = stranded_refusal(s, plain, {80: stranded, 443: on_83})
    assert refused is not None and refused.startswith(
        "listener 80 (on an old proxy group, not wsgate-staging-proxy-92) would move to its plain group "
        f"wsgate-staging-plain-80, which AWS has not proven healthy ({INSTANCES[0]}: unused")
    assert "443" not in refused and "put ports.proxyHttp/proxyTls back, turn proxy protocol off" in refused
    empty = ListenerNow(PROXY, True, True)  # retired: back_refusal's, and still never proven here
    assert "no target registered" in (stranded_refusal(s, plain, {80: empty}) or "")
    checked = ListenerNow(PROXY, True, False, plain_states=tuple((i, "healthy") for i in INSTANCES))
    assert stranded_refusal(s, plain, {80: checked, 443: on_83}) is None  # a warm listener had AWS check it
    assert stranded_refusal(s, network_forwarding((92, 83), s), {80: stranded, 443: on_83}) is None  # no move


def test_status_says_a_listener_on_its_way_back_waits_for_its_plain_groups_health():
    """Turning off, the record's proof withdrawn, the listeners still on their proxy groups while the
    warm listeners have AWS check the plain groups: the next `pulumi up` would not switch either, so
    `fab status` says why they wait (notes), not `run pulumi up`; without a warm listener it does."""
    from core.doctor import BalancerFacts, balancer_problems
    from core.network import NetworkState, TargetGroupState

    s = settings_from("staging", proxy_protocol=False, load_balancer=program.network_lb())
    groups, listeners = {}, {}
    for x in network_listeners(s):
        for g, word in ((x.plain, "unused"), (x.proxy, "healthy")):
            groups[g.name] = TargetGroupState(f"arn:{g.name}", g.name, g.port, g.proxy_protocol_v2, tuple(INSTANCES),
                                              states={i: word for i in INSTANCES})
        listeners[x.port] = (groups[x.proxy.name],)
    state = NetworkState("arn:lb", listeners, groups=groups, present=tuple(INSTANCES), switched={80: 0.0, 443: 0.0})
    lb = BalancerFacts(exists=True, listeners=[("TCP", 80, "TCP", 82), ("TLS", 443, "TCP", 83)],
                       header_ports=[82, 83], registered=list(INSTANCES), present=list(INSTANCES),
                       health={i: "InService" for i in INSTANCES}, network=state.now(s), warm=[80, 443])
    problems, notes, _ = balancer_problems(s, lb, None, None, 0.0)
    assert problems == [], problems
    assert sum("stays on its proxy group until AWS says every target of its plain group" in n for n in notes) == 2
    problems, _, _ = balancer_problems(s, BalancerFacts(**{**lb.__dict__, "warm": [80]}), None, None, 0.0)
    assert "the listeners send PROXY v2 to ports [82, 83], the gate wants none: run `pulumi up`" in problems
    assert any(p.startswith("gate off:") for p in problems)


def test_warm_ports_follow_the_setting_and_are_never_a_listeners_own():
    s = settings_from("staging", load_balancer=program.network_lb(warmPort=20000))
    assert [x.warm_port for x in network_listeners(s)] == [20000, 20001]
    assert [x.port for x in warm_listeners(s, network_forwarding((83,), s))] == [80]
    for bad in (443, 79, 65535):
        assert "loadBalancer.warmPort" in program.refused(lb={"warmPort": bad})


# --- `fab rollout --apply` on real hosts ----------------------------------------------------

FLEET_SIZE = 1


def network_fleet(fleet, proxy: AwsFaults, aws_url: str) -> tuple[int, int]:
    """The fleet's environment with a network load balancer, its AWS endpoint `proxy` (AWS's target
    health), proxy protocol off, and the load balancer made as a `pulumi up` would (on plain, no
    warm listener); its proxy ports (proxyHttp, proxyTls)."""
    import boto3

    from tests.support.procs import free_ports
    from tests.test_rollout import settings

    proxy.health_as_aws("us-east-1")  # `initial` reads: the program tests above
    fleet.set("wsgate:proxyProtocol", False)
    ec2 = boto3.client("ec2", endpoint_url=aws_url, region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.97.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.97.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    proxy_http, proxy_tls = free_ports(2, [h.address for h in fleet.hosts])
    fleet.set("aws:endpoints", [{x: proxy.url for x in ("ec2", "elb", "elbv2", "ssm", "sts")}])
    fleet.set("wsgate:ports", {"proxyHttp": proxy_http, "proxyTls": proxy_tls})
    lb = {k: v for k, v in fleet.config["wsgate:loadBalancer"].items() if k != "availabilityZones"}
    fleet.config["wsgate:loadBalancer"] = {**lb, "type": "network", "subnets": [subnet], "vpcId": vpc,
                                           "deregistrationDelay": 0, "switchDrain": 1}
    fleet.write()
    apply(settings(fleet))  # `pulumi up`
    return proxy_http, proxy_tls


def serves(fleet, port: int) -> list[bool]:
    """Per host: whether something accepts a TCP connection on `port` at its address."""
    from tests.support.procs import accepts

    return [accepts(h.address, port) for h in fleet.hosts]


@pytest.mark.integration
def test_fab_rollout_apply_waits_for_the_health_of_the_group_it_switches_to_either_way(fleet, aws):
    """Proxy protocol turned on over a network load balancer on plain: the first `pulumi up` keeps
    the listeners on plain (their proxy groups were never health-checked) and adds the warm
    listeners, the run waits until AWS says the groups healthy, applies again, and only then do the
    listeners forward to the proxy groups. Then turned off: the plain groups are still registered
    but no listener uses them (`unused`), so the turn-off's `pulumi up` keeps the listeners on their
    proxy groups and points the warm listeners at the plain groups, the run waits until AWS says
    those healthy, applies again, the listeners go back, and only then do the hosts stop serving
    the proxy ports. One test for both ways: a fleet and its setup cost more than either run."""
    from tests.test_rollout import fab, settings

    proxy = AwsFaults(aws.url)
    try:
        proxy_http, proxy_tls = network_fleet(fleet, proxy, aws.url)
        assert warm_in_aws(settings(fleet)) == {}
        fleet.set("wsgate:proxyProtocol", True)

        result = fab(fleet, "rollout", "--apply", timeout=300)

        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert "stays on its plain group until AWS says every target of its proxy group" in out
        assert "unused" in out
        assert "waiting for AWS to report every target of" in out and "is healthy" in out
        s = settings(fleet)
        assert awsapi.balancer.header_ports(s) == sorted([proxy_http, proxy_tls])
        assert warm_in_aws(s) == {}  # gone once the listeners forward to the proxy groups
        groups = {g.proxy.name for g in network_listeners(s)}
        to_proxy = [(port, state) for port, arn, state in proxy.moves
                    if port in (80, 443) and arn.rsplit("/", 2)[-2] in groups]
        assert [port for port, _ in to_proxy] and all(state == "healthy" for _, state in to_proxy), proxy.moves

        fleet.set("wsgate:proxyProtocol", False)  # the plain groups are not retired yet
        before = len(proxy.moves)

        result = fab(fleet, "rollout", "--apply", timeout=300)

        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert "stays on its proxy group until AWS says every target of its plain group" in out and "unused" in out
        assert "healthy before the switch back" in out
        s = settings(fleet)
        assert awsapi.balancer.header_ports(s) == [] and warm_in_aws(s) == {}
        groups = {g.plain.name for g in network_listeners(s)}
        back = [(port, state) for port, arn, state in proxy.moves[before:]
                if port in (80, 443) and arn.rsplit("/", 2)[-2] in groups]
        assert sorted(port for port, _ in back) == [80, 443] and all(state == "healthy" for _, state in back), \
            proxy.moves[before:]
        assert serves(fleet, proxy_http) == serves(fleet, proxy_tls) == [False]
        assert serves(fleet, s.ports.tls) == [True]
    finally:
        proxy.stop()
