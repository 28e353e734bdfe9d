"""The move between load balancers, pure: its settings, its record, what each side declares and serves."""

from __future__ import annotations

import socket
import subprocess
from datetime import datetime, timezone

import pytest

from core.errors import SettingsError
from core.move import (
    Drain,
    MoveError,
    MoveRecord,
    Step,
    conflict,
    connections_command,
    declared,
    move_path,
    next_step,
    parse_connections,
    served,
)
from core.settings import from_config
from tests.conftest import settings_from, stack_config

DNS = {"zoneId": "Z0123456789ABC", "name": "ws.lab.test", "ttl": 5}


def network_lb(name: str = "wsgate-lab-nlb") -> dict:
    lb = dict(stack_config("lab")["wsgate:loadBalancer"])
    lb.pop("availabilityZones")
    return {**lb, "name": name, "type": "network", "subnets": ["subnet-12345678"], "vpcId": "vpc-12345678"}


def classic_lb(name: str = "wsgate-lab-b") -> dict:
    return {**stack_config("lab")["wsgate:loadBalancer"], "name": name}


NEW_PORTS = {"http": 18090, "tls": 18091, "health": 18082, "proxyHttp": 18093, "proxyTls": 18094}


def moving(**move) -> object:
    return settings_from("lab", dns=DNS, move_to={"loadBalancer": network_lb(), "proxyProtocol": True,
                                                  "ports": NEW_PORTS, **move})


