"""`fab status` verdicts, pure: facts in, problems out."""

from __future__ import annotations

from core.doctor import BalancerFacts, HostFacts, Ingress, balancer_problems, exposure_problems, host_problems
from tests.conftest import settings_from


def test_a_listener_whose_instance_protocol_is_not_tcp_is_a_problem_except_where_the_endpoint_cannot_keep_it():
    s = settings_from("staging")
    lb = BalancerFacts(exists=True, listeners=[("SSL", 443, "SSL", 81)], registered=list(s.load_balancer.instances),
                       health={i: "InService" for i in s.load_balancer.instances})
    problems, notes, _ = balancer_problems(s, lb, None, None)
    assert any("listener SSL:443 -> SSL:81: the instance protocol must be TCP" in p for p in problems)
    lab = BalancerFacts(**{**lb.__dict__, "lab_endpoint": True})
    problems, notes, _ = balancer_problems(s, lab, None, None)
    assert not any("instance protocol" in p for p in problems)
    assert any("instance protocol not checked" in n for n in notes)


def test_a_foreign_nginx_and_an_unhealthy_instance_are_named():
    s = settings_from("staging")
    host = HostFacts("web-1", "i-0123456789abcdef0", "d" * 64, nginx="foreign", pid="42",
                     cmdline="nginx: master process /usr/sbin/nginx -g daemon on;")
    assert any("did not start (pid 42" in p for p in host_problems(s, host, []))
    instances = list(s.load_balancer.instances)
    lb = BalancerFacts(exists=True, registered=instances,
                       health={instances[0]: "OutOfService (Instance has failed at least the UnhealthyThreshold)"})
    problems, _, _ = balancer_problems(s, lb, None, None)
    assert any(p.startswith(f"{instances[0]} is OutOfService") for p in problems)


def test_rules_that_open_a_proxied_port_beyond_the_load_balancer_are_named():
    lb_sg = "sg-0000000000000000a"
    ingress = {"i-0123456789abcdef0": [
        Ingress("sg-1 (wsgate)", "tcp", 80, 81, lb_sg),  # the kit's own rule: from the load balancer
        Ingress("sg-2 (ssh)", "tcp", 22, 22, "0.0.0.0/0"),  # another port
        Ingress("sg-3 (dns)", "udp", 0, 65535, "0.0.0.0/0"),  # not TCP
        Ingress("sg-4 (wide)", "tcp", 0, 1000, "10.0.0.0/8"),
        Ingress("sg-5 (all)", "-1", None, None, "sg-0000000000000000b"),
    ]}
    problems = exposure_problems([80, 81], [lb_sg], ingress)
    assert problems == [
        "i-0123456789abcdef0: security group sg-4 (wide) opens port(s) 80, 81 to 10.0.0.0/8, beyond the load "
        "balancer: anyone there can forge a PROXY header (remove the rule; the kit's instance group admits the "
        "load balancer only)",
        "i-0123456789abcdef0: security group sg-5 (all) opens port(s) 80, 81 to sg-0000000000000000b, beyond the "
        "load balancer: anyone there can forge a PROXY header (remove the rule; the kit's instance group admits "
        "the load balancer only)",
    ]


def test_security_groups_of_real_instances_are_read_and_judged(aws):
    """The read `fab status` makes, against a loopback AWS endpoint holding a real instance."""
    import boto3

    import awsapi.ec2

    s = settings_from("staging", **{"aws:endpoints": [{x: aws.url for x in ("ec2", "elb", "ssm", "sts")}]})
    ec2 = boto3.client("ec2", region_name=s.aws.region, endpoint_url=aws.url)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    lb_sg, kit_sg, open_sg = (ec2.create_security_group(GroupName=n, Description=n, VpcId=vpc)["GroupId"]
                              for n in ("lb", "kit", "open"))
    ec2.authorize_security_group_ingress(GroupId=kit_sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 81, "UserIdGroupPairs": [{"GroupId": lb_sg}]}])
    ec2.authorize_security_group_ingress(GroupId=open_sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 81, "ToPort": 81, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet,
                                 SecurityGroupIds=[kit_sg, open_sg])["Instances"][0]["InstanceId"]
    ingress, unknown = awsapi.ec2.instance_ingress(s, [instance, "i-0000000000000dead"])
    assert unknown == ["i-0000000000000dead"]
    problems = exposure_problems([80, 81], [lb_sg], ingress)
    assert len(problems) == 1 and problems[0].startswith(
        f"{instance}: security group {open_sg} (open) opens port(s) 81 to 0.0.0.0/0, beyond the load balancer")
    lb = BalancerFacts(exists=True, registered=[instance], health={instance: "InService"}, security_groups=[lb_sg],
                       ingress=ingress, unknown=unknown)
    judged, _, _ = balancer_problems(s, lb, None, None)
    assert problems[0] in judged
    assert "i-0000000000000dead: EC2 does not know this instance (its security groups cannot be checked)" in judged


