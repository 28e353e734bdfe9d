"""`fab move`: from one load balancer to another without failing a request.

The steps (core.move.Step), each proven from AWS and from the hosts before the next:
  a. serve: every host serves both load balancers' ports, each framed as the one that uses it
     frames its traffic; proven by the rollout's probes and the readiness record;
  b. create: `pulumi up` declares the new load balancer beside the old (the gate opens on it from
     its first run: the record proves its ports), DNS weight 0; AWS is read back: it exists, it
     sends the header to exactly its proxy ports (none with proxy protocol off), the weights are
     as declared;
  c. prove: every instance healthy in it (the API), and a request through each of its listeners
     that the hosts answered (a framing the hosts do not expect gets no answer);
  d. weigh: the weights move, step by step (dns.steps, dns.pause between), each a `pulumi up`
     read back from Route 53;
  e. drain: dns.ttl passes after the last change, then every host reports no established
     connection on the old load balancer's ports for dns.quiet seconds; past dns.drainMax the
     connections still open are shown per host and the move stops (`--cut` retires anyway);
  f. retire: `pulumi up` removes the old load balancer and its record (read back: gone), then the
     hosts stop serving its ports.
The move record says what the program declares and the last step proven: a rerun goes on from
there. A failure stops the move where the last proven step left it: the old load balancer
serving, DNS as that step left it (a weight change that failed is put back).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from core.errors import KitError
from core.move import (
    Drain,
    MoveError,
    MoveRecord,
    Step,
    conflict,
    connections_command,
    finished_here,
    next_step,
    parse_connections,
    source_ports,
)
from core.settings import Host, Settings
from remote.applier import Applier
from remote.report import Progress, reading

OK, FAILED, ATTENTION, INTERRUPTED = 0, 1, 3, 130
HEALTH_WAIT = 300  # seconds the new load balancer gets to report every instance healthy
REACH_WAIT = 60  # seconds a request through a listener of the new load balancer is retried
SAMPLE_EVERY = 1.0  # seconds between two connection counts in the drain

RolloutFn = Callable[[list[Settings]], bool]  # a rollout of the hosts serving these load balancers: ok?


class MoveStopped(KitError):
    """The move stopped at a step (the message names it); `code` is the exit code."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


def now() -> datetime:
    return datetime.now(timezone.utc)


class Clock:
    """The move's time: the wall clock (the record's times), a monotonic one (the drain) and an
    interruptible wait (True: interrupted). Tests drive a clock of their own."""

    def __init__(self, interrupted: threading.Event | None = None):
        self.interrupted = interrupted or threading.Event()

    def now(self) -> datetime:
        return now()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> bool:
        return self.interrupted.wait(max(0.0, seconds))


