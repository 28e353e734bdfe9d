"""A lab environment file of its own for a test: the shipped lab with its own addresses,
ports and directory, so a test never meets a running `make lab`."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import yaml

from tests.conftest import stack_config
from tests.support.procs import free_ports


def lab_env(directory: Path, net: int) -> tuple[Path, dict[int, int]]:
    """Write `directory/Pulumi.labtest.yaml`; return it and the stand-in's listen ports."""
    config = copy.deepcopy(stack_config("lab"))
    # every TCP port on 127.0.0.1 from one call, so all distinct: two free_port() calls can return the
    # same port (nothing holds it until its process starts), and the stand-in then met the app there
    moto, listen_80, listen_443, app = free_ports(4, ["127.0.0.1"])
    config["aws:endpoints"] = [{s: f"http://127.0.0.1:{moto}"
                                for s in ("ec2", "elb", "elbv2", "ssm", "sts", "route53")}]
    # its own DNS server's port (UDP): never the running lab's
    listen = {80: listen_80, 443: listen_443}  # the stand-ins' listener ports
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        config["wsgate:dns"] = {**config["wsgate:dns"], "resolver": f"127.0.0.1:{udp.getsockname()[1]}",
                                "listenerPorts": listen}
    addresses = [f"127.0.{net}.{i}" for i in (1, 2, 3)]
    names = ("http", "tls", "health", "proxyHttp", "proxyTls")
    ports = free_ports(len(names) + 3, addresses)  # nginx's, then one sshd per host: all distinct
    config["wsgate:ports"] = dict(zip(names, ports, strict=False))
    config["wsgate:app"] = {"upstreams": [f"127.0.0.1:{app}"]}
    config["wsgate:loadBalancer"] = {**config["wsgate:loadBalancer"], "name": f"wsgate-labtest-{net}"}
    config["wsgate:nginx"] = {**config["wsgate:nginx"], "root": str(directory / "nginx")}
    config["wsgate:ssh"] = {**config["wsgate:ssh"], "identityFile": str(directory / "client" / "id_ed25519"),
                            "knownHosts": str(directory / "client" / "known_hosts")}
    for host, address, ssh_port in zip(config["wsgate:hosts"], addresses, ports[len(names):], strict=False):
        host.update(address=address, bind=address, sshPort=ssh_port,
                    root=str(directory / host["name"] / "nginx"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "Pulumi.labtest.yaml"
    path.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
    return path, listen