# --- a network load balancer's hosts: plain ports and proxy ports -----------------------------

def network(**changes):
    return settings_from("staging", load_balancer={"type": "network"}, **changes)


def ports(http="plain", tls="plain", proxy_http="proxy", proxy_tls="proxy") -> HostFacts:
    d = "d" * 64
    return HostFacts("web-1", "i-0123456789abcdef0", d, nginx="ours", live=d, current=f"releases/{d}",
                     ports={80: http, 81: tls, 82: proxy_http, 83: proxy_tls})


def test_network_hosts_that_serve_both_sets_agree_whatever_the_listeners_forward_to():
    for sent in ([], [82], [82, 83], None):
        assert host_problems(network(), ports(), sent) == [], sent


def test_a_proxy_port_that_does_not_read_the_header_while_its_listener_forwards_there_fails_every_request():
    problems = host_problems(network(), ports(proxy_tls="plain"), [82, 83])
    assert problems == ["port 83 does not read the PROXY header but the load balancer sends it: every request "
                        "through it fails (run `fab rollout` with proxyProtocol: true)"]
    closed = host_problems(network(proxy_protocol=False), ports(proxy_http="closed", proxy_tls="closed"), [82])
    assert closed == ["port 82 is not served but the load balancer sends it: every request through it fails "
                      "(run `fab rollout` with proxyProtocol: true)"]


def test_a_proxy_port_nothing_forwards_to_is_judged_by_the_settings():
    asked = host_problems(network(), ports(proxy_http="closed", proxy_tls="plain"), [])
    assert asked == [
        "port 82 is not served; the settings ask for the PROXY header there: run `fab rollout` (the gate keeps "
        "its listener on the plain target group until then)",
        "port 83 does not read the PROXY header; the settings ask for the PROXY header there: run `fab rollout` "
        "(the gate keeps its listener on the plain target group until then)",
    ]
    off = network(proxy_protocol=False)
    for mode in ("closed", "proxy", "plain"):  # off and not forwarded to: nothing reaches it
        assert host_problems(off, ports(proxy_http=mode, proxy_tls=mode), []) == [], mode
    assert host_problems(off, ports(proxy_http="closed", proxy_tls="closed"), None) == []


def test_a_plain_port_must_answer_plain_requests_always():
    on_plain = host_problems(network(), ports(http="proxy"), [83])  # the TCP:80 listener is on its plain group
    assert on_plain == ["port 80 reads the PROXY header but its plain target group sends none: every request "
                        "through it fails (run `fab rollout`)"]
    on_proxy = host_problems(network(), ports(http="proxy"), [82, 83])
    assert on_proxy == ["port 80 reads the PROXY header but its plain target group sends none (run `fab rollout`)"]
    assert host_problems(network(), ports(tls="neither", proxy_tls="neither"), [83]) == [
        "port 81 answers neither with nor without a PROXY header",
        "port 83 answers neither with nor without a PROXY header"]
    assert host_problems(network(proxy_protocol=False), ports(tls="closed", proxy_tls="closed"), []) == [
        "port 81 is not served: every request through it fails (run `fab rollout`)"]


def test_the_network_gate_is_compared_with_the_proxy_ports_the_listeners_forward_to():
    s = network()
    instances = list(s.load_balancer.instances)
    lb = BalancerFacts(exists=True, listeners=[("TCP", 80, "TCP", 80), ("TLS", 443, "TCP", 81)],
                       header_ports=[], registered=instances, health={i: "InService" for i in instances})
    problems, _, gate = balancer_problems(s, lb, None, None)
    assert gate["state"] == "closed"
    assert not any("the listeners send PROXY v2" in p for p in problems)  # closed: plain is what it wants
    stuck = BalancerFacts(**{**lb.__dict__, "header_ports": [83]})
    problems, _, gate = balancer_problems(s, stuck, None, None)
    assert gate["state"] == "sticky" and gate["ports"] == [83]
    assert not any("the listeners send PROXY v2" in p for p in problems)
    off = network(proxy_protocol=False)
    problems, _, _ = balancer_problems(off, stuck, None, None)
    assert "the listeners send PROXY v2 to ports [83], the gate wants none: run `pulumi up`" in problems
    # a proxy port the gate keeps that is no longer ports.proxyTls: its listener goes back to plain
    moved = network(ports={"proxyTls": 84})
    problems, _, gate = balancer_problems(moved, stuck, None, None)
    assert gate["ports"] == [83]
    assert "the listeners send PROXY v2 to ports [83], the gate wants none: run `pulumi up`" in problems


