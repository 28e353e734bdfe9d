"""The hosts' config during a move between load balancers: rendered once for both, each port framed
as the load balancer that uses it frames its traffic, proven on a real nginx."""

from __future__ import annotations

import json
import re

import pytest

from core import proxyproto
from core.move import served
from core.probe import checks
from core.render import render, served_ports
from lab.client import dial, http_get
from tests.conftest import settings_from, stack_config
from tests.support.nginx import Nginx
from tests.support.procs import free_ports, wait_port

BIND = "127.0.2.9"
NAME = "ws.lab.test"
DNS = {"zoneId": "Z0123456789ABC", "name": NAME, "ttl": 5}
SUBNETS = {"type": "network", "availabilityZones": [], "subnets": ["subnet-0123456789abcdef0"],
           "vpcId": "vpc-0123456789abcdef0"}


def classic_lb(name: str, **extra) -> dict:
    return {**stack_config("lab")["wsgate:loadBalancer"], "name": name, **extra}


def network_lb(name: str, **extra) -> dict:
    lb = {k: v for k, v in classic_lb(name).items() if k != "availabilityZones"}
    return {**lb, **SUBNETS, **extra}


# (source kind, source proxy protocol) -> (target kind, target proxy protocol): the moves the kit makes
MOVES = {
    "classic off -> classic on": (("classic", False), ("classic", True)),
    "classic on -> network": (("classic", True), ("network", True)),
    "network -> classic": (("network", True), ("classic", True)),
}


def moving(kinds, ports, root=None, app=None, shared_health=True, **target_lb) -> object:
    """Settings moving from one load balancer to another on their own ports (5 each, from `ports`)."""
    (source, source_pp), (target, target_pp) = kinds
    mine, theirs = ports[:5], ports[5:10]
    names = ("http", "tls", "health", "proxyHttp", "proxyTls")
    source_ports, target_ports = dict(zip(names, mine, strict=True)), dict(zip(names, theirs, strict=True))
    if shared_health:
        target_ports["health"] = source_ports["health"]
    make = {"classic": classic_lb, "network": network_lb}
    changes: dict = {"proxy_protocol": source_pp, "ports": source_ports, "dns": DNS,
                     "move_to": {"loadBalancer": make[target]("wsgate-lab-new", **target_lb),
                                 "proxyProtocol": target_pp, "ports": target_ports}}
    if source == "network":
        changes["load_balancer"] = SUBNETS
    if root:
        changes["nginx"] = {"root": str(root), "workerShutdownTimeout": 5}
    if app:
        changes["app"] = {"upstreams": [f"{app[0]}:{app[1]}"]}
    return settings_from("lab", **changes)


def both(s):
    """The settings serving what both load balancers need (core.move.served, no move record yet)."""
    return s.serving(served(s, None))


def answer(port: int, preface: bytes, path: str = "/") -> tuple[int | None, dict]:
    """One request to the port after `preface`: (status, headers), or (None, {}) when closed unanswered."""
    try:
        status, headers, _ = http_get(dial(BIND, port, preface=preface), NAME, path)
    except (OSError, Exception):  # noqa: BLE001 - closed without an HTTP answer
        return None, {}
    return status, {k.lower(): v for k, v in headers.items()}


def header(version: str) -> bytes:
    return (proxyproto.v1 if version == "v1" else proxyproto.v2)("203.0.113.9", BIND, 40000, 443)


# --- pure: what is rendered ----------------------------------------------------------------

def test_without_a_move_the_tree_is_the_one_rendered_today():
    s = settings_from("lab")
    assert s.balancers == [s]
    assert render(s.serving([s])).files == render(s).files
    assert render(s.serving(served(s, None)), "127.0.1.1").digest == render(s, "127.0.1.1").digest
    assert json.loads(render(s).files["release.json"]).keys() == {"env", "bind", "ports", "proxyProtocol"}


