"""The lab: the whole system on one machine. `python -m lab up|down|prove|follow`.

up:    backend hosts (sshd + nginx each, on 127.0.1.x), the lab AWS endpoint (moto, with the
       hosted zone of wsgate:dns), the demo app, the load balancer (Pulumi where the CLI exists,
       else the same calls with boto3), one HAProxy stand-in per load balancer following it (each
       on its own loopback address), the lab's DNS server answering the service name from the
       endpoint's Route 53 (lab/dns.py), then the real `fab rollout --env lab --apply`, and the
       proof: the service name resolved through that DNS server, a WebSocket through the SSL
       listener there from 127.0.0.77.
       `--lb network`: the same with a network load balancer (the environment is written into
       the lab directory, placed in the lab endpoint's VPC).
       The lab runs from a copy of the environment in the lab directory (<dir>/Pulumi.lab.yaml,
       or <dir>/Pulumi.lab-network.yaml): state.json's `env_file`. Its stand-ins and DNS server
       follow that file as it changes.
down:  stops everything `up` started (it is safe to run twice, and `up` runs it first).
plan-move --to classic-on|classic-off|network|classic:
       writes a move into the running lab's environment file (wsgate:moveTo: a new load balancer
       of that kind, a new name, service ports of its own) and prints the `fab move` command.
promote: once the move record says done, moveTo becomes loadBalancer (ports, proxyProtocol) in
       that file, and moveTo goes. A move in the lab:
         python -m lab plan-move --to network && .venv/bin/fab move --env <env_file> && python -m lab promote
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from core.errors import KitError
from core.listeners import HEALTH_PATH
from core.settings import Settings, from_config, load
from lab import dns as lab_dns
from lab import hosts as lab_hosts
from lab import tls
from lab.client import dial, http_get, ws_hello
from lab.standin import FIXED_ADDRESS, LISTEN, StandIn, StandIns, address_of, read_state, standin_dir, update_state

PROJECT_DIR = Path(__file__).resolve().parent.parent
CLIENT_SOURCE = "127.0.0.77"  # the lab client's address: never the stand-in's (127.0.0.1)
LAB_CLASSIC_ZONE = "Z35SXDOTRQ7X7K"  # AWS's us-east-1 Classic ELB zone: moto's Classic ELB reports none
MOVES = ("classic-on", "classic-off", "network", "classic")  # plan-move --to: the load balancer moved to


def say(text: str) -> None:
    print(f"lab: {text}", flush=True)


class Lab:
    def __init__(self, env: str = "lab", directory: Path | None = None, listen: dict[int, int] | None = None,
                 kind: str = "classic", dns_port: int | None = None):
        self.env = env  # a name (Pulumi.<env>.yaml here) or a path to an environment file
        self.settings: Settings = load(env, PROJECT_DIR)
        self.env_file = Path(env) if env.endswith((".yaml", ".yml")) else PROJECT_DIR / f"Pulumi.{env}.yaml"
        self.dir = Path(directory or Path(self.settings.ssh.known_hosts).parent.parent)
        self.listen = listen or LISTEN
        # the DNS server's UDP port: dns.resolver's (127.0.0.1:15353 in the shipped lab)
        resolver = self.settings.dns.resolver if self.settings.dns else None
        self.dns_port = dns_port or (int(resolver.rpartition(":")[2]) if resolver else lab_dns.DNS_PORT)
        self.kind = kind  # "classic", or "network": `up` writes the environment with a network load balancer
        self.base_env_file = self.env_file
        self.network_env_file = self.dir / f"Pulumi.{self.settings.env}-network.yaml"
        self.state_file = self.dir / "state.json"
        self.hosts = [lab_hosts.SshHost(h.name, h.address, h.ssh_port or 22, self.dir / h.name)
                      for h in self.settings.hosts]
        self._check_layout()

    def _check_layout(self) -> None:
        s = self.settings
        wrong = [f"ssh.knownHosts must be {self.dir}/client/known_hosts"] if \
            Path(s.ssh.known_hosts) != self.dir / "client" / "known_hosts" else []
        wrong += [f"ssh.identityFile must be {self.dir}/client/id_ed25519"] if \
            Path(s.ssh.identity_file or "") != self.dir / "client" / "id_ed25519" else []
        wrong += [f"hosts[{h.name}].root must be {self.dir}/{h.name}/nginx" for h in s.hosts
                  if Path(s.root_of(h)) != self.dir / h.name / "nginx"]
        if wrong:
            raise KitError(f"{self.env_file.name} does not describe a lab under {self.dir}: " + "; ".join(wrong))

    # -- processes ---------------------------------------------------------------------------

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self, **data) -> None:
        update_state(self.state_file, lambda state: state.update(data))

    def _spawn(self, name: str, argv: list[str]) -> int:
        """Start a lab process without waiting for it (its pid saved at once: `down` stops it
        whatever comes next)."""
        log = (self.dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        update_state(self.state_file, lambda state: state.setdefault("pids", {}).update({name: proc.pid}))
        return proc.pid

    def down(self) -> None:
        """Stop everything the lab started: the stand-in, nginx, sshd, the app, moto."""
        from core.session import Remote

        pids = self._state().get("pids", {})
        nginx_pids = []
        for host in self.settings.hosts:
            try:
                nginx_pids.append(int(Path(Remote.of(self.settings, host).pid_file).read_text()))
            except (FileNotFoundError, ValueError):
                pass
        every = [pids.get("dns"), pids.get("stand-in"), *nginx_pids, *(pids.get(f"sshd-{h.name}") for h in self.hosts),
                 pids.get("app"), pids.get("moto")]
        lab_hosts.terminate_all([pid for pid in every if pid])  # all at once: each ends in its own time
        for h in self.hosts:
            h.stop()  # and every session it forked
        if pids or nginx_pids:
            say("stopped")
        if self.state_file.exists():
            self._save(pids={}, endpoints={})

    # -- up ----------------------------------------------------------------------------------

    def up(self, rollout: bool = True) -> dict:
        self.down()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network_env_file.unlink(missing_ok=True)  # it names a VPC of an endpoint that is gone
        if self.classic_env_file != self.base_env_file:
            self.classic_env_file.unlink(missing_ok=True)  # the last lab's, moves and all
        for host in self.settings.hosts:  # the hosts start empty, as new instances (the last lab's kind may differ)
            shutil.rmtree(self.settings.root_of(host), ignore_errors=True)
        s = self.settings
        say(f"state in {self.dir}")
        # moto and the app start first and come up while the hosts and the certificate are made
        endpoint = urlparse(s.aws.endpoints["elb"])
        assert endpoint.hostname and endpoint.port  # the lab's settings name a loopback host:port
        zone = [f"--zone={self.zone_name}.={s.dns.zone_id}"] if s.dns else []
        self._spawn("moto", [sys.executable, "-m", "lab", "moto", "--host", endpoint.hostname,
                             "--port", str(endpoint.port), "--region", s.aws.region, *zone])
        app_host, _, app_port = s.app.upstreams[0].rpartition(":")
        self._spawn("app", [sys.executable, "-m", "lab.app", "--listen", s.app.upstreams[0]])
        client_pub = lab_hosts.keygen(self.dir / "client" / "id_ed25519")
        known = [h.prepare(client_pub) for h in self.hosts]
        (self.dir / "client" / "known_hosts").write_text("\n".join(known) + "\n")
        for h in self.hosts:
            self._save(pids={**self._state().get("pids", {}), f"sshd-{h.name}": h.start()})
        say(f"{len(self.hosts)} hosts: " + ", ".join(f"{h.name} ssh {h.address}:{h.ssh_port}" for h in self.hosts))
        tls.make(self.dir / "tls", s.server_name)
        lab_hosts.wait_port(app_host, int(app_port), timeout=30)
        say(f"demo WebSocket app on {s.app.upstreams[0]}")
        lab_hosts.wait_port(endpoint.hostname, endpoint.port, timeout=60)
        say(f"AWS endpoint (moto) on {endpoint.hostname}:{endpoint.port}")
        if s.dns:
            self._create_zone()
        if self.kind == "network":
            self._write_network_env()
        else:
            self._write_classic_env()
        s = self.settings

        self._bootstrap_plain()
        self.apply_load_balancer()
        self.ensure_dns_record()
        self._spawn("stand-in", [sys.executable, "-m", "lab", "follow", "--env", self.env, "--dir", str(self.dir),
                                 "--listen", json.dumps(self.listen)])
        if s.dns:  # started beside the stand-in: it answers once the stand-in's address is known
            self._spawn("dns", [sys.executable, "-m", "lab", "dns", "--env", self.env, "--dir", str(self.dir),
                                "--port", str(self.dns_port)])
        lab_hosts.wait_port(self.address(), self.listen[443], timeout=30)
        say(f"load balancer stand-in (HAProxy) of {s.load_balancer.name}: TCP {self.address()}:{self.listen[80]}, "
            f"{self.tls_word} {self.address()}:{self.listen[443]} (and on {FIXED_ADDRESS})")
        if s.dns:
            self._wait_dns()
            say(f"DNS server on {self.dns_server} (UDP): {s.dns.name} -> {self.resolve()[0]} "
                f"(ttl {s.dns.ttl}), from the endpoint's Route 53 zone {s.dns.zone_id}")
        self._save(endpoints=self.endpoints())
        if rollout:
            say(f"fab rollout --env {self.settings.env} --apply")
            result = subprocess.run([sys.executable, "-m", "fabric", "rollout", "--env", self.env, "--apply"],
                                    cwd=PROJECT_DIR)
            if result.returncode != 0:
                raise KitError("fab rollout failed (see above); the lab is left running for a look")
            self.wait_for_header(self.settings.proxy_protocol)
            self.prove()
        say(f"running; endpoints in {self.state_file}; stop with: make lab-down")
        return self.endpoints()

    @property
    def tls_word(self) -> str:
        """What the load balancer calls its listener that ends TLS."""
        return "TLS" if self.settings.load_balancer.type == "network" else "SSL"

    @property
    def classic_env_file(self) -> Path:
        """Where the classic lab's environment is: in the lab directory, as the environment names it."""
        return self.dir / f"Pulumi.{load(str(self.base_env_file)).env}.yaml"

    def _write_classic_env(self) -> None:
        """The environment the classic lab runs from: a copy of the one given in the lab directory
        (one given there already is used as it is), so that a move changes the lab's file, never
        the shipped one."""
        path = self.classic_env_file
        if path != self.base_env_file:
            write_atomically(path, f"# Written by `python -m lab up` from {self.base_env_file.name}: the lab runs "
                                   "from this copy (python -m lab plan-move and promote change it).\n"
                             + self.base_env_file.read_text())
        self.env, self.env_file, self.settings = str(path), path, load(str(path))
        say(f"environment: {path}")

    def _write_network_env(self) -> None:
        """The environment with a network load balancer, in the lab endpoint's VPC and subnet (whose
        IDs exist only once the endpoint runs), written beside the lab's state; the lab uses it."""
        from lab.applier import lab_network, network_config

        vpc, subnets = lab_network(self.settings)
        config = yaml.safe_load(self.base_env_file.read_text())["config"]
        path = self.network_env_file
        write_atomically(path, f"# Written by `python -m lab up --lb network` from {self.base_env_file.name}: the "
                               "lab with a network load balancer in the lab endpoint's VPC.\n"
                         + yaml.safe_dump({"config": network_config(config, vpc, subnets)}, sort_keys=False))
        self.env, self.env_file, self.settings = str(path), path, load(str(path))
        say(f"network load balancer environment: {path} (VPC {vpc}, subnets {', '.join(subnets)})")

    # -- moves -----------------------------------------------------------------------------------

    def use_running(self) -> None:
        """Act on the environment file the running lab follows (state.json `env_file`)."""
        named = self._state().get("endpoints", {}).get("env_file")
        if not named or not Path(named).exists():
            raise KitError(f"the lab is not running under {self.dir} (make lab): no env_file in {self.state_file}")
        self.env, self.env_file, self.settings = named, Path(named), load(named)

    def plan_move(self, to: str, proxy_protocol: bool | None = None) -> str:
        """Write a move to a new load balancer (kind `to`, one of MOVES) into the lab's environment
        file; return the `fab move` command that makes it."""
        s = self.settings
        if s.move_to is not None:
            raise KitError(f"{self.env_file} already moves to {s.move_to.load_balancer.name}: run "
                           f"{self.move_command()}, then python -m lab promote")
        config = yaml.safe_load(self.env_file.read_text())["config"]
        taken = {*self._state().get("addresses", {}), *s.balancer_names}
        name = next_name(s.load_balancer.name, taken)
        own = {s.ports.http, s.ports.tls, s.ports.health, s.ports.proxy_http, s.ports.proxy_tls}
        http, tls_port, proxy_http, proxy_tls = free_ports(4, [s.bind_of(h) or h.address for h in s.hosts], own)
        ports = {"http": http, "tls": tls_port, "health": s.ports.health, "proxyHttp": proxy_http,
                 "proxyTls": proxy_tls}
        network = None
        if to == "network":
            from lab.applier import lab_network

            network = lab_network(s)
        new = move_config(config, to, name, ports, network, proxy_protocol)
        from_config(s.env, new, self.env_file.name)  # valid, before the lab's processes see it
        write_atomically(self.env_file, f"# Written by `python -m lab plan-move --to {to}`: the lab's environment, "
                                        f"moving from {s.load_balancer.name} to {name}.\n"
                         + yaml.safe_dump({"config": new}, sort_keys=False))
        self.settings = load(self.env)
        target = self.settings.moving_to
        assert target is not None
        say(f"{self.env_file}: moveTo {name} ({target.load_balancer.type}, proxy protocol "
            f"{'on' if target.proxy_protocol else 'off'}, ports {', '.join(map(str, sorted(target.served())))}); "
            f"{s.load_balancer.name} serves now")
        return self.move_command()

    def move_command(self) -> str:
        """The command that makes the move the lab's environment file describes."""
        fab = Path(sys.executable).parent / "fab"
        shown = fab.relative_to(PROJECT_DIR) if fab.is_relative_to(PROJECT_DIR) else fab
        return f"{shown} move --env {self.env_file}"

    def promote(self, timeout: float = 30.0) -> None:
        """Once the move record says done: moveTo becomes loadBalancer (and its ports and
        proxyProtocol) in the lab's environment file, moveTo goes."""
        from awsapi.parameters import read_move

        s = self.settings
        if s.moving_to is None:
            raise KitError(f"{self.env_file} has no moveTo: nothing to promote")
        record = read_move(s)
        target = s.moving_to.load_balancer.name
        if record is None or record.target != target or not record.done:
            step = f"step {record.reached}" if record and record.target == target and record.reached else "no step"
            raise KitError(f"the move to {target} is not done ({step} reached): run {self.move_command()} first")
        # the old load balancer's stand-in stops once it is gone from the endpoint: only then may
        # the new one take 127.0.0.1 (the address of the environment's loadBalancer)
        deadline = time.monotonic() + timeout
        while s.load_balancer.name in self._state().get("endpoints", {}).get("balancers", {}):
            if time.monotonic() > deadline:
                raise KitError(f"the stand-in of {s.load_balancer.name} did not stop in {timeout} s")
            time.sleep(0.1)
        new = promoted_config(yaml.safe_load(self.env_file.read_text())["config"])
        from_config(s.env, new, self.env_file.name)
        write_atomically(self.env_file, f"# Written by `python -m lab promote`: the lab's environment, moved from "
                                        f"{s.load_balancer.name} to {target}.\n"
                         + yaml.safe_dump({"config": new}, sort_keys=False))
        self.settings = load(self.env)
        balancers = self._state().get("endpoints", {}).get("balancers", {})
        self._save(endpoints={**self.endpoints(), "balancers": balancers})
        say(f"{self.env_file}: loadBalancer is {target} ({self.settings.load_balancer.type}, proxy protocol "
            f"{'on' if self.settings.proxy_protocol else 'off'}); no moveTo")

    # -- DNS ---------------------------------------------------------------------------------

    @property
    def zone_name(self) -> str:
        """The lab's hosted zone: the service name's parent (ws.lab.test -> lab.test)."""
        assert self.settings.dns
        return self.settings.dns.name.rstrip(".").partition(".")[2]

    @property
    def dns_server(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    def _route53(self):
        return lab_dns.lab_client("route53", route53_endpoint(self.settings), self.settings.aws.region)

    def _create_zone(self) -> None:
        """The hosted zone of dns.zoneId in the lab endpoint (its ID is the one the environment names:
        the lab's moto is started with it)."""
        s = self.settings
        assert s.dns
        made = self._route53().create_hosted_zone(Name=f"{self.zone_name}.", CallerReference=f"wsgate-lab-{s.env}")
        made_id = made["HostedZone"]["Id"].removeprefix("/hostedzone/")
        if made_id != s.dns.zone_id:
            raise KitError(f"the lab endpoint made hosted zone {made_id} for {self.zone_name}, not dns.zoneId "
                           f"{s.dns.zone_id}")
        say(f"Route 53 hosted zone {self.zone_name} ({made_id}) in the lab endpoint")

    def ensure_dns_record(self) -> None:
        """The service name's weighted alias record to loadBalancer (weight 100), as the program
        declares it without a move, when no A record is there yet (an applier that writes none)."""
        s = self.settings
        if not s.dns:
            return
        api = self._route53()
        name = s.dns.name.rstrip(".") + "."
        found = [r for r in api.list_resource_record_sets(HostedZoneId=s.dns.zone_id, StartRecordName=name,
                                                          StartRecordType="A", MaxItems="10")["ResourceRecordSets"]
                 if r["Name"].lower() == name.lower() and r["Type"] == "A"]
        if found:
            return
        dns_name, zone = lb_dns_name(s)
        api.change_resource_record_sets(HostedZoneId=s.dns.zone_id, ChangeBatch={"Changes": [{
            "Action": "UPSERT", "ResourceRecordSet": {
                "Name": name, "Type": "A", "SetIdentifier": f"wsgate:{s.env}:{s.load_balancer.name}", "Weight": 100,
                "AliasTarget": {"HostedZoneId": zone, "DNSName": dns_name, "EvaluateTargetHealth": True}}}]})
        say(f"Route 53: {s.dns.name} -> {s.load_balancer.name} ({dns_name}), weight 100")

    def _wait_dns(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.resolve()
                return
            except Exception:  # noqa: BLE001 - not up yet, or the stand-in not yet healthy
                if time.monotonic() > deadline:
                    raise KitError(f"the lab's DNS server on {self.dns_server} gave no address for "
                                   f"{self.service_name} in {timeout}s") from None
                time.sleep(0.1)

    @property
    def service_name(self) -> str:
        return self.settings.dns.name if self.settings.dns else self.settings.server_name

    def resolve(self) -> tuple[str, int]:
        """The service name's address through the lab's DNS server, and its TTL."""
        return lab_dns.resolve(self.dns_server, self.service_name)

    def address(self, name: str | None = None) -> str:
        """The loopback address of load balancer `name`'s stand-in (default: loadBalancer's)."""
        return address_of(self.state_file, name or self.settings.load_balancer.name)

    def balancers(self) -> dict[str, str]:
        """Each load balancer of the environment that exists in the lab endpoint -> its stand-in's address."""
        s = self.settings
        return {each.load_balancer.name: self.address(each.load_balancer.name)
                for each in (s, s.moving_to) if each is not None and read_state(each) is not None}

    def endpoints(self) -> dict:
        s = self.settings
        return {
            "tcp_listener": f"{FIXED_ADDRESS}:{self.listen[80]}",
            "ssl_listener": f"{FIXED_ADDRESS}:{self.listen[443]}",
            **({"dns_server": self.dns_server, "service_name": s.dns.name} if s.dns else {}),
            "balancers": self.balancers(),
            "server_name": s.server_name,
            "ca": str(self.dir / "tls" / "ca.pem"),
            "aws_endpoint": s.aws.endpoints["elbv2" if s.load_balancer.type == "network" else "elb"],
            "load_balancer": s.load_balancer.type,
            "app": s.app.upstreams[0],
            "hosts": {h.name: {"ssh": f"{h.address}:{h.ssh_port or 22}", "instance": h.instance_id,
                               "health": f"http://{s.bind_of(h) or h.address}:{s.ports.health}{HEALTH_PATH}"}
                      for h in s.hosts},
            "env_file": str(self.env_file),
        }

    def _bootstrap_plain(self) -> None:
        """Every host starts on a plain config (no PROXY header), as a fleet does before the cutover."""
        from core.render import render_hosts
        from remote import cutover
        from remote.report import Reporter
        from remote.rollout import Rollout
        from remote.ssh import Ssh

        plain = self.settings.model_copy(update={"proxy_protocol": False})
        run = Rollout(plain, list(plain.hosts), render_hosts(plain), Ssh(plain), Reporter(quiet=True))
        if not cutover.rollout(run).ok:
            raise KitError("could not start nginx on the lab hosts: " +
                           "; ".join(f"{o.host}: {o.error}" for o in run.outcomes if o.error))
        say("nginx on every host, plain config (no PROXY header yet)")

    def apply_load_balancer(self) -> None:
        """`pulumi up` where the CLI exists; otherwise the same calls with boto3 and the same gate."""
        from infra import automation
        from lab.applier import apply, pulumi_stack

        kind = "network load balancer" if self.settings.load_balancer.type == "network" else "load balancer"
        if pulumi_stack(self.settings) and self._same_as_the_stack():
            automation.up(self.settings.env, on_output=lambda line: None)
            say(f"{kind}: pulumi up")
        else:
            out = apply(self.settings)
            say(f"{kind}: made with boto3 (no pulumi CLI, or not a stack of this project; "
                f"gate {out['proxyProtocolGate']})")

    def _same_as_the_stack(self) -> bool:
        """Whether the project's stack file of this environment says what the lab's file says (the
        lab runs from a copy: `pulumi up -s <env>` reads the project's)."""
        try:
            return load(self.settings.env, PROJECT_DIR) == self.settings
        except KitError:
            return False

    def stand_in(self, name: str | None = None) -> StandIn:
        """The stand-in of load balancer `name` (default: loadBalancer), as the lab's follower runs it."""
        s = self.settings
        each = s.moving_to if s.moving_to and name == s.moving_to.load_balancer.name else s
        return stand_in(each, self.dir, self.listen, primary=each is s)

    def wait_for_header(self, on: bool, timeout: float = 60.0) -> None:
        """Until the stand-in runs what the load balancer has now, and that sends (or does not send)
        the PROXY header on every listener. It ends on that event; the bound is for a busy machine."""
        stand_in = self.stand_in()
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            state = stand_in.follows()
            # the config is written; the reload has taken once two WebSockets in a row see the client
            # as the header makes it (HAProxy's new worker takes over in its own time on a busy machine)
            seen = seen + 1 if state and state.header == on and self._client_seen_as(on) else 0
            if seen == 2:
                return
            time.sleep(0.1)
        raise KitError(f"the stand-in did not {'start' if on else 'stop'} sending the PROXY header in {timeout}s")

    def _client_seen_as(self, on: bool) -> bool:
        """A WebSocket through the TLS listener from CLIENT_SOURCE sees the client's own address
        (the header sent and read) when `on`, the stand-in's when not."""
        try:
            hello, echo = self.hello()
        except Exception:  # noqa: BLE001 - not switched yet: a plain request to a port reading the header, say
            return False
        return echo == "ping-echo" and hello["client_ip"] == (CLIENT_SOURCE if on else "127.0.0.1")

    def service_address(self) -> str:
        """Where a client reaches the service: the address the lab's DNS gives for its name (without
        dns settings: the stand-in's 127.0.0.1)."""
        return self.resolve()[0] if self.settings.dns else FIXED_ADDRESS

    def hello(self) -> tuple[dict, str]:
        """A WebSocket through the TLS listener from CLIENT_SOURCE, at the address the service name
        resolves to: the app's hello and its echo."""
        return ws_hello(dial(self.service_address(), self.listen[443], source=CLIENT_SOURCE),
                        self.settings.server_name, tls=self.tls_context())

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "tls" / "ca.pem"))

    def prove(self) -> dict:
        """A WebSocket through the SSL listener from 127.0.0.77, and a plain request to the TCP one."""
        s = self.settings
        if s.dns:
            address, ttl = self.resolve()
            say(f"{s.dns.name} resolves to {address} (ttl {ttl}) through the lab's DNS server {self.dns_server}")
        else:
            address = FIXED_ADDRESS
        hello, echo = ws_hello(dial(address, self.listen[443], source=CLIENT_SOURCE), s.server_name,
                               tls=self.tls_context())
        say(f"WebSocket via {self.tls_word} listener from {CLIENT_SOURCE}: the app saw client_ip={hello['client_ip']} "
            f"(X-Forwarded-For {hello['x_forwarded_for']}, proto {hello['x_forwarded_proto']}), echo {echo!r}")
        status, headers, _ = http_get(dial(address, self.listen[80], source=CLIENT_SOURCE), s.server_name, "/")
        say(f"plain request to the TCP listener: {status} -> {headers.get('location')}")
        return {"hello": hello, "echo": echo, "redirect": (status, headers.get("location"))}