def test_status_says_a_listener_waits_for_its_proxy_groups_health_or_a_plain_group_for_its_switch_drain():
    """The gate open, AWS not saying the proxy groups healthy yet while the warm listeners have them
    checked: the next `pulumi up` would not switch either, so status says why it waits, not `run
    `pulumi up``; without a warm listener a `pulumi up` is what it takes. On proxy, switched seconds
    ago: the plain groups wait for switchDrain, and status says until when."""
    from core import record as records
    from core.listeners import PLAIN, PROXY

    s = network()
    instances = list(s.load_balancer.instances)
    record = records.build("staging", [82, 83], {i: "d" * 64 for i in instances}, load_balancer=s.load_balancer.name)
    state = network_state(s, {80: PLAIN, 443: PLAIN}, plain_targets=instances, proxy_healthy=False)
    lb = BalancerFacts(exists=True, listeners=[("TCP", 80, "TCP", 80), ("TLS", 443, "TCP", 81)],
                       header_ports=[], registered=instances, present=instances,
                       health={i: "InService" for i in instances}, network=state.now(s), warm=[80, 443])
    problems, notes, gate = balancer_problems(s, lb, record, None, 0.0)
    assert gate["state"] == "open" and gate["ports"] == [82, 83]
    assert not any("run `pulumi up`" in p for p in problems), problems
    assert sum("stays on its plain group until AWS says every target of its proxy group" in n for n in notes) == 2
    problems, _, _ = balancer_problems(s, BalancerFacts(**{**lb.__dict__, "warm": [80]}), record, None, 0.0)
    assert "the listeners send PROXY v2 to ports none, the gate wants [82, 83]: run `pulumi up`" in problems

    drain = s.load_balancer.switch_drain
    on = network_state(s, {80: PROXY, 443: PROXY}, plain_targets=instances, switched_at=1000.0)
    switched = BalancerFacts(**{**lb.__dict__, "header_ports": [82, 83], "network": on.now(s), "warm": []})
    problems, notes, _ = balancer_problems(s, switched, record, None, 1000.0 + drain - 1)
    assert not problems, problems
    (wait,) = [n for n in notes if "wsgate-staging-plain-80" in n]
    assert "kept (not retired) until 1970-01-01T00:" in wait and "loadBalancer.switchDrain" in wait
    _, notes, _ = balancer_problems(s, switched, record, None, 1000.0 + drain)
    assert not any("kept (not retired)" in n for n in notes)  # the next update retires them


def test_fab_status_reads_a_network_load_balancer_through_the_elbv2_api(aws):
    """The facts `fab status` gathers for a network load balancer (a loopback ELBv2 endpoint): each
    listener with the group it forwards to, the proxy ports among them, members and their health."""
    from core.listeners import PLAIN, PROXY
    from remote.status import _balancer
    from tests.test_program_network import INSTANCES, nlb_in_aws, settings_for

    s = settings_for(aws.url)
    assert _balancer(s) == BalancerFacts(exists=False)
    nlb_in_aws(aws.url, {80: PLAIN, 443: PROXY})
    lb = _balancer(s)
    assert lb.exists and lb.listeners == [("TCP", 80, "TCP", 80), ("TLS", 443, "TCP", 83)]
    assert lb.header_ports == [83] and lb.registered == INSTANCES
    assert lb.health == {i: "InService" for i in INSTANCES} and len(lb.security_groups) == 1
    assert [(g["listener"], g["port"], g["proxyProtocolV2"], g["targets"]) for g in lb.groups] == [
        (80, 80, False, {i: "healthy" for i in INSTANCES}), (443, 83, True, {i: "healthy" for i in INSTANCES})]
    # a host that serves the proxy app port plain while the TLS:443 listener forwards there
    assert host_problems(s, ports(proxy_tls="plain"), lb.header_ports) == [
        "port 83 does not read the PROXY header but the load balancer sends it: every request through it fails "
        "(run `fab rollout` with proxyProtocol: true)"]
    problems, _, gate = balancer_problems(s, lb, None, None)
    assert gate["state"] == "sticky"  # no record, and 83 gets the header now: kept
    assert not any("the listeners send PROXY v2" in p for p in problems)


