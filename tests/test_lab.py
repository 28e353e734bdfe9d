"""End to end: the lab flow on one machine, asserted (real sshd, nginx, HAProxy, moto).

Each test builds a lab of its own (own addresses, ports, directory) with the real `lab` code
and drives it with the real `fab` commands: with a Classic ELB, and with a network load balancer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

import awsapi.classic
import awsapi.clients
import awsapi.network
import awsapi.parameters
import tests.test_program_network as program
from awsapi.balancer import header_ports
from core.listeners import PLAIN, PROXY, NetworkHealthCheck, network_listeners
from core.network import TargetGroupState
from core.settings import from_config, load
from lab.__main__ import Lab
from lab.applier import apply
from lab.client import dial
from lab.standin import LbState, Route, Server, config, elb_check, group_check
from tests.conftest import PROJECT_DIR, own_net, stack_config
from tests.support.labenv import lab_env
from tests.support.load import KINDS, Held, Load
from tests.support.procs import accepts

pytestmark = pytest.mark.integration  # labs run beside each other, each on a network of its own (own_net)
ELB_LOG = re.compile(r'^127\.0\.0\.77 - - \[[^\]]+\] "GET /ws HTTP/1\.1" 101 \d+ "-" "[^"]*" \d+ 127\.0\.0\.77$')


def _lab(tmp_path, kind: str):
    env_file, listen = lab_env(tmp_path / "lab", own_net())
    the_lab = Lab(str(env_file), tmp_path / "lab", listen, kind=kind)
    try:
        the_lab.up(rollout=False)
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def lab(tmp_path):
    yield from _lab(tmp_path, "classic")


@pytest.fixture
def network_lab(tmp_path):
    yield from _lab(tmp_path, "network")


def fab(lab, *args):
    return subprocess.run([sys.executable, "-m", "fabric", args[0], "--env", lab.env, *args[1:]],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)


def client_ip_via_ssl_listener(lab) -> str:
    hello, echo = lab.hello()
    assert echo == "ping-echo"
    return hello["client_ip"]


def proxy_ports(lab):
    return awsapi.classic.header_ports(lab.settings)


def test_the_whole_flow(lab):
    s = lab.settings
    # Before: policy off, no header, traffic works; the app sees the load balancer's address.
    assert proxy_ports(lab) == []
    assert client_ip_via_ssl_listener(lab) == "127.0.0.1"
    assert awsapi.parameters.read_record(s) is None

    result = fab(lab, "rollout", "--apply")
    assert result.returncode == 0, result.stdout + result.stderr

    record = awsapi.parameters.read_record(s)
    assert set(record.instances) == {h.instance_id for h in s.hosts}
    assert proxy_ports(lab) == sorted(s.ports.proxied)
    lab.wait_for_header(True)
    proof = lab.prove()
    assert proof["hello"]["client_ip"] == "127.0.0.77"
    assert proof["hello"]["x_forwarded_for"] == "127.0.0.77"
    assert proof["hello"]["x_forwarded_proto"] == "https"
    assert proof["redirect"] == (301, f"https://{s.server_name}/")
    logs = "".join((lab.dir / h.name / "nginx" / "logs" / f"{s.env}-app.access.log").read_text()
                   for h in s.hosts if (lab.dir / h.name / "nginx" / "logs" / f"{s.env}-app.access.log").exists())
    assert any(ELB_LOG.match(line) for line in logs.splitlines()), logs


def test_one_broken_host_keeps_the_policy_off_and_traffic_flowing(lab):
    broken = lab.dir / lab.settings.hosts[1].name / "nginx" / "logs" / "error.log"
    broken.unlink()
    broken.mkdir()  # this host's nginx cannot load any new config
    result = fab(lab, "rollout", "--apply")
    assert result.returncode == 1
    assert "failed at test" in result.stderr
    assert proxy_ports(lab) == []
    assert awsapi.parameters.read_record(lab.settings) is None
    assert client_ip_via_ssl_listener(lab) == "127.0.0.1"


def test_an_open_websocket_survives_a_config_rollout(lab):
    import asyncio

    from websockets.asyncio.client import connect

    assert fab(lab, "rollout", "--apply").returncode == 0
    lab.wait_for_header(True)
    s = lab.settings

    def open_socket():
        sock = dial(lab.service_address(), lab.listen[443], source="127.0.0.77")
        sock.setblocking(False)
        return sock

    async def scenario():
        async with connect(f"wss://{s.server_name}/ws", sock=open_socket(), ssl=lab.tls_context()) as ws:
            await ws.recv()
            old_digest = ws.response.headers["X-Config-Digest"]
            lab.env_file.write_text(lab.env_file.read_text().replace("workerShutdownTimeout: 30",
                                                                     "workerShutdownTimeout: 31"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fabric", "rollout", "--env", lab.env, cwd=PROJECT_DIR,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, (out + err).decode()
            await ws.send("still here")
            assert await asyncio.wait_for(ws.recv(), 5) == "still here"  # the old worker still serves it
        async with connect(f"wss://{s.server_name}/ws", sock=open_socket(), ssl=lab.tls_context()) as ws:
            await ws.recv()
            return old_digest, ws.response.headers["X-Config-Digest"]

    old_digest, new_digest = asyncio.run(scenario())
    assert new_digest != old_digest
    assert load(str(lab.env_file)).nginx.worker_shutdown_timeout == 31


def test_cutover_under_load(lab, capsys):
    """Plain fleet -> proxy protocol while a client keeps connecting; failures counted per phase."""
    load = Load(lab).start()
    time.sleep(2)
    held = Held(lab).open()
    load.mark("rollout + apply (fab)")
    result = fab(lab, "rollout", "--apply")
    load.mark("until the stand-in sends")
    lab.wait_for_header(True)
    load.mark("after")
    time.sleep(2)
    held.close()
    load.stop()
    table = load.table()
    made, failed = load.made(["rollout + apply (fab)", "until the stand-in sends", "after"])
    with capsys.disabled():
        print("\ncutover under load (requests through the stand-in's SSL listener):\n" + table +
              f"\non: {made} requests, {failed} failed; {len(held.dropped)} of {held.count} held WebSockets dropped "
              f"({held.echoes} echoes)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a Classic ELB turns the PROXY header on in place" in result.stderr  # what it costs, and the way out
    assert held.dropped == []
    assert load.failed["before"] == 0 and load.ok["before"] > 0
    assert load.failed["after"] == 0 and load.ok["after"] > 0
    assert set(load.client_ips["before"]) == {"127.0.0.1"}
    assert set(load.client_ips["after"]) == {"127.0.0.77"}


# --- a network load balancer ---------------------------------------------------------------------

# name, proxyProtocol, `fab rollout` arguments
STEPS = (("on", True, ["--apply"]), ("retire the plain groups", True, ["--apply"]),
         ("drop the plain ports", True, []), ("off", False, ["--apply"]), ("on again", True, ["--apply"]))


def serves(lab, port: int) -> list[bool]:
    """Per host: whether something accepts a TCP connection on `port` at its address."""
    return [accepts(h.bind, port) for h in lab.settings.hosts]


def set_proxy_protocol(lab, on: bool) -> None:
    text = lab.env_file.read_text()
    lab.env_file.write_text(re.sub(r"wsgate:proxyProtocol: \w+", f"wsgate:proxyProtocol: {str(on).lower()}", text))


def switched_long_ago(lab) -> None:
    """The listeners' switch times (their tag, the clock the retirement reads from AWS) moved a
    switchDrain and a second into the past: as if the time had passed."""
    from core.network import SWITCHED_TAG, stamp

    s = load(str(lab.env_file))
    elbv2 = awsapi.clients.client(s, "elbv2")
    (lb,) = elbv2.describe_load_balancers(Names=[s.load_balancer.name])["LoadBalancers"]
    arns = [x["ListenerArn"] for x in elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]]
    tagged = [d["ResourceArn"] for d in elbv2.describe_tags(ResourceArns=arns)["TagDescriptions"]
              if any(t["Key"] == SWITCHED_TAG for t in d["Tags"])]
    assert tagged, "no listener was switched"
    elbv2.add_tags(ResourceArns=tagged,
                   Tags=[{"Key": SWITCHED_TAG, "Value": stamp(time.time() - s.load_balancer.switch_drain - 1)}])


def listener_kinds(lab) -> dict[int, str]:
    """Listener port -> the kind of target group it forwards to now, as the ELBv2 API says."""
    state = awsapi.network.network_state(lab.settings)
    assert state is not None
    return {port: PROXY if all(g.proxy_protocol_v2 for g in groups) else PLAIN
            for port, groups in state.listeners.items()}


def http_logs(lab) -> list:
    s = lab.settings
    return [lab.dir / h.name / "nginx" / s.nginx.log_dir / f"{s.env}-http.access.log" for h in s.hosts]


def test_network_listener_switch_under_load(network_lab, capsys):
    """Plain fleet -> PROXY v2 -> plain groups retired -> plain ports dropped -> plain -> PROXY v2, each
    by `fab rollout` (with --apply but for the drop), while clients keep making HTTPS requests and
    WebSockets through the TLS listener and HTTP requests through the TCP one from 127.0.0.77, and
    WebSockets opened before each rollout echo all through it."""
    lab = network_lab
    s = lab.settings
    plain = (s.ports.http, s.ports.tls)
    assert s.load_balancer.type == "network" and lab.env_file.parent == lab.dir
    assert header_ports(s) == [] and listener_kinds(lab) == {80: PLAIN, 443: PLAIN}
    load = Load(lab, kinds=KINDS).start()
    time.sleep(1.5)
    figures, dropped = [], {}
    for step, on, args in STEPS:
        set_proxy_protocol(lab, on)
        held = Held(lab).open()
        phases = [f"{step}: {p}" for p in (f"fab rollout {' '.join(args)}".strip(), "until the stand-in follows",
                                             "after")]
        load.mark(phases[0])
        result = fab(lab, "rollout", *args)
        load.mark(phases[1])
        lab.wait_for_header(on)
        load.mark(phases[2])
        time.sleep(1.5)
        held.close()
        assert result.returncode == 0, result.stdout + result.stderr
        assert header_ports(s) == (sorted(s.proxy_ports) if on else [])
        assert listener_kinds(lab) == ({80: PROXY, 443: PROXY} if on else {80: PLAIN, 443: PLAIN})
        made, failed = load.made(phases)
        figures.append(f"{step}: {made} requests, {failed} failed; {len(held.dropped)} of {held.count} held "
                       f"WebSockets dropped ({held.echoes} echoes)")
        dropped[step] = held.dropped
        groups = registered(s)
        record = awsapi.parameters.read_record(s)
        if step == "on":  # the switching update keeps the plain groups
            assert all(port in groups for port in plain) and all(all(serves(lab, p)) for p in plain)
        elif step == "retire the plain groups":  # deregistered; the hosts still serve the ports
            assert not any(port in groups for port in plain) and all(all(serves(lab, p)) for p in plain)
        elif step == "drop the plain ports":
            assert not any(any(serves(lab, p)) for p in plain)
            assert record is not None and record.plain_ports == []
            assert "the hosts keep serving the ports they drop" not in result.stdout + result.stderr  # AWS drained
            status = fab(lab, "status")
            assert status.returncode == 0, status.stdout + status.stderr
            assert f"plain port(s) {min(plain)}, {max(plain)} retired" in status.stdout
        elif step == "off":
            assert "step 1 of 2: plain ports back" in result.stdout + result.stderr
            assert all(port in groups for port in plain) and all(all(serves(lab, p)) for p in plain)
            assert not any(any(serves(lab, p)) for p in s.proxy_ports) and record is None
    load.stop()
    load.read_logs(http_logs(lab))
    with capsys.disabled():
        print("\nnetwork load balancer, listener switches under load (HTTPS + WebSocket via TLS, HTTP via TCP):\n"
              + load.table() + "\n" + "\n".join(figures))
    assert sum(load.failed.values()) == 0, load.table()
    assert dropped == {step: [] for step, _, _ in STEPS}
    assert set(load.client_ips["before"]) == {"127.0.0.1"}
    for step, on, _ in STEPS:
        assert set(load.client_ips[f"{step}: after"]) == {"127.0.0.77" if on else "127.0.0.1"}, step
    cfg = lab.stand_in().cfg.read_text()
    assert cfg.count(" send-proxy-v2 check inter 1s fall 2 rise 2 check-send-proxy") == 2 * len(s.hosts)


def test_turning_off_in_two_steps_still_drains_before_the_hosts_drop_the_proxy_ports(network_lab):
    """`pulumi up` first (the listeners go back to plain), `fab rollout` later: the rollout that
    drops the proxy ports waits the drain although another run moved the listeners, and fails
    nothing on the way."""
    lab = network_lab
    set_proxy_protocol(lab, True)
    assert fab(lab, "rollout", "--apply").returncode == 0
    lab.wait_for_header(True)
    set_proxy_protocol(lab, False)
    apply(load(str(lab.env_file)))  # the `pulumi up` step, by the lab's applier, with the new settings
    lab.wait_for_header(False)
    traffic = Load(lab, kinds=KINDS).start()
    traffic.mark("fab rollout")
    result = fab(lab, "rollout")
    traffic.mark("after")
    time.sleep(1)
    traffic.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the hosts keep serving the ports they drop for 5s" in result.stdout + result.stderr
    assert sum(traffic.failed.values()) == 0, traffic.table()
    assert sum(traffic.ok.values()) > 0


def test_a_port_change_under_a_listener_is_refused_before_any_change(network_lab):
    """With the listeners on the proxy groups, moving ports.proxyTls would leave TLS:443 forwarding
    to a port no host serves until `pulumi up`: refused, every host as it was."""
    import yaml

    lab = network_lab
    set_proxy_protocol(lab, True)
    assert fab(lab, "rollout", "--apply").returncode == 0
    before = {h.name: awsapi.parameters.read_record(lab.settings) for h in lab.settings.hosts}
    doc = yaml.safe_load(lab.env_file.read_text())
    old = doc["config"]["wsgate:ports"]["proxyTls"]
    doc["config"]["wsgate:ports"]["proxyTls"] = old + 7
    lab.env_file.write_text(yaml.safe_dump(doc))
    result = fab(lab, "rollout")
    assert result.returncode == 1
    assert f"the load balancer's listeners forward to ports [{old}], which the new config no longer serves" in (
        result.stdout + result.stderr)
    assert "upload" not in result.stderr and "reload" not in result.stderr
    assert {h.name: awsapi.parameters.read_record(lab.settings) for h in lab.settings.hosts} == before
    lab.wait_for_header(True)
    hello, echo = lab.hello()
    assert echo == "ping-echo" and hello["client_ip"] == "127.0.0.77"  # still served, header and all


def test_the_stand_in_sends_and_checks_as_each_kind_of_load_balancer():
    """Pure: a Classic ELB's route (v1 on the policy's ports, HTTP check on the health port) and a
    network load balancer's (v2 exactly on a PROXY v2 group, whose every check carries the header,
    on the traffic port or, where it was overridden, on that port)."""
    classic = Route(443, True, 60, "port_81", (Server("i-1", "127.0.1.1", 81, "send-proxy"),),
                    elb_check("HTTP:8081/healthz"))
    assert "    server i-1 127.0.1.1:81 send-proxy check port 8081 inter 1s fall 2 rise 2" in \
        config(LbState((classic,)), PROJECT_DIR / "cert.pem").splitlines()
    tcp = NetworkHealthCheck("TCP", "traffic-port")
    http = NetworkHealthCheck("HTTP", "8081", "/healthz", "200")
    group = TargetGroupState("arn", "lb-proxy-83", 83, True, ("i-1",), tcp)
    route = Route(443, True, 350, group.name, (Server("i-1", "127.0.1.1", 83, "send-proxy-v2"),), group_check(group))
    lines = config(LbState((route,)), PROJECT_DIR / "cert.pem").splitlines()
    assert "    server i-1 127.0.1.1:83 send-proxy-v2 check inter 1s fall 2 rise 2 check-send-proxy" in lines
    assert "    option httpchk GET /healthz" not in lines and LbState((route,)).header is True
    overridden = group_check(TargetGroupState("arn", "lb-proxy-83", 83, True, ("i-1",), http))
    assert (overridden.path, overridden.port, overridden.send_proxy) == ("/healthz", 8081, True)  # fails, as on AWS
    plain = group_check(TargetGroupState("arn", "lb-plain-81", 81, False, ("i-1",), http))
    assert (plain.path, plain.port, plain.send_proxy) == ("/healthz", 8081, False)
    # one group behind both listeners (drift, not what the kit makes): still two distinct backends
    both = config(LbState((route, Route(80, False, 350, group.name, route.servers, route.check))),
                  PROJECT_DIR / "cert.pem")
    assert [ln for ln in both.splitlines() if ln.startswith("backend ")] == [
        "backend lb-proxy-83_via_443", "backend lb-proxy-83_via_80"]


# --- the lab's applier decides as the Pulumi program ----------------------------------------------

NEW = "i-0123456789abcdef9"
SCENARIOS = {  # what the load balancer does now, the record, the settings
    "plain, no record": ({80: PLAIN, 443: PLAIN}, None, {}, True, True),
    "plain, every instance proven": ({80: PLAIN, 443: PLAIN}, ([0, 1], None), {}, True, True),
    "plain, one port proven": ({80: PLAIN, 443: PLAIN}, ([0, 1], [83]), {}, True, True),
    "proxy, no record (sticky)": ({80: PROXY, 443: PROXY}, None, {}, True, True),
    "proxy, stale record (sticky)": ({80: PROXY, 443: PROXY}, ([0], None), {}, True, True),
    "cut short: one listener on proxy": ({80: PROXY, 443: PLAIN}, None, {}, True, True),
    "proxy groups without PROXY v2": ({80: PROXY, 443: PROXY}, None, {}, True, False),
    "turned off": ({80: PROXY, 443: PROXY}, ([0, 1], None), {}, False, True),
    "a new instance while on proxy": ({80: PROXY, 443: PROXY}, ([0, 1], None), {"new": True}, True, True),
    "a new instance while on plain": ({80: PLAIN, 443: PLAIN}, None, {"new": True}, True, True),
    "retired, still on": ({80: PROXY, 443: PROXY}, ([0, 1], None, []), {"retired": True}, True, True),
    "retired, turned off, plain proven": ({80: PROXY, 443: PROXY}, ([0, 1], None, [80, 81]), {"retired": True},
                                          False, True),
}
RETIRED = {"http-plain": [], "tls-plain": [], "http-proxy": program.INSTANCES, "tls-proxy": program.INSTANCES}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_lab_applier_decides_as_the_program(aws, monkeypatch, scenario):
    """From the same load balancer and record, the boto3 applier leaves each listener on the group the
    program declares, the same members in every group, and the same outputs."""
    forwarding, record, options, on, proxy_v2 = SCENARIOS[scenario]
    program.nlb_in_aws(aws.url, forwarding, proxy_v2=proxy_v2, registered=RETIRED if options.get("retired") else None)
    if record:
        program.write_record(aws.url, [program.INSTANCES[i] for i in record[0]], record[1], *record[2:])
    lb = {"instances": [*program.INSTANCES, NEW]} if options.get("new") else {}
    changes = {} if on else {"wsgate:proxyProtocol": "false"}
    mocks, exports, _ = program.run(aws.url, monkeypatch, lb=lb, **changes)
    config = {**stack_config("staging"), "aws:endpoints": program.endpoints(aws.url),
              "wsgate:loadBalancer": program.network_lb(**lb), "wsgate:proxyProtocol": on}
    program._live_placement(config, aws.url)  # the settings the program ran with: placed where the live one is
    s = from_config("staging", config, "Pulumi.staging.yaml")

    out = apply(s)

    assert applied_kinds(s) == {80: mocks.forwards_to(80), 443: mocks.forwards_to(443)}
    assert registered(s) == mocks.attached()
    keys = ("proxyProtocolGate", "proxyProtocolPorts", "notReady", "waiting", "gateMessage", "listenerTargets",
            "retiredPlainGroups")
    assert {k: out[k] for k in keys} == {k: exports[k] for k in keys}


def applied_kinds(s) -> dict[int, str]:
    """Listener port -> the kind of group (by its name) it forwards to in the lab endpoint."""
    state = awsapi.network.network_state(s)
    assert state is not None
    proxy_names = {x.proxy.name for x in network_listeners(s)}
    return {port: PROXY if [g.name for g in groups] and all(g.name in proxy_names for g in groups) else PLAIN
            for port, groups in state.listeners.items()}


def registered(s) -> dict[int, list[str]]:
    """Instance port -> the instances registered in the group of that port, in the lab endpoint."""
    elbv2 = awsapi.clients.client(s, "elbv2")
    out = {}
    for g in (g for x in network_listeners(s) for g in (x.plain, x.proxy)):
        arn = elbv2.describe_target_groups(Names=[g.name])["TargetGroups"][0]["TargetGroupArn"]
        ids = sorted(t["Target"]["Id"] for t in elbv2.describe_target_health(TargetGroupArn=arn)
                     ["TargetHealthDescriptions"])
        if ids:
            out[g.port] = ids
    return dict(sorted(out.items()))


def test_turning_off_after_the_plain_ports_were_dropped_when_aws_refuses_the_switch(network_lab):
    """The plain ports dropped, then proxy protocol off. Without --apply: refused, nothing changed.
    With --apply while AWS refuses ModifyListener: step 1 (the hosts serve the plain ports again,
    proven and recorded) holds, step 2 changes no host, the listeners stay on the proxy groups and
    the header is still read; once AWS accepts, the same command finishes the turn-off."""
    import yaml

    from tests.support.faults import AwsFaults

    lab = network_lab
    s = lab.settings
    plain = (s.ports.http, s.ports.tls)
    set_proxy_protocol(lab, True)
    switch = fab(lab, "rollout", "--apply")
    assert switch.returncode == 0, switch.stdout + switch.stderr
    switched_long_ago(lab)
    apply(load(str(lab.env_file)))  # a later `pulumi up` (the lab's applier): the plain groups retire
    drop = fab(lab, "rollout")
    assert drop.returncode == 0, drop.stdout + drop.stderr
    lab.wait_for_header(True)
    assert not any(any(serves(lab, p)) for p in plain)
    set_proxy_protocol(lab, False)
    refused = fab(lab, "rollout")
    assert refused.returncode == 1
    assert "no longer serve plain ports" in refused.stdout + refused.stderr
    assert not any(any(serves(lab, p)) for p in plain) and listener_kinds(lab) == {80: PROXY, 443: PROXY}

    doc = yaml.safe_load(lab.env_file.read_text())
    endpoints = doc["config"]["aws:endpoints"]
    proxy = AwsFaults(endpoints[0]["elbv2"])
    try:
        proxy.add("ModifyListener", "refuse")
        doc["config"]["aws:endpoints"] = [{k: (proxy.url if k == "elbv2" else v) for k, v in e.items()}
                                          for e in endpoints]
        lab.env_file.write_text(yaml.safe_dump(doc))
        result = fab(lab, "rollout", "--apply")
        out = result.stdout + result.stderr
        assert result.returncode == 3, out
        assert "step 1 of 2: plain ports back: every host ready" in out
        assert "stopping the PROXY header at the load balancer" in out and "no host was changed" in out
        assert listener_kinds(lab) == {80: PROXY, 443: PROXY}
        assert all(all(serves(lab, p)) for p in (*plain, *s.proxy_ports))  # both port sets
        record = awsapi.parameters.read_record(s)
        assert record is not None and record.plain_ports == sorted(plain)  # the proof step 1 wrote
        hello, echo = lab.hello()
        assert echo == "ping-echo" and hello["client_ip"] == "127.0.0.77"  # still the header, still read
        proxy.clear()
        again = fab(lab, "rollout", "--apply")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "step 1 of 2" not in again.stdout + again.stderr  # the plain groups hold targets again
        assert listener_kinds(lab) == {80: PLAIN, 443: PLAIN} and awsapi.parameters.read_record(s) is None
        assert all(all(serves(lab, p)) for p in plain) and not any(any(serves(lab, p)) for p in s.proxy_ports)
    finally:
        proxy.stop()