@pytest.mark.parametrize("move", MOVES)
def test_both_load_balancers_ports_are_rendered_each_with_its_own_framing(move):
    ports = list(range(20001, 20011))
    s = both(moving(MOVES[move], ports, shared_health=False))
    source, target = s.balancers
    tree = render(s, BIND)
    conf = "".join(tree.files[n] for n in sorted(tree.files) if n.endswith(".conf"))
    listens = {int(m[1]): m[2] for m in re.finditer(rf"listen {re.escape(BIND)}:(\d+)( proxy_protocol)?", conf)}
    want = {**{p: f for p, (f, _) in source.served().items()}, **{p: f for p, (f, _) in target.served().items()}}
    assert set(listens) == set(want) | {source.ports.health, target.ports.health} == served_ports(s)
    for port, framing in want.items():
        assert bool(listens[port]) == (framing != "plain"), (port, framing)
    assert not listens[source.ports.health] and not listens[target.ports.health]
    manifest = json.loads(tree.files["release.json"])
    assert set(manifest["ports"].values()) == served_ports(s)
    assert manifest["loadBalancers"] == ["wsgate-lab", "wsgate-lab-new"]


def test_http_level_settings_hold_for_both_load_balancers():
    """Classic without the header -> network with it: the header's client address is believed from
    the new load balancer's subnets, the log format is the header's, the timeouts outlast the
    network load balancer's TLS idle timeout (350 s), the longer of the two."""
    s = both(moving(MOVES["classic on -> network"], list(range(20001, 20011)), subnetCidrs=["10.1.0.0/24"]))
    assert s.balancers[0].read_timeout == 120 and s.balancers[1].read_timeout == 410
    base = render(s).files["http.d/00-base.conf"]
    assert re.findall(r"set_real_ip_from (\S+);", base) == ["127.0.0.1/32", "10.1.0.0/24"]
    assert "log_format elb_log '$proxy_protocol_addr" in base
    app = render(s).files["http.d/20-app.conf"]
    assert set(re.findall(r"proxy_(?:read|send)_timeout (\d+)s;", app)) == {"410"}
    off_to_on = both(moving(MOVES["classic off -> classic on"], list(range(20001, 20011))))
    assert "real_ip_header proxy_protocol;" in render(off_to_on).files["http.d/00-base.conf"]
    alone = off_to_on.serving([off_to_on])  # the old load balancer's ports alone: no header anywhere
    assert "real_ip_header" not in render(alone).files["http.d/00-base.conf"]


def test_once_the_old_load_balancer_is_retired_only_the_new_ones_ports_are_served():
    s = moving(MOVES["classic on -> network"], list(range(20001, 20011)))
    target = s.moving_to
    alone = target.serving([target])
    assert render(alone, BIND).files == render(target, BIND).files
    assert not {s.ports.http, s.ports.tls} & served_ports(alone)


def test_a_retired_plain_port_stays_the_network_load_balancers_own():
    s = moving(MOVES["network -> classic"], list(range(20001, 20011)))
    source, target = served(s, None)
    retired = source.retiring([source.ports.http])
    mixed = retired.serving([retired, target])
    assert source.ports.http not in served_ports(mixed)
    assert {target.ports.http, target.ports.tls, source.ports.tls, source.ports.proxy_http} <= served_ports(mixed)


# --- on a real nginx: every port answers as its framing says ---------------------------------

@pytest.mark.parametrize("shared_health", [True, False])
@pytest.mark.parametrize("move", MOVES)
def test_nginx_serves_both_load_balancers_ports_as_each_frames_them(tmp_path, app, move, shared_health):
    s = both(moving(MOVES[move], free_ports(10, [BIND]), tmp_path, app, shared_health=shared_health))
    tree = render(s, BIND)
    nginx = Nginx(tmp_path)
    nginx.install(tree)
    result = nginx.test()
    assert result.returncode == 0, result.stderr
    nginx.start()
    try:
        for port in served_ports(s):
            wait_port(BIND, port)
        for b in s.balancers:
            health, _ = answer(b.ports.health, b"", "/healthz")
            assert health == 200
            for port, (framing, role) in b.served().items():
                path = "/wsgate-probe" if role.endswith("http") else "/"
                right = b"" if framing == "plain" else header(framing)
                status, headers = answer(port, right, path)
                if role.endswith("http"):
                    assert (status, headers.get("location")) == (301, f"https://{NAME}{path}"), (port, framing)
                else:
                    assert status == 200 and headers.get("x-upstream-status"), (port, framing, status)
                assert headers["x-config-digest"] == tree.digest
                wrong = [header("v1"), header("v2")] if framing == "plain" else [b""]
                for preface in wrong:
                    status, headers = answer(port, preface, path)
                    assert status in (None, 400) and not headers.get("x-upstream-status"), (port, framing, preface)
        # the probe a rollout runs proves the same, every port with its own load balancer's framing
        from tests.test_nginx_wire import run_check

        assert [c.name for c in checks(s) if c.judge(run_check(c, BIND), s, tree.digest)] == []
        assert {c.port for c in checks(s)} == served_ports(s) - {b.ports.health for b in s.balancers}
    finally:
        nginx.stop()