def test_a_retired_plain_port_closed_is_no_problem_and_status_says_why():
    retired = network().retiring([80, 81])
    assert host_problems(retired, ports(http="closed", tls="closed"), [82, 83]) == []
    assert host_problems(retired, ports(), [82, 83]) == []  # not dropped yet: still fine
    assert host_problems(network(), ports(http="closed"), [82, 83])  # not retired: a problem


def group_state(name: str, port: int, v2: bool, targets=(), draining=(), healthy=True):
    from core.network import TargetGroupState

    return TargetGroupState(f"arn:{name}", name, port, v2, tuple(targets),
                            states={i: "healthy" if healthy else "initial" for i in targets}, draining=tuple(draining))


def network_state(s, forwards: dict[int, str], plain_targets=(), plain_draining=(), proxy_healthy=True,
                  switched_at: float | None = 0.0):
    """A network load balancer as network_state reads it: each listener on the group `forwards` names,
    one on its proxy group tagged as switched at `switched_at` (None: no tag)."""
    from core.listeners import PROXY, network_listeners
    from core.network import NetworkState

    members = ("i-0123456789abcdef0", "i-0123456789abcdef1")
    groups, listeners = {}, {}
    for x in network_listeners(s):
        groups[x.plain.name] = group_state(x.plain.name, x.plain.port, False, plain_targets, plain_draining)
        groups[x.proxy.name] = group_state(x.proxy.name, x.proxy.port, True, members, healthy=proxy_healthy)
        listeners[x.port] = (groups[x.group(forwards[x.port]).name],)
    switched = {port: switched_at for port, kind in forwards.items() if kind == PROXY and switched_at is not None}
    return NetworkState("arn:lb", listeners, groups=groups, switched=switched)


def test_a_plain_port_is_retired_only_once_aws_lists_no_target_in_its_group_not_even_a_draining_one():
    from core.listeners import PLAIN, PROXY

    s = network()
    on = {80: PROXY, 443: PROXY}
    assert network_state(s, on).retired(s) == [80, 81]
    assert network_state(s, on, plain_draining=["i-0123456789abcdef0"]).retired(s) == []  # within the delay
    assert network_state(s, on, plain_targets=["i-0123456789abcdef0"]).retired(s) == []  # still registered
    assert network_state(s, {80: PROXY, 443: PLAIN}).retired(s) == [80]  # a listener on its plain group keeps it
    assert network_state(s, {80: PLAIN, 443: PLAIN}).retired(s) == []
    missing = network_state(s, on)
    del missing.groups[next(n for n in missing.groups if n.endswith("plain-80"))]
    assert missing.retired(s) == [81]  # no plain group at all: not taken for a retired one


def test_the_program_retires_a_plain_group_an_update_after_the_switch_and_keeps_it_retired():
    from core.listeners import PLAIN, PROXY
    from core.network import network_members

    s = network()
    drain = s.load_balancer.switch_drain
    later = drain + 1.0  # the clock: switchDrain and a second after the switch (tagged at 0)
    join = ("i-0123456789abcdef0", "i-0123456789abcdef1")
    both = {80: PROXY, 443: PROXY}
    switching = network_state(s, {80: PLAIN, 443: PLAIN}, plain_targets=join).now(s)
    assert network_members(s, both, switching, join, later) == {k: join for k in (
        "http-plain", "http-proxy", "tls-plain", "tls-proxy")}
    settled = network_state(s, both, plain_targets=join).now(s)
    assert network_members(s, both, settled, join, later) == {
        "http-plain": (), "http-proxy": join, "tls-plain": (), "tls-proxy": join}
    # within switchDrain of the switch (by its tag), or with no tag at all: kept
    assert network_members(s, both, settled, join, drain - 1.0)["http-plain"] == join
    untagged = network_state(s, both, plain_targets=join, switched_at=None).now(s)
    assert network_members(s, both, untagged, join, later)["http-plain"] == join
    unhealthy = network_state(s, both, plain_targets=join, proxy_healthy=False).now(s)
    assert network_members(s, both, unhealthy, join, later)["http-plain"] == join  # the switch not in use yet
    retired = network_state(s, both, proxy_healthy=False, switched_at=None).now(s)
    assert network_members(s, both, retired, join, 0.0)["http-plain"] == ()  # a health flap does not re-register
    back = {80: PLAIN, 443: PLAIN}
    assert network_members(s, back, retired, join, later)["http-plain"] == join


