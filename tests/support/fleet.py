"""Real backend hosts on loopback: per host an sshd and (once rolled out) an nginx, each on its
own address 127.0.N.i, with its own host key, known_hosts entry and nginx root, in a temp dir.
Writes a `Pulumi.<env>.yaml` that points the kit at them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.nginx import Nginx
from tests.support.procs import free_port, wait_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
Subsystem sftp internal-sftp
MaxStartups 200:30:400
MaxSessions 100
LogLevel ERROR
"""


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path`; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class FleetHost:
    name: str
    address: str
    ssh_port: int
    dir: Path
    instance_id: str
    proc: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        return self.dir / "nginx"

    @property
    def nginx(self) -> Nginx:
        return Nginx(self.root)

    def start_sshd(self) -> None:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=(self.dir / "sshd.log").open("ab"))
        wait_port(self.address, self.ssh_port)

    def stop_sshd(self) -> None:
        """Stop the listener and every session it forked (a host that drops off the network)."""
        if self.proc is None:
            return
        subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid)], check=False)
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def live_link(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link) if link.is_symlink() else None


class Fleet:
    def __init__(self, directory: Path, count: int, net: int, app: tuple[str, int], aws_url: str,
                 env: str = "fleet", proxy_protocol: bool = True):
        self.dir, self.env = directory, env
        (self.dir / "client").mkdir(parents=True, exist_ok=True)
        self.key = self.dir / "client" / "id_ed25519"
        client_pub = keygen(self.key)
        self.known_hosts = self.dir / "client" / "known_hosts"
        self.hosts: list[FleetHost] = []
        lines = []
        for i in range(1, count + 1):
            address = f"127.0.{net}.{i}"
            hdir = self.dir / f"h{i}"
            hdir.mkdir()
            host = FleetHost(f"h{i}", address, free_port(address), hdir, f"i-{i:017x}")
            pub = keygen(hdir / "ssh_host_ed25519_key")
            (hdir / "authorized_keys").write_text(client_pub + "\n")
            (hdir / "sshd_config").write_text(SSHD_CONFIG.format(port=host.ssh_port, address=address, dir=hdir))
            lines.append(f"[{address}]:{host.ssh_port} {' '.join(pub.split()[:2])}")
            self.hosts.append(host)
        self.known_hosts.write_text("\n".join(lines) + "\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        first = self.hosts[0].address
        self.ports = {"http": free_port(first), "tls": free_port(first), "health": free_port(first)}
        self.config = {
            "aws:region": "us-east-1",
            "aws:endpoints": [{s: aws_url for s in ("ec2", "elb", "ssm", "sts")}],
            "wsgate:serverName": "ws.fleet.test",
            "wsgate:proxyProtocol": proxy_protocol,
            "wsgate:ports": self.ports,
            "wsgate:loadBalancer": {
                "name": f"wsgate-{env}", "certificateArn": "arn:aws:iam::123456789012:server-certificate/fleet",
                "availabilityZones": ["us-east-1a"], "subnetCidrs": ["127.0.0.1/32"], "idleTimeout": 60,
                "instances": [h.instance_id for h in self.hosts],
            },
            "wsgate:app": {"upstreams": [f"{app[0]}:{app[1]}"]},
            "wsgate:nginx": {"root": "/nonexistent", "pidFile": "logs/nginx.pid", "logDir": "logs",
                             "tempDir": "tmp", "user": None, "workerProcesses": 1, "workerConnections": 256,
                             "workerShutdownTimeout": 5, "binary": shutil.which("nginx") or "/usr/sbin/nginx"},
            "wsgate:ssh": {"user": getpass.getuser(), "identityFile": str(self.key),
                           "knownHosts": str(self.known_hosts), "configFile": None,
                           "connectTimeout": 5, "commandTimeout": 30},
            "wsgate:hosts": [{"name": h.name, "address": h.address, "sshPort": h.ssh_port, "bind": h.address,
                              "root": str(h.root), "instanceId": h.instance_id} for h in self.hosts],
        }
        self.write()

    @property
    def env_file(self) -> Path:
        return self.dir / f"Pulumi.{self.env}.yaml"

    def write(self) -> Path:
        self.env_file.write_text(yaml.safe_dump({"config": self.config}, sort_keys=False))
        return self.env_file

    def set(self, key: str, value) -> None:
        """Change one key (merged into a mapping value) and rewrite the environment file."""
        if isinstance(value, dict) and isinstance(self.config.get(key), dict):
            self.config[key] = {**self.config[key], **value}
        else:
            self.config[key] = value
        self.write()

    def start(self) -> Fleet:
        for h in self.hosts:
            h.start_sshd()
        return self

    def stop(self) -> None:
        for h in self.hosts:
            h.nginx.stop()
            h.stop_sshd()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