class Move:
    def __init__(self, settings: Settings, hosts: list[Host], applier: Applier, rollout: RolloutFn,
                 note: Callable[[str], None], *, cut: bool = False, clock: Clock | None = None,
                 connections: Callable[[list[int]], dict[str, dict[int, int]]] | None = None):
        if settings.moving_to is None or settings.dns is None:
            raise KitError("nothing to move: set wsgate:moveTo (the load balancer to move to) and wsgate:dns "
                           "(docs/moving.md)")
        self.s, self.target, self.dns = settings, settings.moving_to, settings.dns
        self.hosts, self.applier, self.rollout, self.note, self.cut = hosts, applier, rollout, note, cut
        self.clock = clock or Clock()
        self.connections = connections
        self.record: MoveRecord | None = None

    # --- the record ------------------------------------------------------------------------------

    def _save(self, **changes: Any) -> MoveRecord:
        from awsapi.parameters import write_move

        assert self.record is not None
        self.record = self.record.model_copy(update={**changes, "updated_at": self.clock.now()})
        write_move(self.s, self.record)
        return self.record

    def _reached(self, step: Step, **changes: Any) -> None:
        self._save(reached=step, **changes)
        self.note(f"step {step.value}: proven")

    # --- the run ---------------------------------------------------------------------------------

    def run(self) -> MoveRecord:
        """Every step from where the record says the move is; the record at the end."""
        from awsapi.parameters import read_move

        record = read_move(self.s)
        problem = conflict(self.s, record)
        if problem:
            raise MoveError(f"{problem}; nothing was changed")
        if record is not None and finished_here(self.s, record):
            record = None
        self.record = record or MoveRecord(env=self.s.env, source=self.s.load_balancer.name,
                                           target=self.target.load_balancer.name, updated_at=self.clock.now())
        if self.record.done:
            self.note(f"the move from {self.record.source} to {self.record.target} is done: promote moveTo to "
                      f"loadBalancer in Pulumi.{self.s.env}.yaml and drop moveTo")
            return self.record
        if self.record.reached:
            self.note(f"the move from {self.record.source} to {self.record.target} reached step "
                      f"{self.record.reached}: going on from there")
        step: Step | None = next_step(self.record)
        while step is not None:
            self.note(f"step {step.value}")
            getattr(self, f"step_{step.value}")()
            step = None if self.record.done else next_step(self.record)
        return self.record

    def step_serve(self) -> None:
        if not self.rollout([self.s, self.target]):
            raise MoveStopped("step serve: the rollout serving both load balancers failed (its table says where); "
                              "every host was put back; nothing of the load balancers changed")
        self._reached(Step.SERVE)

    def step_create(self) -> None:
        self._save(target_declared=True, weight=0)
        self._apply(Step.CREATE)
        self._check_balancer(self.target)
        self._check_weights(Step.CREATE)
        self._reached(Step.CREATE)

    def step_prove(self) -> None:
        self._healthy(self.target)
        self._through_listeners(self.target)
        self._reached(Step.PROVE)

    def step_weigh(self) -> None:
        assert self.record is not None
        for weight in [w for w in self.dns.steps if w > self.record.weight]:
            before = self.record.weight
            self._save(weight=weight)
            try:
                self._apply(Step.WEIGH)
                self._check_weights(Step.WEIGH)
            except BaseException:
                self._put_weight_back(before)
                raise
            self._reached(Step.WEIGH)
            self.note(f"DNS: {100 - weight}% {self.s.load_balancer.name}, {weight}% {self.target.load_balancer.name}")
            if weight < 100:
                self._wait(self.dns.pause_seconds, f"step {Step.WEIGH}: the pause before the next weight")

    def step_drain(self) -> None:
        assert self.record is not None
        passed = (self.clock.now() - self.record.updated_at).total_seconds()
        if passed < self.dns.ttl:
            self.note(f"step drain: {self.dns.ttl - passed:.0f} s for resolvers to forget the old answer (dns.ttl)")
            self._wait(self.dns.ttl - passed, "step drain: the TTL")
        ports = source_ports(self.s)
        clock = Drain(self.clock.monotonic(), self.dns.quiet, self.dns.drain_max)
        last: dict[str, dict[int, int]] = {}
        shown, progress = -1, Progress(self.clock.monotonic)
        while True:
            last = self._count(ports)
            total = sum(sum(c.values()) for c in last.values())
            at = self.clock.monotonic()
            clock.sample(at, total)
            if total != shown or progress.due():  # each change, and while it stays, every PROGRESS_EVERY seconds
                waited = f" ({progress.waited():.0f}s of at most {self.dns.drain_max}s)" if total == shown else ""
                self.note(f"step drain: {total} connection(s) open on {self.s.load_balancer.name}'s ports {ports}"
                          + waited + (": " + ", ".join(f"{h} {sum(c.values())}" for h, c in sorted(last.items())
                                                       if sum(c.values())) if total else ""))
                shown = total
                progress.said()
            if clock.drained(at):
                self._reached(Step.DRAIN)
                return
            if clock.over(at):
                held = {h: sum(c.values()) for h, c in sorted(last.items()) if sum(c.values())}
                listing = "; ".join(f"{h}: " + ", ".join(f"port {p}: {n}" for p, n in sorted(c.items()) if n)
                                    for h, c in sorted(last.items()) if sum(c.values()))
                if not self.cut:
                    raise MoveStopped(
                        f"step drain: after dns.drainMax ({self.dns.drain_max} s) connections are still open on "
                        f"{self.s.load_balancer.name}'s ports: {listing}; nothing was cut. Rerun with --cut to retire "
                        "it anyway (they are cut), or later (docs/troubleshooting.md#the-drain-did-not-end)",
                        ATTENTION)
                self.note(f"step drain: --cut: retiring with {sum(held.values())} connection(s) still open: {listing}")
                self._reached(Step.DRAIN, held=held, held_at=self.clock.now())
                return
            self._wait(SAMPLE_EVERY, "step drain")

    def step_retire(self) -> None:
        from awsapi import route53

        self._save(source_declared=False)
        self._apply(Step.RETIRE)
        if exists(self.s):
            raise MoveStopped(f"step retire: after pulumi up the load balancer {self.s.load_balancer.name} still "
                              "exists; run fab move again")
        self._check_weights(Step.RETIRE)
        have = route53.weights(self.s)
        if self.s.load_balancer.name in have:
            raise MoveStopped(f"step retire: the DNS record of {self.s.load_balancer.name} is still there")
        self._reached(Step.RETIRE)
        self.step_done()

    def step_done(self) -> None:
        """The hosts stop serving the retired load balancer's ports (also a rerun's step, when the
        rollout after the retirement failed)."""
        if not self.rollout([self.target]):
            raise MoveStopped("step retire: the old load balancer is gone, but the rollout that stops serving its "
                              "ports failed (its table says where); run fab move again")
        self._reached(Step.DONE)
        self.note(f"moved to {self.target.load_balancer.name}: now promote moveTo to loadBalancer (its ports and "
                  f"proxyProtocol too) in Pulumi.{self.s.env}.yaml and drop moveTo (docs/moving.md#after-a-move)")

    # --- the proofs ------------------------------------------------------------------------------

    def _apply(self, step: Step) -> dict[str, Any]:
        if self.clock.interrupted.is_set():
            raise MoveStopped(f"step {step}: interrupted", INTERRUPTED)
        try:
            return self.applier.apply(self.note)
        except KeyboardInterrupt:
            raise MoveStopped(f"step {step}: interrupted during pulumi up", INTERRUPTED) from None
        except KitError as exc:
            raise MoveStopped(f"step {step}: pulumi up failed: {exc}") from None

    def _check_balancer(self, s: Settings) -> None:
        from awsapi.balancer import header_ports

        if not exists(s):
            raise MoveStopped(f"step create: after pulumi up there is no load balancer {s.load_balancer.name}")
        want = sorted(s.proxy_ports) if s.proxy_protocol else []
        have = header_ports(s)
        if have != want:
            raise MoveStopped(f"step create: {s.load_balancer.name} sends the PROXY header to ports {have or 'none'}, "
                              f"its hosts expect it on {want or 'none'}; it has no DNS weight: nothing reaches it")
        self.note(f"verified: {s.load_balancer.name} sends the PROXY header to ports {have or 'none'}, as its hosts "
                  "expect")

    def _check_weights(self, step: Step) -> None:
        from awsapi import route53

        assert self.record is not None
        want, have = self.record.weights(), route53.weights(self.s)
        if have != want:
            raise MoveStopped(f"step {step}: Route 53 has the weights {have}, expected {want}")
        self.note(f"verified: DNS weights {', '.join(f'{n} {w}' for n, w in sorted(want.items()))}")

    def _put_weight_back(self, weight: int) -> None:
        """A weight change that failed: the record back to the last proven weight, and one more
        `pulumi up` to put Route 53 there (its failure is noted; a rerun goes on)."""
        self._save(weight=weight)
        try:
            self.applier.apply(self.note)
            self.note(f"the DNS weights were put back ({weight}% on {self.target.load_balancer.name})")
        except (KitError, KeyboardInterrupt) as exc:
            self.note(f"could not put the DNS weights back ({exc}): run fab move again")

    def _healthy(self, s: Settings) -> None:
        from awsapi.balancer import health
        from awsapi.clients import is_lab
        from core.health import described, not_in_service

        progress = Progress(self.clock.monotonic)
        deadline = progress.start + HEALTH_WAIT
        while True:
            now = reading(lambda: health(s), deadline, lambda: self._wait(2, "step prove"), self.note,
                          self.clock.monotonic)
            members, states = (now.registered, now.states) if now else ([], {})
            if s.load_balancer.type == "classic" and members and not states and is_lab(s):
                # the lab's endpoint knows no EC2 instance of these IDs, so it reports no health:
                # registered is what it can say (the stand-in checks the hosts; the requests
                # through the listeners prove them)
                self.note(f"the lab's endpoint reports no instance health: {len(members)} registered in "
                          f"{s.load_balancer.name}")
                states = dict.fromkeys(members, "InService (registered; the lab reports no health)")
            want = set(members) | set(s.instances)
            sick = not_in_service(states, members, s.instances)
            if want and not sick:
                self.note(f"verified: every instance is healthy in {s.load_balancer.name} ({len(want)})")
                return
            if self.clock.monotonic() > deadline:
                raise MoveStopped(f"step prove: not every instance is healthy in {s.load_balancer.name} after "
                                  f"{HEALTH_WAIT} s: {described(sick)}; it has no DNS weight: nothing reaches it")
            if progress.due():  # a wait of minutes must not look hung
                self.note(f"still waiting for every instance to be healthy in {s.load_balancer.name} "
                          f"({progress.waited():.0f}s of at most {HEALTH_WAIT}s): {described(sick)}")
                progress.said()
            self._wait(2, "step prove")

    def _through_listeners(self, s: Settings) -> None:
        """A request through each listener of `s` where the controller can reach it: the hosts
        answered it (nginx drops a connection whose framing it does not expect)."""
        from awsapi.clients import is_lab

        name = (described(s) or {}).get("DNSName")
        if name and not self.dns.resolver and is_lab(s):
            self.note(f"step prove: the lab's {name} resolves only through dns.resolver (none set): proven through "
                      "the AWS API only")
            return
        address = resolve(name, self.dns.resolver) if name else None
        if address is None:
            self.note(f"step prove: {name or s.load_balancer.name} does not resolve from here: proven through the "
                      "AWS API only")
            return
        for port, tls in ((80, False), (443, True)):
            reach = self.dns.listener_ports.get(port, port)  # type: ignore[call-overload]
            deadline = self.clock.monotonic() + REACH_WAIT
            while True:  # a new load balancer's nodes take a while to answer; it has no weight meanwhile
                try:
                    answer = request(address, reach, tls, s.server_name)
                    break
                except OSError as exc:
                    if self.clock.monotonic() > deadline:
                        if port == 80:
                            self.note(f"step prove: {name} ({address}:{reach}) cannot be reached from here ({exc}): "
                                      "proven through the AWS API only")
                            return
                        raise MoveStopped(f"step prove: a request through {name}:{port} failed: {exc}; it has no "
                                          "DNS weight: nothing reaches it") from None
                    self._wait(1, "step prove")
            if not answer.startswith("HTTP/1.1 "):
                raise MoveStopped(f"step prove: {name}:{port} answered {answer[:80]!r}, not HTTP")
            self.note(f"verified: a request through {name}:{port} was answered ({answer.split(chr(13))[0]})")

    def _count(self, ports: list[int]) -> dict[str, dict[int, int]]:
        if self.connections is not None:
            return self.connections(ports)
        return count_connections(self.s, self.hosts, ports)

    def _wait(self, seconds: float, what: str) -> None:
        if self.clock.wait(seconds):
            raise MoveStopped(f"{what}: interrupted", INTERRUPTED)