def write_atomically(path: Path, text: str) -> None:
    """Write `path` whole at once: the lab's processes re-read it when it changes, never half of it."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.replace(path)


def next_name(name: str, taken: set[str]) -> str:
    """A new load balancer name after `name`: wsgate-lab -> wsgate-lab-2 -> wsgate-lab-3, none in `taken`."""
    base, _, n = name.rpartition("-")
    base = base if n.isdigit() and base else name
    for i in range(2, 1000):
        candidate = f"{base}-{i}"
        if candidate not in taken and candidate != name:
            return candidate
    raise KitError(f"no free load balancer name after {name}")


def free_ports(n: int, addresses: list[str], avoid: set[int]) -> list[int]:
    """`n` ports above those in `avoid` that nothing listens on at any of `addresses` now."""
    out: list[int] = []
    port = max(avoid) + 1
    while len(out) < n:
        if port > 65535:
            raise KitError(f"no {n} free ports above {max(avoid)} on {', '.join(addresses)}")
        if port not in avoid and all(lab_hosts.port_free(a, port) for a in addresses):
            out.append(port)
        port += 1
    return out


def classic_block(lb: dict, region: str) -> dict:
    """A loadBalancer block (as the file spells it) as a Classic ELB: a network one becomes one
    placed by availability zone, draining as it deregistered. Pure."""
    if lb.get("type", "classic") == "classic":
        return copy.deepcopy(lb)
    out = {k: copy.deepcopy(v) for k, v in lb.items()
           if k not in ("type", "subnets", "vpcId", "deregistrationDelay", "switchDrain", "alpnPolicy")}
    out["availabilityZones"] = [f"{region}a"]
    out["connectionDraining"] = lb.get("deregistrationDelay", 30)
    return out


def move_config(config: dict, to: str, name: str, ports: dict[str, int], network: tuple[str, list[str]] | None = None,
                proxy_protocol: bool | None = None) -> dict:
    """The stack config with `wsgate:moveTo`: a new load balancer `name` of kind `to` (MOVES) on
    `ports`, proxy protocol on for classic-on, off for classic-off, else as loadBalancer's now
    (`proxy_protocol` overrides); network: placed in (VPC, subnets) as lab.applier.network_config
    places the lab's. Pure."""
    from lab.applier import network_config

    if to not in MOVES:
        raise KitError(f"plan-move --to: one of {', '.join(MOVES)}, not {to!r}")
    out = copy.deepcopy(config)
    lb = classic_block(out["wsgate:loadBalancer"], out.get("aws:region", "us-east-1"))
    if to == "network":
        if network is None:
            raise KitError("a move to a network load balancer needs the lab's VPC and subnets")
        lb = network_config({"wsgate:loadBalancer": lb}, *network)["wsgate:loadBalancer"]
    lb["name"] = name
    if proxy_protocol is None:
        proxy_protocol = {"classic-on": True, "classic-off": False}.get(to, bool(out.get("wsgate:proxyProtocol")))
    out["wsgate:moveTo"] = {"loadBalancer": lb, "proxyProtocol": proxy_protocol, "ports": dict(ports)}
    return out


