"""The gate decision, exhaustively: the policy is on only when every backend is proven ready,
and once on, only an explicit off takes it away."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.gate import GateState, decide
from core.record import ReadinessRecord, RecordError, build

PORTS = [80, 81]
instances = st.lists(st.from_regex(r"i-[0-9a-f]{17}", fullmatch=True), max_size=6, unique=True)


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
    return dict(env="staging", wanted=draw(st.booleans()), backends=backends, ports=PORTS,
                record=record, attached=draw(st.booleans()))


def fully_covers(record, backends, ports):
    return (record is not None and record.env == "staging" and bool(backends)
            and set(ports) <= set(record.proxy_protocol_ports) and set(backends) <= set(record.instances))


@settings(max_examples=2000, deadline=None)
@given(situations())
def test_gate_rules(situation):
    d = decide(**situation)
    wanted, attached = situation["wanted"], situation["attached"]
    covered = fully_covers(situation["record"], situation["backends"], PORTS)
    # Off is the only way to detach, and it always detaches.
    if not wanted:
        assert (d.attach, d.state) == (False, GateState.OFF)
        return
    # Attached stays attached while wanted, whatever the record says.
    if attached:
        assert d.attach
    # A closed gate never attaches; the policy goes on only when every backend is covered.
    if not attached:
        assert d.attach == covered
    assert d.state == (GateState.OPEN if covered else GateState.STICKY if attached else GateState.CLOSED)
    # Anything not open names every backend that is missing, and says so in the message.
    if not covered:
        assert d.missing and d.warn
        for instance in d.missing:
            assert instance in d.message
    else:
        assert d.missing == {} and not d.warn


@pytest.mark.parametrize("attached", [False, True])
def test_no_backends_never_opens_the_gate(attached):
    record = build("staging", PORTS, {"i-0123456789abcdef0": "a" * 64})
    d = decide(env="staging", wanted=True, backends=[], ports=PORTS, record=record, attached=attached)
    assert d.state == (GateState.STICKY if attached else GateState.CLOSED)
    assert "no backend instances configured" in d.message


def test_an_unreadable_record_is_a_reason_not_a_crash():
    d = decide(env="staging", wanted=True, backends=["i-0123456789abcdef0"], ports=PORTS, record=None,
               attached=False, record_problem="readiness record is not valid: boom")
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