def described(s: Settings) -> dict | None:
    """The load balancer of `s` as its API describes it now (None: it does not exist)."""
    from awsapi import classic, network

    return network.describe_network(s) if s.load_balancer.type == "network" else classic.describe(s)


def exists(s: Settings) -> bool:
    """Whether the load balancer of `s` exists now (AWS)."""
    return described(s) is not None


def count_connections(s: Settings, hosts: list[Host], ports: list[int]) -> dict[str, dict[int, int]]:
    """host name -> port -> established connections on it now (iproute2 `ss` on each host)."""
    from remote.ssh import Ssh

    ssh = Ssh.for_run(s, hosts)

    def one(host: Host) -> tuple[str, dict[int, int]]:
        try:
            conn = ssh.connect(host, retry=True)
            got = ssh.run(conn, connections_command(ports, s.bind_of(host)), timeout=30)
        except KitError as exc:
            raise MoveStopped(f"step drain: {host.name}: cannot count its connections: {exc}") from None
        if not got.ok:
            raise MoveStopped(f"step drain: {host.name}: `ss` failed ({got.stderr.strip() or got.exited}): the "
                              "drain needs iproute2's ss on every host")
        return host.name, parse_connections(got.stdout, ports)

    try:
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
            return dict(pool.map(one, hosts))
    finally:
        ssh.close()