def promoted_config(config: dict) -> dict:
    """The stack config after a move: moveTo's load balancer, ports and proxy protocol in place of
    loadBalancer's; no moveTo. Pure."""
    out = copy.deepcopy(config)
    moved = out.pop("wsgate:moveTo")
    out["wsgate:loadBalancer"] = moved["loadBalancer"]
    out["wsgate:ports"] = moved["ports"]
    out["wsgate:proxyProtocol"] = moved.get("proxyProtocol", False)
    return out


def stand_in(settings: Settings, directory: Path, listen: dict[int, int], primary: bool = True) -> StandIn:
    """A load balancer's stand-in as the lab runs it: its files in the lab directory, TLS with the
    lab certificate, on its own address (and 127.0.0.1 for the environment's loadBalancer)."""
    own = address_of(directory / "state.json", settings.load_balancer.name)
    return StandIn(settings, standin_dir(directory, settings.load_balancer.name), directory / "tls" / "server.pem",
                   listen, (own, FIXED_ADDRESS) if primary else (own,))


def route53_endpoint(settings: Settings) -> str:
    """The lab endpoint's Route 53: aws:endpoints.route53, else the endpoint of its load balancers."""
    e = settings.aws.endpoints
    return e.get("route53") or e["elb"]


def lb_dns_name(settings: Settings) -> tuple[str, str]:
    """The load balancer's DNS name and canonical hosted zone ID, as its API reports them."""
    from awsapi.clients import client

    name = settings.load_balancer.name
    if settings.load_balancer.type == "network":
        lb = client(settings, "elbv2").describe_load_balancers(Names=[name])["LoadBalancers"][0]
        return lb["DNSName"], lb["CanonicalHostedZoneId"]
    d = client(settings, "elb").describe_load_balancers(LoadBalancerNames=[name])["LoadBalancerDescriptions"][0]
    return d["DNSName"], d.get("CanonicalHostedZoneNameID") or LAB_CLASSIC_ZONE


