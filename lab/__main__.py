"""The lab: the whole system on one machine. `python -m lab up|down|prove|follow`.

up:    backend hosts (sshd + nginx each, on 127.0.1.x), the lab AWS endpoint (moto), the demo
       app, the load balancer (Pulumi where the CLI exists, else the same calls with boto3),
       the HAProxy stand-in following it, then the real `fab rollout --env lab --apply`, and
       the proof: a WebSocket through the stand-in's SSL listener from 127.0.0.77.
       `--lb network`: the same with a network load balancer (the environment is written into
       the lab directory, placed in the lab endpoint's VPC).
down:  stops everything `up` started (it is safe to run twice, and `up` runs it first).
"""

from __future__ import annotations

import argparse
import json
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
from core.settings import Settings, load
from lab import hosts as lab_hosts
from lab import tls
from lab.client import dial, http_get, ws_hello
from lab.standin import LISTEN, StandIn

PROJECT_DIR = Path(__file__).resolve().parent.parent
CLIENT_SOURCE = "127.0.0.77"  # the lab client's address: never the stand-in's (127.0.0.1)


def say(text: str) -> None:
    print(f"lab: {text}", flush=True)


class Lab:
    def __init__(self, env: str = "lab", directory: Path | None = None, listen: dict[int, int] | None = None,
                 kind: str = "classic"):
        self.env = env  # a name (Pulumi.<env>.yaml here) or a path to an environment file
        self.settings: Settings = load(env, PROJECT_DIR)
        self.env_file = Path(env) if env.endswith((".yaml", ".yml")) else PROJECT_DIR / f"Pulumi.{env}.yaml"
        self.dir = Path(directory or Path(self.settings.ssh.known_hosts).parent.parent)
        self.listen = listen or LISTEN
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
        state = {**self._state(), **data}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def _spawn(self, name: str, argv: list[str], wait: tuple[str, int] | None = None) -> int:
        log = (self.dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            lab_hosts.wait_port(*wait, timeout=30)
        pids = self._state().get("pids", {})
        self._save(pids={**pids, name: proc.pid})
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
        order = [pids.get("stand-in"), *nginx_pids, *(pids.get(f"sshd-{h.name}") for h in self.hosts),
                 pids.get("app"), pids.get("moto")]
        for pid in filter(None, order):
            lab_hosts.terminate(pid)
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
        s = self.settings
        say(f"state in {self.dir}")
        client_pub = lab_hosts.keygen(self.dir / "client" / "id_ed25519")
        known = [h.prepare(client_pub) for h in self.hosts]
        (self.dir / "client" / "known_hosts").write_text("\n".join(known) + "\n")
        for h in self.hosts:
            self._save(pids={**self._state().get("pids", {}), f"sshd-{h.name}": h.start()})
        say(f"{len(self.hosts)} hosts: " + ", ".join(f"{h.name} ssh {h.address}:{h.ssh_port}" for h in self.hosts))

        endpoint = urlparse(s.aws.endpoints["elb"])
        assert endpoint.hostname and endpoint.port  # the lab's settings name a loopback host:port
        self._spawn("moto", [str(Path(sys.executable).parent / "moto_server"), "-H", endpoint.hostname,
                             "-p", str(endpoint.port)], wait=(endpoint.hostname, endpoint.port))
        say(f"AWS endpoint (moto) on {endpoint.hostname}:{endpoint.port}")
        app_host, _, app_port = s.app.upstreams[0].rpartition(":")
        self._spawn("app", [sys.executable, "-m", "lab.app", "--listen", s.app.upstreams[0]],
                    wait=(app_host, int(app_port)))
        say(f"demo WebSocket app on {s.app.upstreams[0]}")
        tls.make(self.dir / "tls", s.server_name)
        if self.kind == "network":
            self._write_network_env()

        self._bootstrap_plain()
        self.apply_load_balancer()
        self._spawn("stand-in", [sys.executable, "-m", "lab", "follow", "--env", self.env, "--dir", str(self.dir),
                                 "--listen", json.dumps(self.listen)],
                    wait=("127.0.0.1", self.listen[443]))
        say(f"load balancer stand-in (HAProxy): TCP 127.0.0.1:{self.listen[80]}, {self.tls_word} "
            f"127.0.0.1:{self.listen[443]}")
        self._save(endpoints=self.endpoints())
        if rollout:
            say(f"fab rollout --env {self.settings.env} --apply")
            result = subprocess.run([sys.executable, "-m", "fabric", "rollout", "--env", self.env, "--apply"],
                                    cwd=PROJECT_DIR)
            if result.returncode != 0:
                raise KitError("fab rollout failed (see above); the lab is left running for a look")
            self.wait_for_header(True)
            self.prove()
        say(f"running; endpoints in {self.state_file}; stop with: make lab-down")
        return self.endpoints()

    @property
    def tls_word(self) -> str:
        """What the load balancer calls its listener that ends TLS."""
        return "TLS" if self.settings.load_balancer.type == "network" else "SSL"

    def _write_network_env(self) -> None:
        """The environment with a network load balancer, in the lab endpoint's VPC and subnet (whose
        IDs exist only once the endpoint runs), written beside the lab's state; the lab uses it."""
        from lab.applier import lab_network, network_config

        vpc, subnets = lab_network(self.settings)
        config = yaml.safe_load(self.base_env_file.read_text())["config"]
        path = self.network_env_file
        path.write_text(f"# Written by `python -m lab up --lb network` from {self.base_env_file.name}: the lab with a "
                        "network load balancer in the lab endpoint's VPC.\n"
                        + yaml.safe_dump({"config": network_config(config, vpc, subnets)}, sort_keys=False))
        self.env, self.env_file, self.settings = str(path), path, load(str(path))
        say(f"network load balancer environment: {path} (VPC {vpc}, subnets {', '.join(subnets)})")

    def endpoints(self) -> dict:
        s = self.settings
        return {
            "tcp_listener": f"127.0.0.1:{self.listen[80]}",
            "ssl_listener": f"127.0.0.1:{self.listen[443]}",
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
        if pulumi_stack(self.settings):
            automation.up(self.settings.env, on_output=lambda line: None)
            say(f"{kind}: pulumi up")
        else:
            out = apply(self.settings)
            say(f"{kind}: made with boto3 (no pulumi CLI, or not a stack of this project; "
                f"gate {out['proxyProtocolGate']})")

    def stand_in(self) -> StandIn:
        return stand_in(self.settings, self.dir, self.listen)

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

    def hello(self) -> tuple[dict, str]:
        """A WebSocket through the TLS listener from CLIENT_SOURCE: the app's hello and its echo."""
        return ws_hello(dial("127.0.0.1", self.listen[443], source=CLIENT_SOURCE), self.settings.server_name,
                        tls=self.tls_context())

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "tls" / "ca.pem"))

    def prove(self) -> dict:
        """A WebSocket through the SSL listener from 127.0.0.77, and a plain request to the TCP one."""
        s = self.settings
        hello, echo = self.hello()
        say(f"WebSocket via {self.tls_word} listener from {CLIENT_SOURCE}: the app saw client_ip={hello['client_ip']} "
            f"(X-Forwarded-For {hello['x_forwarded_for']}, proto {hello['x_forwarded_proto']}), echo {echo!r}")
        status, headers, _ = http_get(dial("127.0.0.1", self.listen[80], source=CLIENT_SOURCE), s.server_name, "/")
        say(f"plain request to the TCP listener: {status} -> {headers.get('location')}")
        return {"hello": hello, "echo": echo, "redirect": (status, headers.get("location"))}