def record(**fields) -> MoveRecord:
    base = {"env": "lab", "source": "wsgate-lab", "target": "wsgate-lab-nlb",
            "updated_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}
    return MoveRecord.model_validate({**base, **fields})


def test_move_to_is_whole_settings_of_its_own_kind_and_ports():
    s = moving()
    t = s.moving_to
    assert t.load_balancer.type == "network" and t.proxy_protocol and t.ports.http == 18090
    assert t.hosts == s.hosts and t.env == s.env and t.move_to is None
    assert s.balancer_names == ("wsgate-lab", "wsgate-lab-nlb")
    assert t.served() == {18090: ("plain", "http"), 18093: ("v2", "proxy_http"), 18091: ("plain", "tls"),
                          18094: ("v2", "proxy_tls")}
    assert s.served() == {18080: ("v1", "http"), 18081: ("v1", "tls")}


@pytest.mark.parametrize("change, words", [
    ({"dns": None}, "moveTo needs dns"),
    ({"move_to": {"loadBalancer": classic_lb("wsgate-lab"), "ports": NEW_PORTS}}, "two load balancers need two names"),
    # a port the two frame differently: named, with both framings
    ({"move_to": {"loadBalancer": classic_lb(), "ports": {**NEW_PORTS, "http": 18080}}},
     "port 18080 is ports.http of loadBalancer and moveTo.ports.http: loadBalancer 'wsgate-lab' frames it v1, "
     "moveTo 'wsgate-lab-b' plain"),
    # framed alike, still refused: the drain counts connections per port
    ({"move_to": {"loadBalancer": classic_lb(), "proxyProtocol": True, "ports": {**NEW_PORTS, "tls": 18081}}},
     "the drain could not tell whose connections it holds"),
    ({"move_to": {"loadBalancer": classic_lb(), "ports": {**NEW_PORTS, "health": 18080}}},
     "moveTo.ports.health 18080 is a service port of loadBalancer"),
    ({"move_to": {"loadBalancer": {**network_lb(), "idleTimeout": 10}, "ports": NEW_PORTS}},
     "wsgate:moveTo.loadBalancer.idleTimeout = 10"),
    # a rule of the whole settings, checked for the target too: named as moveTo's
    ({"nginx": {**stack_config("lab")["wsgate:nginx"], "proxyReadTimeout": 100}},
     "moveTo: nginx.proxyReadTimeout (100) must be >= the network load balancer's longest idle timeout"),
    ({"dns": {**DNS, "steps": [50, 20, 100]}}, "steps must rise and end at 100"),
    ({"dns": {**DNS, "steps": [10, 50]}}, "steps must rise and end at 100"),
    ({"dns": {**DNS, "zoneId": "z-lower"}}, "Route 53 hosted zone ID"),
    ({"dns": {**DNS, "ttl": 0}}, "dns.ttl"),
])
def test_bad_move_settings_are_refused_by_key(change, words):
    base = {"dns": DNS, "move_to": {"loadBalancer": network_lb(), "proxyProtocol": True, "ports": NEW_PORTS}}
    with pytest.raises(SettingsError) as err:
        settings_from("lab", **{**base, **change})
    assert words in str(err.value)


def test_a_ttl_below_the_alias_ttl_needs_a_test_endpoint():
    assert settings_from("lab", dns={**DNS, "ttl": 2}).dns.ttl == 2  # the lab: aws:endpoints set
    with pytest.raises(SettingsError, match="below the 60 s AWS gives an alias record"):
        settings_from("staging", dns={**DNS, "ttl": 30})
    assert settings_from("staging", dns=DNS | {"ttl": 60}).dns.pause_seconds == 60


def test_the_health_port_may_be_shared():
    assert moving().moving_to.ports.health == moving().ports.health


def test_without_a_record_the_program_declares_the_source_alone():
    s = moving()
    assert declared(s, None) == {"wsgate-lab": 100}
    assert declared(settings_from("lab", dns=None), None) == {"wsgate-lab": None}  # no dns: no record at all
    assert declared(settings_from("lab", dns=DNS), None) == {"wsgate-lab": 100}


@pytest.mark.parametrize("fields, want", [
    ({}, {"wsgate-lab": 100}),
    ({"target_declared": True}, {"wsgate-lab": 100, "wsgate-lab-nlb": 0}),
    ({"target_declared": True, "weight": 30}, {"wsgate-lab": 70, "wsgate-lab-nlb": 30}),
    ({"target_declared": True, "weight": 100}, {"wsgate-lab": 0, "wsgate-lab-nlb": 100}),
    ({"target_declared": True, "weight": 100, "source_declared": False}, {"wsgate-lab-nlb": 100}),
])
def test_the_record_decides_what_is_declared_and_never_all_zero(fields, want):
    got = declared(moving(), record(**fields))
    assert got == want
    assert sum(w for w in got.values() if w) > 0


def test_another_move_half_done_is_refused_naming_its_step():
    other = record(target="wsgate-lab-other", reached="weigh", target_declared=True, weight=50)
    with pytest.raises(MoveError, match="a move from 'wsgate-lab' to 'wsgate-lab-other' is at step weigh"):
        declared(moving(), other)
    # the move removed from the settings mid-way: refused too, not silently undone
    with pytest.raises(MoveError, match="is at step weigh"):
        declared(settings_from("lab", dns=DNS), record(reached="weigh", target_declared=True, weight=50))
    assert conflict(moving(), record(reached="weigh")) is None


def test_a_finished_move_promoted_is_no_conflict():
    done = record(reached="done", target_declared=True, weight=100, source_declared=False)
    config = {**stack_config("lab"), "wsgate:dns": DNS, "wsgate:loadBalancer": network_lb(), "wsgate:ports": NEW_PORTS}
    promoted = from_config("lab", config, "Pulumi.lab.yaml")
    assert declared(promoted, done) == {"wsgate-lab-nlb": 100}
    with pytest.raises(MoveError, match="promote moveTo"):
        declared(settings_from("lab", dns=DNS), done)


def test_the_hosts_serve_both_until_the_source_is_retired():
    s = moving()
    assert [x.load_balancer.name for x in served(s, None)] == ["wsgate-lab", "wsgate-lab-nlb"]
    assert [x.load_balancer.name for x in served(s, record(reached="drain"))] == ["wsgate-lab", "wsgate-lab-nlb"]
    assert [x.load_balancer.name for x in served(s, record(reached="retire"))] == ["wsgate-lab-nlb"]
    assert [x.load_balancer.name for x in served(settings_from("lab", dns=None), None)] == ["wsgate-lab"]


def test_a_rerun_goes_on_from_the_last_proven_step():
    assert next_step(None) == Step.SERVE
    assert next_step(record(reached="serve")) == Step.CREATE
    assert next_step(record(reached="weigh", weight=50)) == Step.WEIGH
    assert next_step(record(reached="weigh", weight=100)) == Step.DRAIN
    assert next_step(record(reached="retire")) == Step.DONE


def test_the_record_lives_beside_the_readiness_record():
    s = moving()
    assert move_path(s) == "/wsgate/lab/readiness-move"
    assert move_path(s).rsplit("/", 1)[0] == s.parameter_dir
    with pytest.raises(MoveError, match="not valid"):
        MoveRecord.from_json('{"env": "lab"}', move_path(s))


def test_connections_are_counted_per_port_with_the_real_ss():
    """A listener with one established connection on one port and none on the other, as `ss` on a
    host reports them (the command run here as the drain runs it there)."""
    server = socket.create_server(("127.0.0.1", 0))
    idle = socket.create_server(("127.0.0.1", 0))
    port, other = server.getsockname()[1], idle.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    try:
        out = subprocess.run(connections_command([port, other], "127.0.0.1"), shell=True, capture_output=True,
                             text=True, check=True).stdout
        assert parse_connections(out, [port, other]) == {port: 1, other: 0}
        out = subprocess.run(connections_command([port], "127.0.0.2"), shell=True, capture_output=True, text=True,
                             check=True).stdout
        assert parse_connections(out, [port]) == {port: 0}  # another host's address: not its connection
    finally:
        for s in (client, accepted, server, idle):
            s.close()


def test_the_drain_needs_a_quiet_period_and_has_a_bound():
    d = Drain(started=0, quiet=5, bound=30)
    d.sample(1, 2)
    assert not d.drained(1)
    d.sample(2, 0)
    d.sample(6, 0)
    assert not d.drained(6)
    d.sample(7, 1)  # a connection again: the quiet period starts over
    d.sample(8, 0)
    assert not d.drained(12) and d.drained(13)
    assert not d.over(29) and d.over(30)