class Current:
    """The environment's settings as its file says now: re-read when the file changes (a file that
    does not load keeps the last settings, and says why once)."""

    def __init__(self, env: str):
        self.env = env
        self.path = Path(env) if env.endswith((".yaml", ".yml")) else PROJECT_DIR / f"Pulumi.{env}.yaml"
        self.settings = load(env, PROJECT_DIR)  # first: a file that does not load is named, not a traceback
        self.mtime = self.path.stat().st_mtime_ns
        self.problem: str | None = None

    def __call__(self) -> Settings:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return self.settings
        if mtime != self.mtime:
            self.mtime = mtime
            try:
                self.settings, self.problem = load(self.env, PROJECT_DIR), None
            except KitError as exc:
                if str(exc) != self.problem:
                    print(f"lab: {self.path.name} does not load, keeping the last settings: {exc}", flush=True)
                self.problem = str(exc)
        return self.settings


def follow(env: str, directory: Path, listen: dict[int, int]) -> None:
    """The stand-ins' loop: one per load balancer; runs until SIGTERM, then stops every HAProxy."""
    running = StandIns(Current(env), directory, directory / "tls" / "server.pem", listen)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running.follow(stop)
    finally:
        running.stop()


def serve_dns(env: str, directory: Path, port: int) -> None:
    """The lab's DNS server (lab/dns.py) until SIGTERM: the endpoint's Route 53, each load
    balancer's stand-in address, its health as the stand-in's checks see it, dns.ttl."""
    from lab.standin import healthy

    current = Current(env)
    s = current()
    state_file = directory / "state.json"
    route53 = lab_dns.Route53(route53_endpoint(s), s.aws.region, s.aws.endpoints.get("elb"),
                              s.aws.endpoints.get("elbv2"))

    def ttl() -> int:
        dns = current().dns
        return dns.ttl if dns else 60

    resolver = lab_dns.Resolver(route53, lambda name: address_of(state_file, name),
                                lambda name: healthy(directory, name), ttl)
    server = lab_dns.Server(resolver, "127.0.0.1", port).start()
    print(f"lab dns: on {server.address} (UDP)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.stop()


def moto(host: str, port: int, zones: list[str], region: str = "us-east-1") -> None:
    """The lab's AWS endpoint (moto server), with the hosted zone IDs the environment names: moto
    makes zone IDs up, except those given here (name=ID) before it starts. The backends of the
    services the lab calls are made before it listens (moto makes each at its first call: EC2's
    takes seconds), while `up` starts the hosts."""
    from moto.ec2.models import ec2_backends
    from moto.elb.models import elb_backends
    from moto.elbv2.models import elbv2_backends
    from moto.route53.models import HostedZoneIdentifier, route53_backends
    from moto.server import main as moto_main
    from moto.ssm.models import ssm_backends
    from moto.utilities.id_generator import moto_id_manager

    account = os.environ.get("MOTO_ACCOUNT_ID", "123456789012")
    for zone in zones:
        name, _, zone_id = zone.partition("=")
        moto_id_manager.set_custom_id(HostedZoneIdentifier(account, name, None), zone_id)
    for backends in (ec2_backends, elb_backends, elbv2_backends, ssm_backends):
        backends[account][region]
    route53_backends[account]["global"]
    moto_main(["-H", host, "-p", str(port)])


def _listen(text: str) -> dict[int, int]:
    """--listen: JSON of listener port -> the port its stand-in listens on (`{"80": 18800}`)."""
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError
        out = {int(k): v for k, v in value.items()}
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535 for v in out.values()):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON map of listener port to port") from None
    return out


