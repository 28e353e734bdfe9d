"""`fab status` is a doctor: every row judged, exit 0 only when hosts, load balancer and gate
agree. Each check is tested with a fleet put into that state (real hosts, moto as AWS)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.test_rollout import fab

pytestmark = pytest.mark.integration
FLEET_SIZE = 2


def status(fleet) -> tuple[int, dict]:
    result = fab(fleet, "status", "--json")
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def problems(view: dict) -> list[str]:
    return [p for h in view["hosts"] for p in h["problems"]] + view["loadBalancer"]["problems"]


def test_a_fleet_that_agrees_with_its_load_balancer_is_ok(fleet):
    assert fab(fleet, "rollout", "--apply").returncode == 0
    code, view = status(fleet)
    assert code == 0 and view["ok"], problems(view)
    for row in view["hosts"]:
        assert row["live"] == row["rendered"] and row["current"] == f"releases/{row['rendered']}"
        assert set(row["ports"].values()) == {"proxy"} and row["nginx"] == "ours"
    assert view["gate"]["state"] == "open"
    # the lab's endpoint (moto) does not keep the SSL listener's instance protocol: said, not alarmed
    assert any("instance protocol not checked" in n for n in view["loadBalancer"]["notes"])
    human = fab(fleet, "status")
    assert human.returncode == 0 and "everything agrees" in human.stdout


def test_hosts_reading_the_header_while_the_load_balancer_does_not_send_it_is_named(fleet):
    fleet.set("wsgate:proxyProtocol", False)
    assert fab(fleet, "rollout", "--apply").returncode == 0  # the load balancer exists, no policy
    fleet.set("wsgate:proxyProtocol", True)
    assert fab(fleet, "rollout").returncode == 0  # hosts read the header; nobody ran pulumi up
    code, view = status(fleet)
    assert code == 1
    port = fleet.ports["http"]
    assert any(f"port {port} reads the PROXY header but the load balancer does not send it" in p
               for p in problems(view)), problems(view)
    assert any("the ProxyProtocol policy is on ports none, the gate wants" in p for p in problems(view)), problems(view)


def test_current_link_that_disagrees_with_what_runs_is_named(fleet):
    assert fab(fleet, "rollout", "--apply").returncode == 0
    h1 = fleet.hosts[0]
    (h1.root / "current").unlink()
    code, view = status(fleet)
    assert code == 1
    assert any("`current` names nothing but nginx runs" in p for p in view["hosts"][0]["problems"])
    assert view["hosts"][1]["problems"] == []


def test_a_held_lock_an_unreachable_host_and_an_unregistered_instance_are_named(fleet):
    assert fab(fleet, "rollout", "--apply").returncode == 0
    h1, h2 = fleet.hosts
    (h1.root / ".rollout.owner").write_text("20261127T000000-cafe\n")
    holder = subprocess.Popen(["flock", str(h1.root / ".rollout.lock"), "sleep", "30"], start_new_session=True)
    try:
        import time

        time.sleep(0.2)
        h2.stop()
        fleet.set("wsgate:loadBalancer", {"instances": [h1.instance_id, h2.instance_id, "i-0000000000000000a"]})
        code, view = status(fleet)
    finally:
        import os
        import signal

        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert code == 1
    assert "a run holds the rollout lock (20261127T000000-cafe)" in view["hosts"][0]["problems"]
    assert view["hosts"][1]["problems"][0].startswith("cannot inspect: ssh 127.0.")
    # a new instance waits to join until proven (safe scale-out); the registered ones keep the gate open
    assert any(p.startswith("i-0000000000000000a waits to join: not in the readiness record") for p in problems(view))
    assert view["gate"]["state"] == "open" and "i-0000000000000000a" in view["gate"]["waiting"]


@pytest.mark.parametrize("plain_file, plain_port", [("http.d/10-redirect.conf", "http"), ("http.d/20-app.conf", "tls")])
def test_a_host_reading_the_header_on_one_port_only_is_caught_by_probe_and_status(fleet, plain_file, plain_port):
    import shutil
    import time

    from core.settings import load
    from remote.probe import probe
    from remote.ssh import Ssh

    assert fab(fleet, "rollout", "--apply").returncode == 0
    h1 = fleet.hosts[0]
    conf = h1.root / "current" / plain_file
    conf.write_text(conf.read_text().replace(" proxy_protocol", ""))  # by hand: this port stops reading it
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    subprocess.run([nginx, "-p", f"{h1.root}/", "-c", f"{h1.root}/current/nginx.conf", "-s", "reload"], check=True)
    time.sleep(1.0)  # the old workers close their listeners
    port, other = fleet.ports[plain_port], fleet.ports["tls" if plain_port == "http" else "http"]

    code, view = status(fleet)
    assert code == 1
    assert view["hosts"][0]["ports"] == {str(port): "plain", str(other): "proxy"}
    assert any(f"port {port} does not read the PROXY header but the load balancer sends it" in p
               for p in view["hosts"][0]["problems"]), view["hosts"][0]["problems"]
    assert view["hosts"][1]["problems"] == []

    s = load(str(fleet.env_file))
    ssh = Ssh(s)
    conn = ssh.connect(s.hosts[0])
    try:
        found = probe(ssh, conn, s, h1.address, view["hosts"][0]["live"], timeout=1.0)
    finally:
        conn.close()
        ssh.close()
    assert any(p.startswith(f"port {port}: a request with a PROXY header") for p in found), found
    assert f"port {port}: a request without a PROXY header was answered" in " ".join(found), found
    assert not any(p.startswith(f"port {other}:") for p in found), found


def test_connections_closed_for_a_missing_header_are_counted_per_port_from_the_error_log(fleet):
    """Requests without the header reach a port that reads it: nginx closes them (`broken header`
    in its error log), and status counts them on that host and port, leaving out the kit's own probes."""
    import socket
    import time

    assert fab(fleet, "rollout", "--apply").returncode == 0
    code, view = status(fleet)
    assert code == 0, problems(view)
    assert all(n == {"brokenHeader": 0, "badRequest": 0} for h in view["hosts"] for n in h["logged"].values()), \
        view["hosts"]  # the rollout's and status's own probes (from the host itself) are not counted
    assert all(h["logged_since"] and not h["notes"] for h in view["hosts"])

    h1, port = fleet.hosts[0], fleet.ports["http"]
    elsewhere = h1.address.rsplit(".", 1)[0] + ".200"  # not the host itself: as the load balancer would be
    for _ in range(3):
        with socket.create_connection((h1.address, port), timeout=10, source_address=(elsewhere, 0)) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: ws.fleet.test\r\n\r\n")
            assert c.recv(100) == b""  # closed without an answer
    log = h1.root / "logs" / "error.log"
    deadline = time.monotonic() + 30
    while log.read_text().count("broken header") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)

    code, view = status(fleet)
    assert code == 0, problems(view)  # evidence is a note: a cutover's window leaves such lines too
    one, two = view["hosts"]
    assert one["logged"][str(port)] == {"brokenHeader": 3, "badRequest": 0}
    assert [n for n in one["notes"] if n.startswith(f"port {port}: nginx closed 3 connection(s) without a valid "
                                                     "PROXY header since ")]
    assert all(n["brokenHeader"] == 0 for n in two["logged"].values()) and not two["notes"]
    human = fab(fleet, "status")
    assert f"{port}: 3 broken, 0 x 400" in human.stdout


