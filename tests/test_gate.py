"""The gate decision, exhaustively: a port gets the policy only when every backend is proven
ready on it, and once a port has it, only an explicit off takes it away."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.gate import GateState, decide
from core.record import ReadinessRecord, RecordError, build

PORTS = [80, 81]
# IDs from a small pool: draws share instances (a backend also in the record, or not) far more often
# than random 17-digit IDs would, and cost a fraction of a regex draw
POOL = [f"i-{n:017x}" for n in range(12)]
instances = st.lists(st.sampled_from(POOL), max_size=6, unique=True)


@st.composite
def situations(draw):
    backends = draw(instances)
    has_record = draw(st.booleans())
    record = None
    if has_record:
        covered = draw(st.lists(st.sampled_from(backends), unique=True) if backends else st.just([]))
        extra = draw(instances)
        served = {i: draw(st.sampled_from(["a" * 64, "b" * 64])) for i in set(covered) | set(extra)}
        ports = draw(st.sampled_from([[80, 81], [80], [81], [80, 81, 8081]]))
        env = draw(st.sampled_from(["staging", "staging", "prod"]))
        if served:
            record = build(env, ports, served)
    attached = draw(st.lists(st.sampled_from([80, 81, 82]), unique=True))  # 82: a port the config left
    return dict(env="staging", wanted=draw(st.booleans()), backends=backends, ports=PORTS,
                record=record, header_ports=sorted(attached))


def proven(record, backends, port):
    return (record is not None and record.env == "staging" and bool(backends)
            and port in record.proxy_protocol_ports and set(backends) <= set(record.instances))


@settings(max_examples=1000, deadline=None)
@given(situations())
def test_gate_rules(situation):
    d = decide(**situation)
    wanted, attached, record, backends = (situation["wanted"], situation["header_ports"], situation["record"],
                                          situation["backends"])
    # Off is the only way to detach, and it always detaches.
    if not wanted:
        assert (d.ports, d.state) == ((), GateState.OFF)
        return
    # A port that has the policy keeps it while wanted, whatever the record says.
    assert set(attached) <= set(d.ports)
    # A port is newly attached only when the record proves every backend on it; every proven port is attached.
    for port in set(d.ports) - set(attached):
        assert proven(record, backends, port)
    for port in PORTS:
        if proven(record, backends, port):
            assert port in d.ports
    covered = all(proven(record, backends, p) for p in PORTS)
    unproven_kept = [p for p in attached if not proven(record, backends, p)]
    assert d.state == (GateState.OPEN if covered else GateState.STICKY if unproven_kept else GateState.CLOSED)
    # Anything not open names every backend that is missing, and says so in the message.
    if not covered:
        assert d.missing and d.warn
        for instance in d.missing:
            assert instance in d.message
    else:
        assert d.missing == {} and not d.warn


@pytest.mark.parametrize("attached", [[], [80, 81]])
def test_no_backends_never_opens_the_gate(attached):
    record = build("staging", PORTS, {"i-0123456789abcdef0": "a" * 64})
    d = decide(env="staging", wanted=True, backends=[], ports=PORTS, record=record, header_ports=attached)
    assert d.state == (GateState.STICKY if attached else GateState.CLOSED)
    assert "no backend instances configured" in d.message


def test_a_port_change_keeps_the_old_port_and_attaches_the_new_one_only_when_proven():
    backends = ["i-0123456789abcdef0"]
    old = build("staging", [80, 81], {backends[0]: "a" * 64})
    d = decide(env="staging", wanted=True, backends=backends, ports=[80, 82], record=old, header_ports=[80, 81])
    assert d.ports == (80, 81) and d.state is GateState.STICKY  # 82 is not proven: not attached
    new = build("staging", [80, 82], {backends[0]: "b" * 64})
    d = decide(env="staging", wanted=True, backends=backends, ports=[80, 82], record=new, header_ports=[80, 81])
    assert d.ports == (80, 81, 82)


def test_an_unreadable_record_is_a_reason_not_a_crash():
    d = decide(env="staging", wanted=True, backends=["i-0123456789abcdef0"], ports=PORTS, record=None,
               header_ports=[], record_problem="readiness record is not valid: boom")
    assert d.missing == {"i-0123456789abcdef0": "readiness record is not valid: boom"}


def test_record_round_trips_and_stays_compact():
    served = {f"i-{n:017x}": ("a" if n % 2 else "b") * 64 for n in range(300)}
    record = build("staging", [81, 80], served, now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    text = record.to_json()
    assert ReadinessRecord.from_json(text) == record
    assert record.proxy_protocol_ports == [80, 81]
    assert record.instances == served
    assert len(text) <= 8192  # a Parameter Store value (advanced tier) holds 8 KB


@pytest.mark.parametrize("text", ["", "{}", "not json", '{"version": 2}',
                                  '{"version":1,"env":"x","writtenAt":"2026-01-01T00:00:00Z",'
                                  '"proxyProtocolPorts":[80],"digests":{"d":["i-nope"]}}'])
def test_a_malformed_record_is_refused(text):
    with pytest.raises(RecordError):
        ReadinessRecord.from_json(text)


@settings(max_examples=500, deadline=None)
@given(situations(), st.data())
def test_scale_out_rules(situation, data):
    from core.gate import plan

    instances = situation["backends"]
    registered = data.draw(st.lists(st.sampled_from(instances), unique=True) if instances else st.just([]))
    p = plan(env="staging", wanted=situation["wanted"], instances=instances, registered=registered, ports=PORTS,
             record=situation["record"], header_ports=situation["header_ports"])
    assert set(p.join) | set(p.waiting) == set(instances) and not set(p.join) & set(p.waiting)
    if not p.decision.ports and not situation["header_ports"]:  # no header anywhere: every instance joins
        assert set(p.join) == set(instances)
    else:  # the header is (being) sent or detached: an instance joins only registered already, or proven
        for i in p.join:
            live = set(p.decision.ports or situation["header_ports"]) & set(PORTS)  # a port the config left: inert
            assert i in registered or all(proven(situation["record"], [i], port) for port in live)
        for i, why in p.waiting.items():
            assert i not in registered and why.startswith("waits to join")


def test_a_record_for_another_load_balancer_proves_nothing():
    record = build("staging", PORTS, {"i-0123456789abcdef0": "a" * 64}, load_balancer="wsgate-other")
    d = decide(env="staging", wanted=True, backends=["i-0123456789abcdef0"], ports=PORTS, record=record,
               header_ports=[], load_balancer="wsgate-staging")
    assert d.ports == () and d.missing == {"i-0123456789abcdef0": "record is for load balancer 'wsgate-other'"}
    same = decide(env="staging", wanted=True, backends=["i-0123456789abcdef0"], ports=PORTS, record=record,
                  header_ports=[], load_balancer="wsgate-other")
    assert same.ports == tuple(PORTS)


# --- can the load balancer follow a rollout? (core.gate.follow_refusal) ----------------------

def _follow(reached, registered=(), header_ports=(), instances=None, present=None, ports=None, env="staging"):
    from core.gate import follow_refusal
    from tests.conftest import settings_from

    s = settings_from("staging")
    if instances is not None:
        s = s.model_copy(update={"load_balancer": s.load_balancer.model_copy(update={"instances": instances})})
    served = {i: "a" * 64 for i in reached}
    record = build(env, ports or list(s.proxy_ports), served, load_balancer=s.load_balancer.name) if served else None
    return follow_refusal(s, reached=set(reached), registered=list(registered), header_ports=list(header_ports),
                          record=record, present=present)


def test_a_rollout_that_reaches_every_instance_the_gate_waits_for_can_be_followed():
    from tests.conftest import settings_from

    every = list(settings_from("staging").load_balancer.instances)
    assert _follow(every) is None
    assert _follow(every, registered=every, header_ports=[80, 81]) is None


@pytest.mark.parametrize("extra", ["configured", "registered", "in a group"])
def test_an_instance_the_rollout_does_not_reach_is_named(extra):
    from tests.conftest import settings_from

    every = list(settings_from("staging").load_balancer.instances)
    other = "i-0000000000000dead"
    kwargs = {"configured": {"instances": [*every, other]}, "registered": {"registered": [*every, other]},
              "in a group": {"present": [*every, other]}}[extra]
    refused = _follow(every, **kwargs)
    assert refused and f"the gate would wait for instance(s) {other}" in refused and "nothing was changed" in refused


def test_a_record_that_would_not_cover_every_proxy_port_is_refused():
    from tests.conftest import settings_from

    every = list(settings_from("staging").load_balancer.instances)
    refused = _follow(every, ports=[80])  # the probes would prove port 80 only
    assert refused and "would not send the PROXY header to port(s) 81" in refused
    assert _follow(every, env="prod") and "would not send" in _follow(every, env="prod")


def test_no_refusal_where_a_closed_gate_breaks_nothing_or_the_header_is_on_already():
    from tests.conftest import settings_from

    every = list(settings_from("staging").load_balancer.instances)
    other = "i-0000000000000dead"
    # the header on every proxy port already: the sticky gate keeps it, whatever joins
    assert _follow(every, registered=[*every, other], header_ports=[80, 81]) is None
    # no backend configured, none registered: the load balancer sends nobody anything
    assert _follow([], instances=[]) is None