def resolve(name: str, resolver: str | None) -> str | None:
    """An IPv4 address of `name`: from the DNS server `resolver` (host:port) when set, else the
    system's; None when it does not resolve."""
    if resolver:
        import dns.exception
        import dns.resolver

        host, _, port = resolver.rpartition(":")
        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port, r.lifetime = [host], int(port), 5.0
        try:
            return str(r.resolve(name, "A")[0])
        except dns.exception.DNSException:
            return None
    try:
        return str(socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0])
    except OSError:
        return None


def request(address: str, port: int, tls: bool, host: str, timeout: float = 10.0) -> str:
    """One HTTP/1.1 request to `address:port` (TLS on 443; the certificate is not checked: the probe
    proves the framing, it sends nothing secret); the answer's first bytes."""
    with socket.create_connection((address, port), timeout=timeout) as raw:
        sock: socket.socket = raw
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(raw, server_hostname=host)
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 200:
            chunk = sock.recv(200)
            if not chunk:
                break
            data += chunk
        if not data:
            raise OSError("the connection closed without an answer (the hosts did not expect this framing)")
        return data.decode(errors="replace")


# --- fab status: the move ---------------------------------------------------------------------------

def move_view(s: Settings, hosts: list[Host], count: bool = True) -> dict[str, Any]:
    """What `fab status` shows of DNS and a move: each load balancer (exists, kind, DNS weight), the
    TTL, the step reached, the command to run next, and per host the established connections on
    each port with the load balancer it belongs to. Problems found are listed."""
    from awsapi import route53
    from awsapi.parameters import read_move
    from core.move import NEXT_COMMAND, declared

    assert s.dns is not None
    view: dict[str, Any] = {"dns": {"name": s.dns.name, "zone": s.dns.zone_id, "ttl": s.dns.ttl}, "problems": []}
    unread = None  # why the move record could not be read: then nothing is said of the move's step
    try:
        record = read_move(s)
    except KitError as exc:
        record, unread = None, f"cannot read the move record: {exc}"
        view["problems"].append(unread)
        problem: str | None = unread
    else:
        problem = conflict(s, record)
        if problem:
            view["problems"].append(problem)
    balancers = [s, *([s.moving_to] if s.moving_to else [])]
    if record is not None and s.moving_to and record.target != s.moving_to.load_balancer.name:
        balancers = [s]
    try:
        weights = route53.weights(s)
        foreign = route53.refusal(s)
    except KitError as exc:
        weights, foreign = {}, f"cannot read Route 53: {exc}"
        view["dns"]["weightsRead"] = False  # "no record" would be a guess
    if foreign:
        view["problems"].append(foreign)
    try:
        want = {} if problem else declared(s, record)
    except MoveError:
        want = {}
    owner: dict[int, str] = {}
    view["balancers"] = []
    for b in balancers:
        name = b.load_balancer.name
        for port in b.served():
            owner[port] = name
        try:
            present: bool | None = exists(b)
        except KitError as exc:  # said, and the rest of the view still shown
            present = None
            view["problems"].append(f"cannot read load balancer {name}: {exc}")
        view["balancers"].append({"name": name, "type": b.load_balancer.type, "proxyProtocol": b.proxy_protocol,
                                  "exists": present, "weight": weights.get(name), "declared": name in want,
                                  "ports": sorted(b.served())})
        if name in want and want[name] != weights.get(name):
            view["problems"].append(f"DNS weight of {name} is {weights.get(name)}, the move declares {want[name]}: "
                                    f"run fab move --env {s.env}" if record else
                                    f"DNS weight of {name} is {weights.get(name)}: run pulumi up")
        if weights.get(name) and present is False:
            view["problems"].append(f"DNS gives weight to {name}, which does not exist")
    reached = record.reached if record is not None and not problem else None
    view["move"] = None if record is None else {
        "source": record.source, "target": record.target, "reached": str(reached) if reached else None,
        "weight": record.weight, "held": record.held, "heldAt": record.held_at}
    if unread:
        view["next"] = "see the problem above"
    elif s.moving_to is None:
        view["next"] = None if record is None or finished_here(s, record) else "see the problem above"
    elif record is not None and record.done:
        view["next"] = NEXT_COMMAND[Step.DONE].format(env=s.env)
    else:
        view["next"] = NEXT_COMMAND[None].format(env=s.env)
    if count and hosts:
        try:
            counts = count_connections(s, hosts, sorted(owner))
            view["connections"] = {h: {str(p): {"loadBalancer": owner[p], "established": n} for p, n in c.items()}
                                   for h, c in counts.items()}
        except KitError as exc:
            view["problems"].append(f"cannot count the hosts' connections: {exc}")
    return view