# --- what the readiness record and fab status make of the ports of both ------------------------

def test_the_record_of_both_load_balancers_names_both_and_older_records_stay_as_they_were():
    from core import record as records
    from remote.readiness import build_for

    s = both(moving(MOVES["classic on -> network"], list(range(20001, 20011))))
    source, target = s.balancers
    served_by = {"i-00000000000000001": "a" * 64}
    rec = build_for(s, served_by)
    assert (rec.load_balancer, rec.load_balancers) == ("wsgate-lab", ["wsgate-lab", "wsgate-lab-new"])
    assert rec.proxy_protocol_ports == sorted([*source.proxy_ports, *target.proxy_ports])
    assert rec.plain_ports == sorted([target.ports.http, target.ports.tls])
    assert rec.foreign("lab", "wsgate-lab-new") is None and rec.foreign("lab", "wsgate-lab") is None
    assert rec.foreign("lab", "wsgate-lab-other") == "record is for load balancer 'wsgate-lab' and 'wsgate-lab-new'"
    # both ways on the wire: one parameter, and a manifest with its shards
    assert records.decode(records.encode(rec, "/p/r"), "/p/r")[0] == rec
    many = {f"i-{i:017x}": f"{i % 7:064x}" for i in range(1, 600)}
    big = build_for(s, many)
    params = records.encode(big, "/p/r")
    assert len(params) > 1 and records.decode(params, "/p/r")[0] == big
    # without a move: the wire form older kits read (no key they would refuse)
    alone = source.serving([source])
    old = build_for(alone, served_by)
    assert old.load_balancers is None and "loadBalancers" not in old.to_json()
    assert old.to_json() == records.build("lab", alone.proxy_ports, served_by, now=old.written_at,
                                          load_balancer="wsgate-lab").to_json()


def test_fab_status_judges_each_port_by_the_load_balancer_that_uses_it():
    from core.doctor import PLAIN, PROXY, HostFacts, balancer_of, host_problems, probed_ports

    s = both(moving(MOVES["classic on -> network"], list(range(20001, 20011))))
    source, target = s.balancers
    assert set(probed_ports(s)) == {source.ports.http, source.ports.tls, target.ports.http, target.ports.tls,
                                    target.ports.proxy_http, target.ports.proxy_tls}
    assert balancer_of(s, target.ports.proxy_tls) is target and balancer_of(s, source.ports.tls) is source
    good = {source.ports.http: PROXY, source.ports.tls: PROXY, target.ports.http: PLAIN, target.ports.tls: PLAIN,
            target.ports.proxy_http: PROXY, target.ports.proxy_tls: PROXY}
    facts = HostFacts("h1", "i-00000000000000001", "d" * 64, nginx="ours", current="releases/" + "d" * 64,
                      live="d" * 64, ports=good)
    assert host_problems(s, facts, [source.ports.http, source.ports.tls], {"wsgate-lab-new": []}) == []
    facts.ports = {**good, target.ports.tls: PROXY}  # the network load balancer's plain port reads the header
    problems = host_problems(s, facts, [source.ports.http, source.ports.tls], {"wsgate-lab-new": []})
    assert len(problems) == 1 and problems[0].startswith(f"port {target.ports.tls} reads the PROXY header")
