"""Real backend hosts on loopback: per host an sshd and (once rolled out) an nginx, each on its
own address 127.0.N.i, with its own host key, known_hosts entry and nginx root, in a temp dir.
Writes a `Pulumi.<env>.yaml` that points the kit at them.
"""

from __future__ import annotations

import getpass
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab.hosts import SshHost, keygen
from tests.support.nginx import Nginx
from tests.support.procs import free_ports


def host_address(net: int, i: int) -> str:
    """Host i (from 1) of fleet network `net`: 127.0.net.i, past 254 hosts on the next /24s (big benchmark fleets)."""
    return f"127.0.{net + (i - 1) // 254}.{(i - 1) % 254 + 1}"


@dataclass
class FleetHost(SshHost):
    instance_id: str = ""

    @property
    def root(self) -> Path:
        return self.dir / "nginx"

    @property
    def nginx(self) -> Nginx:
        return Nginx(self.root)

    def live_link(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link) if link.is_symlink() else None


class Fleet:
    def __init__(self, directory: Path, count: int, net: int, app: tuple[str, int], aws_url: str,
                 env: str = "fleet", proxy_protocol: bool = True):
        self.dir, self.env, self.aws_url = directory, env, aws_url
        (self.dir / "client").mkdir(parents=True, exist_ok=True)
        self.key = self.dir / "client" / "id_ed25519"
        client_pub = keygen(self.key)
        self.known_hosts = self.dir / "client" / "known_hosts"
        self.hosts: list[FleetHost] = []
        lines = []
        # Every port distinct and free on every host address: nginx and sshd share them.
        ports = free_ports(3 + count, [host_address(net, i) for i in range(1, count + 1)])
        for i in range(1, count + 1):
            address = host_address(net, i)
            host = FleetHost(f"h{i}", address, ports[i + 2], self.dir / f"h{i}", f"i-{i:017x}")
            lines.append(host.prepare(client_pub))
            self.hosts.append(host)
        self.known_hosts.write_text("\n".join(lines) + "\n")
        self.ports = dict(zip(("http", "tls", "health"), ports, strict=False))
        self.config = {
            "aws:region": "us-east-1",
            "aws:endpoints": [{s: aws_url for s in ("ec2", "elb", "ssm", "sts")}],
            "wsgate:serverName": "ws.fleet.test",
            "wsgate:proxyProtocol": proxy_protocol,
            "wsgate:ports": self.ports,
            "wsgate:loadBalancer": {
                "name": f"wsgate-{env}", "certificateArn": "arn:aws:iam::123456789012:server-certificate/fleet",
                "availabilityZones": ["us-east-1a"], "subnetCidrs": ["127.0.0.1/32"], "idleTimeout": 60,
                "instances": [h.instance_id for h in self.hosts], "applier": "lab.applier:LabApplier",
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
            h.start()
        return self

    def stop(self) -> None:
        for h in self.hosts:
            h.nginx.stop()
            h.stop()