def test_a_plain_port_not_served_while_turning_off_names_the_command_that_serves_it_again():
    off = network(proxy_protocol=False)
    (problem,) = host_problems(off, ports(http="closed"), [82, 83])  # listeners still on the proxy groups
    assert "`fab rollout --apply`: it serves the plain ports again" in problem


def test_a_plain_group_is_retired_only_behind_a_listener_on_its_proxy_group():
    from core.listeners import PLAIN, PROXY
    from core.network import back_refusal, network_forwarding

    s = network(proxy_protocol=False)
    missing = network_state(s, {80: PLAIN, 443: PLAIN})
    missing.listeners.clear()  # a first update cut short before the listeners
    now = missing.now(s)
    assert not any(x.plain_retired or x.plain_drained for x in now.values())
    assert back_refusal(s, network_forwarding((), s), now, None, ("i-0123456789abcdef0",)) is None
    on = network_state(s, {80: PROXY, 443: PROXY}).now(s)
    assert back_refusal(s, network_forwarding((), s), on, None, ("i-0123456789abcdef0",), "no record")


# --- the listeners the settings declare, and instances they do not name ------------------------

def _classic_lb(s, **changes) -> BalancerFacts:
    instances = list(s.load_balancer.instances)
    facts = {"exists": True, "listeners": [("TCP", 80, "TCP", s.ports.http), ("SSL", 443, "TCP", s.ports.tls)],
             "header_ports": [s.ports.http, s.ports.tls], "registered": instances,
             "health": {i: "InService" for i in instances}}
    return BalancerFacts(**{**facts, **changes})


def test_a_classic_listener_forwarding_to_a_port_the_hosts_do_not_serve_is_a_problem():
    s = settings_from("staging")
    assert not [p for p in balancer_problems(s, _classic_lb(s), None, None)[0] if "listener" in p]
    moved = _classic_lb(s, listeners=[("TCP", 80, "TCP", s.ports.http), ("SSL", 443, "TCP", 82)])
    problems, _, _ = balancer_problems(s, moved, None, None)
    assert (f"listener SSL:443 forwards to instance port 82, which the hosts do not serve (ports.tls is "
            f"{s.ports.tls}): every request through it fails; `pulumi up` recreates it on {s.ports.tls} (new "
            "connections refused in between, open WebSockets cut), or set ports.tls back to 82 and run "
            "`fab rollout`") in problems


def test_a_missing_listener_is_a_problem_and_the_443_one_names_the_certificate():
    s = settings_from("staging")
    problems, _, _ = balancer_problems(s, _classic_lb(s, listeners=[("TCP", 80, "TCP", s.ports.http)]), None, None)
    assert ("no listener on port 443: nothing reaches the hosts through it (a certificate AWS refused, not "
            "issued or in another region, leaves none: check loadBalancer.certificateArn); run `pulumi up`") in problems
    problems, _, _ = balancer_problems(network(), BalancerFacts(exists=True, listeners=[("TLS", 443, "TCP", 83)]),
                                       None, None)
    assert "no listener on port 80: nothing reaches the hosts through it; run `pulumi up`" in problems
    assert not any("no listener on port 443" in p for p in problems)


def test_an_instance_the_settings_do_not_name_is_a_problem():
    s = settings_from("staging")
    stranger = "i-00000000000000abc"
    lb = _classic_lb(s, registered=[*s.load_balancer.instances, stranger])
    problems, _, _ = balancer_problems(s, lb, None, None)
    assert [p for p in problems if p.startswith(stranger)] == [
        f"{stranger} is registered with the load balancer but loadBalancer.instances does not name it (an Auto "
        "Scaling group, the console?): no rollout reaches or proves it, yet it gets traffic and the PROXY header "
        f"on ports [{s.ports.http}, {s.ports.tls}]; add it to loadBalancer.instances (and the hosts) and run "
        "`fab rollout`, or deregister it"]
    in_a_group = BalancerFacts(exists=True, registered=[], present=[stranger])  # network: in a kit group
    assert any(p.startswith(f"{stranger} is registered") for p in balancer_problems(network(), in_a_group,
                                                                                     None, None)[0])


# --- what nginx logged: the script, run by sh here on logs as nginx writes them -----------------