def _port(text: str) -> int:
    if not (text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description="the wsgate lab on one machine")
    parser.add_argument("command", choices=["up", "down", "prove", "plan-move", "promote", "follow", "dns", "moto"])
    parser.add_argument("--env", default="lab")
    parser.add_argument("--lb", choices=["classic", "network"], default="classic",
                        help="up: the load balancer kind (network: written as <env>-network in the lab directory)")
    parser.add_argument("--to", choices=MOVES, help="plan-move: the load balancer to move to (a new one of this kind)")
    parser.add_argument("--proxy-protocol", choices=["on", "off"],
                        help="plan-move: the new load balancer's proxy protocol (default: on for classic-on, off for "
                             "classic-off, else as now)")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--listen", type=_listen, help=argparse.SUPPRESS)
    parser.add_argument("--no-rollout", action="store_true", help="stop before the rollout (plain fleet)")
    parser.add_argument("--port", type=_port, help=argparse.SUPPRESS)  # dns, moto
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)  # moto
    parser.add_argument("--region", default="us-east-1", help=argparse.SUPPRESS)  # moto
    parser.add_argument("--zone", action="append", default=[], help=argparse.SUPPRESS)  # moto: name.=ID
    args = parser.parse_args(argv)
    if args.command in ("follow", "dns") and args.dir is None:
        parser.error(f"{args.command} needs --dir (the lab directory)")
    if args.command == "moto" and args.port is None:
        parser.error("moto needs --port")
    listen = args.listen
    try:
        if args.command == "follow":
            follow(args.env, args.dir, listen or LISTEN)
            return 0
        if args.command == "dns":
            serve_dns(args.env, args.dir, args.port or lab_dns.DNS_PORT)
            return 0
        if args.command == "moto":
            moto(args.host, args.port, args.zone, args.region)
            return 0
        lab = Lab(args.env, args.dir, listen, kind=args.lb)
        if args.command == "up":
            lab.up(rollout=not args.no_rollout)
        elif args.command == "down":
            lab.down()
        elif args.command == "plan-move":
            if not args.to:
                parser.error("plan-move needs --to")
            lab.use_running()
            proxy = None if args.proxy_protocol is None else args.proxy_protocol == "on"
            print(lab.plan_move(args.to, proxy), flush=True)
        elif args.command == "promote":
            lab.use_running()
            lab.promote()
        else:
            lab.use_running()
            lab.prove()
    except KitError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
