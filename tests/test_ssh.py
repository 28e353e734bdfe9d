"""The SSH edge against real sshd: ~/.ssh/config honoured, bastions, sudo, bounded waits."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from core.settings import load
from remote.ssh import Ssh, SshError

pytestmark = pytest.mark.integration
FLEET_SIZE = 2


def test_ssh_config_file_is_honoured(fleet, tmp_path):
    h1 = fleet.hosts[0]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host web-one\n  HostName {h1.address}\n  Port {h1.ssh_port}\n")
    fleet.set("wsgate:ssh", {"configFile": str(config)})
    fleet.set("wsgate:hosts", [{"name": "h1", "address": "web-one"}])
    s = load(str(fleet.env_file))
    ssh = Ssh(s)
    conn = ssh.connect(s.hosts[0])
    assert ssh.run(conn, "echo via-config").stdout.strip() == "via-config"
    conn.close()


def test_a_bastion_is_used_and_its_host_key_checked_too(fleet):
    h1, h2 = fleet.hosts
    fleet.set("wsgate:ssh", {"gateway": f"{h1.address}:{h1.ssh_port}"})
    s = load(str(fleet.env_file))
    ssh = Ssh(s)
    conn = ssh.connect(s.hosts[1])
    assert ssh.run(conn, "echo through-bastion").stdout.strip() == "through-bastion"
    conn.close()
    ssh.close()
    # The bastion's own key is checked strictly as well.
    lines = [ln for ln in fleet.known_hosts.read_text().splitlines() if not ln.startswith(f"[{h1.address}]")]
    fleet.known_hosts.write_text("\n".join(lines) + "\n")
    with pytest.raises(SshError, match="is not in"):
        Ssh(load(str(fleet.env_file))).connect(load(str(fleet.env_file)).hosts[1])


def test_sudo_wraps_every_remote_command(fleet):
    from core.session import Remote

    fleet.set("wsgate:ssh", {"sudo": True})
    s = load(str(fleet.env_file))
    remote = Remote.of(s, s.hosts[0])
    assert remote.inspect().startswith("sudo -n sh -c ")
    assert remote.session("run", ".stage").startswith("sudo -n sh -c ")
    ssh = Ssh(s)
    conn = ssh.connect(s.hosts[0])
    result = ssh.run(conn, remote.wrap("id -u"))
    assert result.ok and result.stdout.strip() == "0"
    conn.close()


def test_a_host_that_never_speaks_ssh_fails_within_the_connect_timeout(fleet):
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(mute.accept()), daemon=True).start()
    fleet.set("wsgate:ssh", {"connectTimeout": 2})
    fleet.set("wsgate:hosts", [{"name": "mute", "address": "127.0.0.1", "sshPort": mute.getsockname()[1]}])
    s = load(str(fleet.env_file))
    started = time.monotonic()
    with pytest.raises(SshError):
        Ssh(s).connect(s.hosts[0])
    assert time.monotonic() - started < 10
    mute.close()


def test_a_command_that_hangs_is_cut_at_the_command_timeout(fleet):
    fleet.set("wsgate:ssh", {"commandTimeout": 1})
    s = load(str(fleet.env_file))
    ssh = Ssh(s)
    conn = ssh.connect(s.hosts[0])
    with pytest.raises(SshError, match="timed out after 1s"):
        ssh.run(conn, "sleep 30")
    conn.close()


def ssh_config_with_proxyjump(fleet, tmp_path):
    """An ssh config whose ProxyJump sends h2 through h1 (Fabric would open that hop itself,
    accepting its key blindly)."""
    h1, h2 = fleet.hosts
    config = tmp_path / "ssh_config"
    config.write_text(f"Host jump\n  HostName {h1.address}\n  Port {h1.ssh_port}\n"
                      f"Host {h2.address}\n  ProxyJump jump\n")
    fleet.set("wsgate:ssh", {"configFile": str(config)})
    return load(str(fleet.env_file))


def test_a_proxyjump_bastion_from_ssh_config_is_checked_strictly(fleet, tmp_path):
    h1, h2 = fleet.hosts
    s = ssh_config_with_proxyjump(fleet, tmp_path)
    ssh = Ssh(s)
    conn = ssh.connect(s.hosts[1])
    assert ssh.run(conn, "echo via-proxyjump").stdout.strip() == "via-proxyjump"
    assert conn.transport.getpeername()[0] != h2.address  # the TCP connection is to the bastion, not h2
    conn.close()
    ssh.close()
    lines = [ln for ln in fleet.known_hosts.read_text().splitlines() if not ln.startswith(f"[{h1.address}]")]
    fleet.known_hosts.write_text("\n".join(lines) + "\n")
    with pytest.raises(SshError, match=f"host key of bastion jump is not in {fleet.known_hosts}"):
        Ssh(s).connect(s.hosts[1])


def test_a_failed_bastion_is_tried_once_for_every_host(fleet):
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(mute.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    fleet.set("wsgate:ssh", {"connectTimeout": 1, "gateway": f"127.0.0.1:{mute.getsockname()[1]}"})
    s = load(str(fleet.env_file))
    ssh = Ssh(s)
    for host in s.hosts:
        with pytest.raises(SshError, match="bastion 127.0.0.1"):
            ssh.connect(host)
    assert len(accepted) == 1
    mute.close()


def test_a_corrupt_known_hosts_line_is_named(fleet):
    lines = fleet.known_hosts.read_text().splitlines()
    lines.insert(1, "[127.0.0.1]:22 ssh-ed25519 not-base64-at-all!!")
    fleet.known_hosts.write_text("\n".join(lines) + "\n")
    s = load(str(fleet.env_file))
    with pytest.raises(SshError, match=f"known_hosts {fleet.known_hosts} line 2: "):
        Ssh(s).connect(s.hosts[0])


def test_a_missing_identity_file_says_so(fleet, tmp_path):
    fleet.set("wsgate:ssh", {"identityFile": str(tmp_path / "no-such-key")})
    s = load(str(fleet.env_file))
    with pytest.raises(SshError, match="identity file .*no-such-key does not exist"):
        Ssh(s).connect(s.hosts[0])