def _existence(present: bool | None) -> str:
    return "not read" if present is None else "exists" if present else "does not exist"


def show_move(reporter, view: dict[str, Any]) -> None:
    """The move's part of `fab status`."""
    d = view["dns"]
    reporter.message(f"DNS: {d['name']} (zone {d['zone']}, TTL {d['ttl']} s)")
    for b in view["balancers"]:
        weight = ("weight not read" if d.get("weightsRead") is False else "no record" if b["weight"] is None
                  else f"weight {b['weight']}")
        reporter.message(f"  {b['name']} ({b['type']}, proxy protocol {'on' if b['proxyProtocol'] else 'off'}): "
                         f"{_existence(b['exists'])}, {weight}, ports "
                         f"{', '.join(map(str, b['ports']))}")
    move = view.get("move")
    if move:
        reporter.message(f"move {move['source']} -> {move['target']}: step reached: {move['reached'] or 'none yet'}"
                         + (f" (weight {move['weight']}% on {move['target']})" if move["reached"] == "weigh" else "")
                         + (f"; cut with connections open: {move['held']} at {move['heldAt']}" if move["held"] else ""))
    for host, ports in sorted(view.get("connections", {}).items()):
        cells = ", ".join(f"{p} ({c['loadBalancer']}): {c['established']}" for p, c in
                          sorted(ports.items(), key=lambda kv: int(kv[0])))
        reporter.message(f"  {host}: established {cells}")
    if view.get("next"):
        reporter.message(f"next: {view['next']}")
    for problem in view["problems"]:
        reporter.message(f"[red]dns: {problem}[/]", markup=True)