def test_status_with_aws_refusing_still_judges_every_host_and_names_each_read_it_lost(fleet):
    """AWS refuses every read (AccessDenied, as a missing IAM permission does): the view shows every
    host as it is, and says each AWS read it could not make, DNS and the move included (the move
    record's read was not caught: the whole status ended in one error line, no host shown)."""
    from tests.support.faults import AwsFaults

    assert fab(fleet, "rollout", "--apply").returncode == 0
    proxy = AwsFaults(fleet.config["aws:endpoints"][0]["elb"])
    try:
        for action in ("GetParameter", "GetParameters", "DescribeLoadBalancers", "ListResourceRecordSets"):
            proxy.add(action, "refuse")
        fleet.set("aws:endpoints", [{s: proxy.url for s in ("ec2", "elb", "ssm", "sts", "route53")}])
        fleet.set("wsgate:dns", {"zoneId": "ZWSGATEFLEET00000001", "name": "ws.fleet.test", "ttl": 2})
        code, view = status(fleet)
        human = fab(fleet, "status")
    finally:
        proxy.stop()
    assert code == 1 and not view["ok"]
    assert [h["live"] for h in view["hosts"]] == [h["rendered"] for h in view["hosts"]]  # the hosts, judged
    assert view["loadBalancer"]["problems"][0].startswith("cannot read the load balancer: elb describe-load-balancers")
    dns = view["dns"]["problems"]
    for lost in ("cannot read the move record: ssm get-parameter", "cannot read Route 53:",
                 f"cannot read load balancer {fleet.config['wsgate:loadBalancer']['name']}:"):
        assert any(p.startswith(lost) for p in dns), dns
    assert view["dns"]["balancers"][0]["exists"] is None and view["dns"]["next"] == "see the problem above"
    assert "not read, weight not read" in human.stdout and "Traceback" not in human.stderr