def stand_in(settings: Settings, directory: Path, listen: dict[int, int]) -> StandIn:
    """The lab's stand-in: its files in the lab directory, TLS with the lab certificate."""
    return StandIn(settings, directory, directory / "tls" / "server.pem", listen)


def follow(env: str, directory: Path, listen: dict[int, int]) -> None:
    """The stand-in's loop: runs until SIGTERM, then stops HAProxy."""
    running = stand_in(load(env, PROJECT_DIR), directory, listen)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running.follow(stop)
    finally:
        running.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description="the wsgate lab on one machine")
    parser.add_argument("command", choices=["up", "down", "prove", "follow"])
    parser.add_argument("--env", default="lab")
    parser.add_argument("--lb", choices=["classic", "network"], default="classic",
                        help="up: the load balancer kind (network: written as <env>-network in the lab directory)")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--listen", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--no-rollout", action="store_true", help="stop before the rollout (plain fleet)")
    args = parser.parse_args(argv)
    listen = {int(k): v for k, v in args.listen.items()} if args.listen else None
    try:
        if args.command == "follow":
            follow(args.env, args.dir, listen or LISTEN)
            return 0
        lab = Lab(args.env, args.dir, listen, kind=args.lb)
        if args.command == "up":
            lab.up(rollout=not args.no_rollout)
        elif args.command == "down":
            lab.down()
        else:
            lab.prove()
    except KitError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