def test_the_log_files_come_from_the_rendered_config():
    from core.doctor import log_files
    from core.render import render

    s = settings_from("staging", nginx={"logDir": "logs"})
    errors, accesses = log_files(render(s))
    assert errors == ["logs/error.log"]
    assert accesses == [f"logs/{s.env}-{kind}.access.log" for kind in ("app", "default", "http")]


def test_the_logged_script_counts_per_port_only_what_was_logged_since_current_changed(tmp_path):
    import os
    import subprocess
    import time

    from core.doctor import BAD, BROKEN, logged_script, parse_logged
    from core.render import render

    s = settings_from("staging", nginx={"logDir": "logs"})
    (tmp_path / "logs").mkdir()
    (tmp_path / "releases" / "d").mkdir(parents=True)
    os.symlink("releases/d", tmp_path / "current")
    live = int(time.time()) - 3600
    os.utime(tmp_path / "current", (live, live), follow_symlinks=False)

    def err(t):
        return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t))

    def acc(t):
        return time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(t))

    def broken(t, port):  # the bytes nginx got are quoted raw: the entry spans lines
        return (f'{err(t)} [error] 7#7: *1 broken header: "GET / HTTP/1.1\r\nHost: x\r\n\r\n" while reading '
                f"PROXY protocol, client: 10.0.0.9, server: 10.0.1.5:{port}\n")

    (tmp_path / "logs" / "error.log").write_text(
        "partial line cut by tail\n" + broken(live - 60, 80) + broken(live + 5, 80) + broken(live + 6, 80)
        + broken(live + 7, 81) + broken(live + 7, 81).replace("10.0.0.9", "10.0.1.5")  # the host's own probe
        + f"{err(live + 8)} [notice] 7#7: signal process started\n")
    (tmp_path / "logs" / f"{s.env}-default.access.log").write_text(
        f'- - - [{acc(live - 60)}] "PROXY TCP4 1.2.3.4 5.6.7.8 1 443" 400 157 "-" "-" 81 10.0.0.9\n'
        f'- - - [{acc(live + 9)}] "PROXY TCP4 1.2.3.4 5.6.7.8 1 443" 400 157 "-" "-" 81 10.0.0.9\n'
        f'- - - [{acc(live + 9)}] "PROXY TCP4 1.2.3.4 5.6.7.8 1 443" 400 157 "-" "-" 81 10.0.1.5\n'  # a probe
        f'- - - [{acc(live + 9)}] "GET / HTTP/1.1" 400 157 "-" "-"\n'  # written before the port was logged
        f'1.2.3.4 - - [{acc(live + 9)}] "GET / HTTP/1.1" 200 157 "-" "a 400 9 b" 81 10.0.0.9\n')
    script = logged_script(str(tmp_path), render(s), ["10.0.1.5", "127.0.0.1", "::1"])
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    counts, since, gaps = parse_logged(out.stdout)
    assert since == err(live) and gaps == []
    assert counts == {80: {BROKEN: 2, BAD: 0}, 81: {BROKEN: 1, BAD: 1}}


def test_logged_counts_on_a_port_the_load_balancer_uses_are_notes_with_what_to_do():
    from core.doctor import BAD, BROKEN, host_notes, parse_logged

    counts, since, gaps = parse_logged("since 2026/12/01 10:00:00\nbrokenHeader 80 3\nbadRequest 81 2\n"
                                       "brokenHeader 9000 4\npartial logs/error.log\nunreadable logs/x.log\n")
    host = HostFacts("web-1", None, "d" * 64, logged=counts, logged_since=since, logged_gaps=gaps)
    notes = host_notes(host, [80, 81])
    assert notes[0].startswith("port 80: nginx closed 3 connection(s) without a valid PROXY header since "
                               "2026/12/01 10:00:00 (`broken header` in its error log)")
    assert notes[1].startswith("port 81: nginx answered 2 request(s) with 400 since 2026/12/01 10:00:00: a PROXY "
                               "header on a port that does not read it")
    assert notes[2:] == ["logs: logs/error.log: only its last 8 MiB read",
                         "logs: logs/x.log: not readable by the SSH user (set ssh.sudo)"]
    assert not any("port 9000" in n for n in notes)  # no listener forwards there
    quiet = HostFacts("web-1", None, "d" * 64, logged={80: {BROKEN: 0, BAD: 0}}, logged_since=since)
    assert host_notes(quiet, [80, 81]) == []
