"""The SSH edge against real sshd: ~/.ssh/config honoured, bastions, sudo, bounded waits, a
known_hosts of thousands of lines, bad input refused before any host changes, and a restore
through a bastion whose connection was cut."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from core.knownhosts import hash_name
from core.settings import load
from remote.ssh import Ssh, SshError
from tests.support.faults import hanging_nginx
from tests.test_faults import assert_back, link, once_swapped, two_releases
from tests.test_rollout import driver, fab
from tests.test_ssh_input import public_line

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


def test_aes_gcm_is_preferred_and_a_server_without_it_still_connects(fleet):
    """AES-GCM first (no MAC checked byte by byte in Python per packet), but a hardened sshd that
    offers only CTR ciphers is still reached, with the same strict host key."""
    h1, h2 = fleet.hosts
    h2.stop()
    with (h2.dir / "sshd_config").open("a") as f:
        f.write("Ciphers aes256-ctr\n")
    h2.start()
    s = load(str(fleet.env_file))
    ssh = Ssh(s)
    try:
        for host, cipher in ((s.hosts[0], "aes128-gcm@openssh.com"), (s.hosts[1], "aes256-ctr")):
            conn = ssh.connect(host)
            assert conn.transport.remote_cipher == cipher
            assert ssh.run(conn, "echo reached").stdout.strip() == "reached"
            conn.close()
    finally:
        ssh.close()


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


# --- a known_hosts of fleet size ----------------------------------------------------------------

def big_known_hosts(own: list[str], count: int = 5000) -> str:
    """`count` unrelated lines (hashed and plain, a few real ed25519 and rsa keys reused under many
    names, as a long-lived known_hosts has) with the fleet's own lines spread among them."""
    rng = random.Random(7)
    keys = [public_line("ed25519") for _ in range(3)] + [public_line("rsa")]
    lines = []
    for i in range(count):
        name = rng.choice([f"host-{i}.example", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                           f"[10.8.{i // 256 % 256}.{i % 256}]:{1024 + i}"])
        lines.append(f"{hash_name(name, os.urandom(20)) if i % 2 else name} {rng.choice(keys)}")
    for n, line in enumerate(own):
        lines.insert((n + 1) * count // (len(own) + 1), line)
    return "\n".join(lines) + "\n"


def test_a_known_hosts_of_5000_unrelated_lines_still_connects_strictly_building_only_the_fleets_keys(fleet):
    h1, h2 = fleet.hosts
    own = fleet.known_hosts.read_text().splitlines()
    host, _, key = own[1].partition(" ")  # h2's, hashed as `ssh-keygen -H` writes it
    own[1] = f"{hash_name(host, os.urandom(20))} {key}"
    # the same address on another port, with another key: never offered for the fleet's port
    fleet.known_hosts.write_text(big_known_hosts(own + [f"[{h1.address}]:1 {public_line()}"]))
    s = load(str(fleet.env_file))
    ssh = Ssh.for_run(s, s.hosts)
    for h in s.hosts:
        conn = ssh.connect(h)
        assert ssh.run(conn, "echo strict").stdout.strip() == "strict"
        conn.close()
    assert ssh.decoded == 2  # one key per host that connected; the 5,000 others stay text
    # and still strict: without h2's line, h2 is refused
    fleet.known_hosts.write_text(big_known_hosts(own[:1]))
    with pytest.raises(SshError, match=f"host key of {h2.address} is not in {fleet.known_hosts}"):
        Ssh.for_run(s, s.hosts).connect(s.hosts[1])


# --- bad input: a clear error naming file and line, before any host changes ---------------------

@pytest.mark.parametrize("bad", ["port", "known_hosts"])
def test_bad_ssh_input_stops_the_rollout_naming_the_file_before_any_host_changes(fleet, tmp_path, bad):
    if bad == "port":
        config = tmp_path / "ssh_config"
        config.write_text(f"Host {fleet.hosts[1].address}\n  User deploy\n  Port twenty-two\n")
        fleet.set("wsgate:ssh", {"configFile": str(config)})
        fleet.set("wsgate:hosts", [{k: v for k, v in h.items() if k != "sshPort"} if h["name"] == "h2" else h
                                   for h in fleet.config["wsgate:hosts"]])
        want = f"ssh config {config} line 3: Port twenty-two (for {fleet.hosts[1].address}) is not a number"
    else:
        fleet.set("wsgate:ssh", {"knownHosts": str(tmp_path)})
        want = f"known_hosts {tmp_path}: is a directory"
    result = fab(fleet, "rollout")
    assert result.returncode == 1
    assert want in result.stderr and "Traceback" not in result.stderr
    for h in fleet.hosts:
        assert link(h.root / "current") is None and not (h.root / ".rollout.lock").exists()


# --- a restore through a bastion whose connection was cut ---------------------------------------

class Cuttable:
    """A TCP relay in front of a bastion's sshd: `cut()` drops every connection through it, and the
    next `refuse` connections are closed on arrival (the bastion failing once more, as it comes back)."""

    def __init__(self, address: str, upstream: tuple[str, int]):
        self.upstream, self.refuse = upstream, 0
        self.listener = socket.create_server((address, 0))
        self.port = self.listener.getsockname()[1]
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.refuse:
                    self.refuse -= 1
                    client.close()
                    continue
                server = socket.create_connection(self.upstream)
                self.live += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, refuse: int = 1) -> None:
        with self.lock:
            self.refuse = refuse
            for s in self.live:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.live.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut(0)


def test_a_bastion_cut_mid_run_is_reconnected_for_the_restore_and_every_host_is_back(fleet, tmp_path):
    h1, h2 = fleet.hosts
    relay = Cuttable(h1.address, (h1.address, h1.ssh_port))
    try:
        bastion_key = fleet.known_hosts.read_text().splitlines()[0].partition(" ")[2]
        with fleet.known_hosts.open("a") as f:
            f.write(f"[{h1.address}]:{relay.port} {bastion_key}\n")
        # every host (the bastion too) is reached through the bastion
        fleet.set("wsgate:ssh", {"gateway": f"{h1.address}:{relay.port}"})
        fleet.set("wsgate:nginx", {"binary": str(hanging_nginx(tmp_path))})
        before = two_releases(fleet)
        (h2.root / "hang-reload").write_text("2")  # h2's answer is still to come when the cut comes
        verdict, outcomes = driver(fleet, once_swapped(h2, relay.cut))
        assert verdict.code == 1, {n: o.error for n, o in outcomes.items()}
        assert "connection lost" in outcomes["h2"].error
        for name in ("h1", "h2"):
            assert outcomes[name].restored and not outcomes[name].restore_failed, outcomes[name].error
        assert_back(fleet, before)
    finally:
        relay.close()
