"""The renderer: settings in, a tree and its digest out; the tree says what the design asks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import crossplane
import pytest

from core.render import DIGEST_FILE, render, render_hosts
from tests.conftest import PROJECT_DIR, settings_from


def parsed(tree, tmp_path):
    """Every directive of the tree, as crossplane sees it: [(file, directive, args, parents)]."""
    root = tree.write(tmp_path / "tree")
    payload = crossplane.parse(str(root / "nginx.conf"))
    assert payload["status"] == "ok", payload["errors"]
    out = []

    def walk(block, file, parents):
        for d in block:
            out.append((file, d["directive"], d["args"], parents))
            if "block" in d:
                walk(d["block"], file, parents + [(d["directive"], tuple(d["args"]))])

    for config in payload["config"]:
        walk(config["parsed"], config["file"], [])
    return out


def test_digest_is_stable_and_names_the_content():
    s = settings_from("staging")
    a, b = render(s), render(s)
    assert a.digest == b.digest and re.fullmatch(r"[0-9a-f]{64}", a.digest)
    assert a.digest in a.files[DIGEST_FILE]
    changed = render(settings_from("staging", nginx={"workerShutdownTimeout": 99}))
    assert changed.digest != a.digest


def test_lab_hosts_get_their_own_listen_address_and_staging_hosts_share_one_tree():
    lab = render_hosts(settings_from("lab"))
    assert len({t.digest for t in lab.values()}) == 3
    assert "listen 127.0.1.2:18081 proxy_protocol;" in lab["lab2"].files["http.d/20-app.conf"]
    staging = render_hosts(settings_from("staging"))
    assert len({t.digest for t in staging.values()}) == 1


@pytest.mark.parametrize("proxy_protocol", [True, False])
def test_every_socket_has_one_default_server_and_one_set_of_flags(tmp_path, proxy_protocol):
    s = settings_from("staging", proxy_protocol=proxy_protocol)
    directives = parsed(render(s), tmp_path)
    sockets = defaultdict(list)
    for args in (d[2] for d in directives if d[1] == "listen"):
        sockets[args[0]].append(set(args[1:]))
    assert set(sockets) == {"80", "81", "8081"}
    for port, flag_sets in sockets.items():
        assert sum("default_server" in f for f in flag_sets) == 1, port
        assert len({frozenset(f - {"default_server"}) for f in flag_sets}) == 1, port
        expect_pp = proxy_protocol and port != "8081"
        assert all(("proxy_protocol" in f) == expect_pp for f in flag_sets), port


def test_app_vhost_keeps_the_client_address_and_upgrades_websockets(tmp_path):
    s = settings_from("staging")
    directives = parsed(render(s), tmp_path)
    headers = {tuple(a) for _, n, a, _ in directives if n == "proxy_set_header"}
    assert ("X-Forwarded-For", "$remote_addr") in headers
    assert ("X-Real-IP", "$remote_addr") in headers
    assert ("X-Forwarded-Proto", "https") in headers
    assert ("Upgrade", "$http_upgrade") in headers
    assert ("Connection", "$connection_upgrade") in headers
    assert not any("$proxy_add_x_forwarded_for" in " ".join(a) for a in headers)
    values = {n: a for _, n, a, _ in directives}
    assert values["real_ip_header"] == ["proxy_protocol"]
    assert [a for _, n, a, _ in directives if n == "set_real_ip_from"] == [["198.51.100.0/26"], ["198.51.100.64/26"]]
    assert values["proxy_read_timeout"] == ["360s"] and values["proxy_send_timeout"] == ["360s"]
    assert values["proxy_http_version"] == ["1.1"]
    assert values["worker_shutdown_timeout"] == ["120s"]
    assert values["log_format"][0] == "elb_log" and values["log_format"][1].startswith("$proxy_protocol_addr - ")
    upstream = [a for _, n, a, p in directives if n == "server" and p[-1:] == [("upstream", ("app",))]]
    assert upstream == [["127.0.0.1:8000"]]


def test_redirect_vhost_sends_everything_to_https(tmp_path):
    directives = parsed(render(settings_from("staging")), tmp_path)
    returns = [a for _, n, a, _ in directives if n == "return"]
    assert ["301", "https://ws.staging.example.com$request_uri"] in returns


def test_access_logs_use_elb_log(tmp_path):
    directives = parsed(render(settings_from("staging")), tmp_path)
    logs = [a for _, n, a, _ in directives if n == "access_log" and a != ["off"]]
    assert logs and all(a[1] == "elb_log" for a in logs)


def test_without_proxy_protocol_nothing_reads_a_header(tmp_path):
    tree = render(settings_from("staging", proxy_protocol=False))
    text = "".join(tree.files.values())
    assert "proxy_protocol" not in text


def run_fab(*args, cwd=PROJECT_DIR):
    return subprocess.run([sys.executable, "-m", "fabric", *args], cwd=cwd, capture_output=True, text=True)


def test_fab_render_writes_the_tree_and_prints_the_digest(tmp_path):
    result = run_fab("render", "--env", "staging", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    digest = render(settings_from("staging")).digest
    assert f"web-1\t{digest}" in result.stdout
    assert (tmp_path / "out" / "nginx.conf").exists()
    assert digest in (tmp_path / "out" / DIGEST_FILE).read_text()


def test_fab_render_with_bad_settings_names_the_key_and_writes_nothing(tmp_path):
    env = tmp_path / "Pulumi.broken.yaml"
    env.write_text((PROJECT_DIR / "Pulumi.staging.yaml").read_text().replace(
        "wsgate:serverName: ws.staging.example.com", "wsgate:serverName: 'ws.example.com; }'"))
    result = run_fab("render", "--env", str(env), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "wsgate:serverName = 'ws.example.com; }': not a valid DNS name" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_fab_render_to_a_place_it_cannot_write_names_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_fab("render", "--env", "staging", "--out", str(tmp_path / "a-file" / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: --out {tmp_path / 'a-file' / 'out'}: cannot write the tree there: Not a directory" in result.stderr
    result = run_fab("render", "--env", "staging", "--out=")  # an empty variable: never "nowhere", silently
    assert result.returncode == 1 and "error: --out '': names no directory" in result.stderr


def test_fab_lists_the_tasks():
    result = run_fab("-l")
    assert result.returncode == 0 and "render" in result.stdout


@pytest.mark.parametrize("env", ["lab", "staging"])
def test_rendered_tree_is_clean_under_gixy(tmp_path, env):
    root = render(settings_from(env), settings_from(env).nginx.bind).write(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gixy", "-f", "json", "nginx.conf"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


# --- classic renders stay as they were; the network load balancer's hosts serve both sets ----

# The staging trees as every classic host serves them. A change here reloads every classic host
# at its next rollout: make it only on purpose.
CLASSIC_DIGESTS = {
    True: "70817f5caaa71b9165fd7e67e32004149131d4af26d8099871ce998caacf341e",
    False: "888bcab44527e4d6147538f58b3089bd878189b36cfdb4fed2c5a76756b0eebe",
}


def network(env: str = "staging", **changes):
    lb = {"type": "network"}
    if env == "lab":  # placed by subnets, in a VPC
        lb |= {"availabilityZones": [], "subnets": ["subnet-0123456789abcdef0"], "vpcId": "vpc-0123456789abcdef0"}
    return settings_from(env, load_balancer=lb, **changes)


@pytest.mark.parametrize("proxy_protocol", [True, False])
def test_classic_trees_keep_their_digests_and_never_mention_the_proxy_ports(proxy_protocol):
    assert render(settings_from("staging", proxy_protocol=proxy_protocol)).digest == CLASSIC_DIGESTS[proxy_protocol]
    lab = settings_from("lab", proxy_protocol=proxy_protocol)
    for tree in render_hosts(lab).values():
        text = "".join(tree.files.values())
        assert str(lab.ports.proxy_http) not in text and str(lab.ports.proxy_tls) not in text
        assert "target group" not in text and "PROXY v2" not in text


def sockets_of(directives) -> dict[str, list[set[str]]]:
    """listen address -> the flags of each server block on it."""
    out = defaultdict(list)
    for args in (d[2] for d in directives if d[1] == "listen"):
        out[args[0]].append(set(args[1:]))
    return out


def named_servers(tree, tmp_path) -> dict[str, set[str]]:
    """listen port -> what the named server (not the default one) on it does: `return`, `proxy_pass`."""
    payload = crossplane.parse(str(tree.write(tmp_path / "servers") / "nginx.conf"))
    out: dict[str, set[str]] = defaultdict(set)

    def inside(block):
        for d in block:
            yield d
            yield from inside(d.get("block", []))

    for config in payload["config"]:
        for server in (d for d in inside(config["parsed"]) if d["directive"] == "server" and "block" in d):
            found = list(inside(server["block"]))
            if any(d["directive"] == "server_name" and d["args"] != ["_"] for d in found):
                for listen in (d for d in server["block"] if d["directive"] == "listen"):
                    out[listen["args"][0]] |= {d["directive"] for d in found
                                               if d["directive"] in ("return", "proxy_pass")}
    return out


def test_network_hosts_serve_plain_ports_always_and_proxy_ports_beside_them(tmp_path):
    tree = render(network())
    directives = parsed(tree, tmp_path)
    sockets = sockets_of(directives)
    assert set(sockets) == {"80", "81", "82", "83", "8081"}
    for port, flag_sets in sockets.items():
        assert sum("default_server" in f for f in flag_sets) == 1, port
        assert all(("proxy_protocol" in f) == (port in ("82", "83")) for f in flag_sets), port
    servers = named_servers(tree, tmp_path)
    assert servers["80"] == servers["82"] == {"return"} and servers["81"] == servers["83"] == {"proxy_pass"}
    assert [a for _, n, a, _ in directives if n == "set_real_ip_from"] == [["198.51.100.0/26"], ["198.51.100.64/26"]]
    assert [a for _, n, a, _ in directives if n == "real_ip_header"] == [["proxy_protocol"]]


def test_network_hosts_without_proxy_protocol_serve_the_plain_ports_only(tmp_path):
    tree = render(network(proxy_protocol=False))
    assert set(sockets_of(parsed(tree, tmp_path))) == {"80", "81", "8081"}
    assert "proxy_protocol" not in "".join(tree.files.values())
    assert json.loads(tree.files["release.json"])["ports"] == {"http": 80, "tls": 81, "health": 8081}


def test_network_release_manifest_names_the_proxy_ports_and_the_tree_is_clean_under_gixy(tmp_path):
    tree = render(network())
    assert json.loads(tree.files["release.json"])["ports"] == {
        "http": 80, "tls": 81, "health": 8081, "proxyHttp": 82, "proxyTls": 83}
    root = tree.write(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gixy", "-f", "json", "nginx.conf"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


# --- plain ports the load balancer retired (core.network.NetworkState.retired) ----------------------

def test_a_retired_plain_port_is_neither_served_nor_probed_nor_claimed(tmp_path):
    from core.probe import checks, plain_proven, proven_ports
    from core.render import served_ports

    s = network().retiring([80])
    tree = render(s)
    assert set(sockets_of(parsed(tree, tmp_path))) == {"81", "82", "83", "8081"}
    assert json.loads(tree.files["release.json"])["ports"] == {
        "tls": 81, "health": 8081, "proxyHttp": 82, "proxyTls": 83}
    assert served_ports(s) == {81, 82, 83, 8081} and 80 not in {c.port for c in checks(s)}
    assert plain_proven(s) == [81] and proven_ports(s) == [82, 83]
    both = network().retiring([80, 81])
    assert plain_proven(both) == [] and set(sockets_of(parsed(render(both), tmp_path / "b"))) == {"82", "83", "8081"}
    assert render(network().retiring([])).digest == render(network()).digest


def test_only_a_network_load_balancer_with_proxy_protocol_on_retires_plain_ports():
    """Off, the plain ports are the only ones: never retired. Classic: they are the proxied ones."""
    for s in (network(proxy_protocol=False), settings_from("staging", proxy_protocol=True)):
        assert s.retiring([80, 81]).retired == frozenset() and render(s.retiring([80, 81])).digest == render(s).digest
    assert network().retiring([80, 81, 8081, 82]).retired == {80, 81}  # never the health or a proxy port
