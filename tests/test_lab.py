"""End to end: the lab flow on one machine, asserted (real sshd, nginx, HAProxy, moto).

Each test builds a lab of its own (own addresses, ports, directory) with the real `lab` code
and drives it with the real `fab` commands.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time

import pytest

from core.settings import load
from lab.__main__ import Lab
from lab.client import dial, ws_hello
from remote import aws as remote_aws
from tests.conftest import REPO
from tests.support.labenv import lab_env
from tests.support.load import Load

pytestmark = pytest.mark.integration
_nets = itertools.count(60)
ELB_LOG = re.compile(r'^127\.0\.0\.77 - - \[[^\]]+\] "GET /ws HTTP/1\.1" 101 \d+ "-" "[^"]*"$')


@pytest.fixture
def lab(tmp_path):
    env_file, listen = lab_env(tmp_path / "lab", next(_nets))
    the_lab = Lab(str(env_file), tmp_path / "lab", listen)
    the_lab.up(rollout=False)
    yield the_lab
    the_lab.down()


def fab(lab, *args):
    return subprocess.run([sys.executable, "-m", "fabric", args[0], "--env", lab.env, *args[1:]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def client_ip_via_ssl_listener(lab) -> str:
    hello, echo = ws_hello(dial("127.0.0.1", lab.listen[443], source="127.0.0.77"), lab.settings.server_name,
                           tls=lab.tls_context())
    assert echo == "ping-echo"
    return hello["client_ip"]


def proxy_ports(lab):
    return remote_aws.proxy_protocol_ports(lab.settings)


def test_the_whole_flow(lab):
    s = lab.settings
    # Before: policy off, no header, traffic works; the app sees the load balancer's address.
    assert proxy_ports(lab) == []
    assert client_ip_via_ssl_listener(lab) == "127.0.0.1"
    assert remote_aws.read_record(s) is None

    result = fab(lab, "rollout", "--apply")
    assert result.returncode == 0, result.stdout + result.stderr

    record = remote_aws.read_record(s)
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
    assert remote_aws.read_record(lab.settings) is None
    assert client_ip_via_ssl_listener(lab) == "127.0.0.1"


def test_an_open_websocket_survives_a_config_rollout(lab):
    import asyncio

    from websockets.asyncio.client import connect

    assert fab(lab, "rollout", "--apply").returncode == 0
    lab.wait_for_header(True)
    s = lab.settings

    def open_socket():
        sock = dial("127.0.0.1", lab.listen[443], source="127.0.0.77")
        sock.setblocking(False)
        return sock

    async def scenario():
        async with connect(f"wss://{s.server_name}/ws", sock=open_socket(), ssl=lab.tls_context()) as ws:
            await ws.recv()
            old_digest = ws.response.headers["X-Config-Digest"]
            lab.env_file.write_text(lab.env_file.read_text().replace("workerShutdownTimeout: 30",
                                                                     "workerShutdownTimeout: 31"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fabric", "rollout", "--env", lab.env, cwd=REPO,
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
    load.mark("rollout + apply (fab)")
    result = fab(lab, "rollout", "--apply")
    load.mark("until the stand-in sends")
    lab.wait_for_header(True)
    load.mark("after")
    time.sleep(2)
    load.stop()
    table = load.table()
    with capsys.disabled():
        print("\ncutover under load (requests through the stand-in's SSL listener):\n" + table)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed["before"] == 0 and load.ok["before"] > 0
    assert load.failed["after"] == 0 and load.ok["after"] > 0
    assert set(load.client_ips["before"]) == {"127.0.0.1"}
    assert set(load.client_ips["after"]) == {"127.0.0.77"}
