"""End to end: `fab move` in the lab, under load, measured (real sshd, nginx, HAProxy, moto, the
lab's DNS server).

One lab for the module (its own addresses, ports, directory; dns.ttl 1 s, quiet 1 s, steps
[50, 100], pause 1 s), then a chain of moves, each made with the lab's exact commands
(`python -m lab plan-move --to KIND`, the `fab move` command it prints, `python -m lab promote`)
while clients find the service through the lab's DNS, keep to its TTL, make requests one after
another and hold WebSockets that end after a few seconds (so the drain can end):
Classic, header off -> a new Classic with the header on -> a network load balancer -> a Classic
ELB -> a Classic with the header off. Each move: no failed request, no held WebSocket dropped,
the new load balancer frames as it says from its first request. Then a WebSocket held open
through the drain's bound: `fab move` stops (exit 3, naming host and port), `fab move --cut`
retires the old load balancer and the client sees that socket dropped at the retirement.
The figures of every move are printed and written to moves.json in the lab's directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field

import pytest
import yaml

import awsapi.parameters
from lab.__main__ import CLIENT_SOURCE, Lab, main, write_atomically
from lab.client import DnsClient, Stats
from tests.conftest import PROJECT_DIR, own_net
from tests.support.labenv import lab_env

pytestmark = pytest.mark.integration  # beside the other labs: its hosts on a network of their own (own_net)
HOLD_FOR = 2.0  # seconds a held WebSocket stays open before its client closes it (and opens another)
STEP = re.compile(r"step (\w+)(: proven)?$")
FIGURES: list[dict] = []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moves") / "lab"
    env_file, listen = lab_env(directory, own_net())
    doc = yaml.safe_load(env_file.read_text())
    doc["config"]["wsgate:dns"].update(ttl=1, quiet=1, steps=[50, 100], pause=1, drainMax=20)
    doc["config"]["wsgate:proxyProtocol"] = False  # the lab starts without the header
    env_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    the_lab = Lab(str(env_file), directory, listen)
    try:
        the_lab.up(rollout=True)
        yield the_lab
    finally:
        the_lab.down()
        (directory / "moves.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def lab_command(lab: Lab, *args: str) -> str:
    """`python -m lab ARGS` for this lab (in process: the same argument parsing and code); its output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*args, "--env", lab.env, "--dir", str(lab.dir)])
    assert code == 0, out.getvalue()
    return out.getvalue()


@dataclass
class Run:
    """One `fab move` run: its exit code, its output, when each line came (time.monotonic())."""

    code: int
    lines: list[tuple[float, str]]

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def steps(self) -> dict[str, dict[str, float]]:
        """step -> {"start": t, "proven": t} as the run reported them."""
        out: dict[str, dict[str, float]] = {}
        for at, line in self.lines:
            m = STEP.search(line.strip())
            if m:  # a step's first start, its last proof (weigh is proven at each weight)
                times = out.setdefault(m[1], {})
                if m[2]:
                    times["proven"] = at
                else:
                    times.setdefault("start", at)
        return out


def run(command: str) -> Run:
    """A command, its output read as it comes (each line stamped), bounded."""
    proc = subprocess.Popen(shlex.split(command), cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    assert proc.stdout is not None
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    return Run(proc.wait(timeout=240), lines)


@dataclass
class Measured:
    """What one move did to the clients, per load balancer ("old": the one left, "new")."""

    move: str
    source: str  # name (kind, header)
    target: str
    seconds: float = 0.0  # from plan-move to the end of the last fab move
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds from the start to its proof
    requests: dict[str, dict[str, int]] = field(default_factory=dict)  # old/new -> ok, failed
    held: dict[str, int] = field(default_factory=dict)  # held WebSockets: on each side, ended, dropped
    held_at_retirement: list[dict] = field(default_factory=list)  # old ones open when retire began: seconds from it
    client_ips: dict[str, list[str]] = field(default_factory=dict)  # what the app saw, per side


def described(s) -> str:
    return f"{s.load_balancer.name} ({s.load_balancer.type}, header {'on' if s.proxy_protocol else 'off'})"


def clients(lab: Lab, hold: int = 3, hold_for: float | None = HOLD_FOR) -> DnsClient:
    """Three clients making requests (HTTPS, a WebSocket with an echo, plain HTTP) one after another,
    and `hold` WebSockets held open `hold_for` s each, all through the lab's DNS."""
    return DnsClient(lab.dns_server, lab.service_name, lab.listen, lab.settings.server_name, lab.tls_context(),
                     clients=3, kinds=("https", "ws", "http"), hold=hold, hold_for=hold_for, pause=0.1,
                     max_seconds=200).start()


def measure(name: str, source: str, target: str, old: str, new: str, started: float, runs: list[Run],
            stats: Stats) -> tuple[Measured, float]:
    """The figures of a move, and when its retirement began (time.monotonic())."""
    steps = {k: v for r in runs for k, v in r.steps().items()}
    retire = steps["retire"]["start"]
    out = Measured(name, source, target, seconds=round(runs[-1].lines[-1][0] - started, 2),
                   steps={s: round(t["proven"] - started, 2) for s, t in steps.items() if "proven" in t})
    for side, address in (("old", old), ("new", new)):
        out.requests[side] = {"ok": stats.ok(address), "failed": stats.failed(address)}
        out.client_ips[side] = sorted({r.client_ip for r in stats.results if r.address == address and r.client_ip})
    on_old = [h for h in stats.held if h.address == old]
    out.held = {"old": len(on_old), "old_ended_by_client": len(stats.ended(old)), "new": len(stats.held) - len(on_old),
                "dropped_old": len(stats.dropped(old)), "dropped_new": len(stats.dropped(new))}
    out.held_at_retirement = [{"opened": round(h.opened - retire, 2),
                               "closed": None if h.closed is None else round(h.closed - retire, 2),
                               "reason": h.reason} for h in on_old if h.open_at(retire)]
    return out, retire


def report(capsys, measured: Measured, stats: Stats) -> None:
    FIGURES.append(asdict(measured))
    with capsys.disabled():
        print(f"\nmove {measured.move}: {measured.source} -> {measured.target} in {measured.seconds} s; steps proven "
              f"at {measured.steps}\n{stats.table()}\nrequests {measured.requests}; held WebSockets {measured.held}; "
              f"open on the old load balancer when retire began (seconds from it): {measured.held_at_retirement}")


def plan(lab: Lab, to: str) -> tuple[str, str]:
    """`python -m lab plan-move --to TO`: the command it printed, and the new load balancer's address."""
    command = lab_command(lab, "plan-move", "--to", to).strip().splitlines()[-1]
    assert command.endswith(f"bin/fab move --env {lab.env_file}"), command
    lab.use_running()
    target = lab.settings.moving_to
    assert target is not None
    return command, lab.address(target.load_balancer.name)


def promote(lab: Lab) -> None:
    """`python -m lab promote`, then a second of traffic on the promoted load balancer (its
    stand-in takes 127.0.0.1 too: a reload under load)."""
    lab_command(lab, "promote")
    lab.use_running()
    time.sleep(1)


def one_move(lab: Lab, capsys, to: str, header_before: bool, header_after: bool) -> Measured:
    """plan-move, the printed `fab move`, promote, with clients running; measured and checked."""
    source = described(lab.settings)
    old = lab.address()
    client = clients(lab)
    try:
        time.sleep(0.5)  # requests and held sockets on the old load balancer first
        started = time.monotonic()
        command, new = plan(lab, to)
        moved = run(command)
        assert moved.code == 0, moved.text
        # the new load balancer was proven by a request through each of its listeners (the lab's
        # DNS gives its name the stand-in's address) before DNS gave it any weight
        for port in (80, 443):
            assert re.search(rf"verified: a request through \S+:{port} was answered \(HTTP/1.1 \d+", moved.text), \
                moved.text
        promote(lab)
    finally:
        stats = client.stop()
    measured, retire = measure(to, source, described(lab.settings), old, new, started, [moved], stats)
    report(capsys, measured, stats)
    assert stats.failed() == 0, stats.table() + f"\n{dict(stats.errors())}"
    assert measured.requests["old"]["ok"] > 0 and measured.requests["new"]["ok"] > 0, measured
    assert stats.dropped() == [], [(h.address, h.reason) for h in stats.dropped()]
    assert measured.held_at_retirement == [], measured  # the drain ended: every held socket had moved
    assert measured.held["new"] > 0, measured
    assert not [r for r in stats.results if r.address == old and r.at > retire], "a request after the retirement"
    # each load balancer framed as it says, the new one from its first request: the app saw the
    # client (header on) or the load balancer (off)
    assert measured.client_ips == {"old": [CLIENT_SOURCE if header_before else "127.0.0.1"],
                                   "new": [CLIENT_SOURCE if header_after else "127.0.0.1"]}, measured
    return measured


def test_a_chain_of_moves_under_load_fails_no_request(lab, capsys):
    assert lab.settings.load_balancer.type == "classic" and not lab.settings.proxy_protocol
    header = False
    for to, kind_after, header_after in (("classic-on", "classic", True), ("network", "network", True),
                                         ("classic", "classic", True), ("classic-off", "classic", False)):
        one_move(lab, capsys, to, header, header_after)
        s = lab.settings
        assert (s.load_balancer.type, s.proxy_protocol, s.move_to) == (kind_after, header_after, None)
        assert awsapi.parameters.read_move(s).done
        header = header_after


def test_a_websocket_held_through_the_drain_bound_stops_the_move_and_cut_retires_it(lab, capsys):
    doc = yaml.safe_load(lab.env_file.read_text())
    doc["config"]["wsgate:dns"]["drainMax"] = 3
    write_atomically(lab.env_file, yaml.safe_dump(doc, sort_keys=False))
    lab.use_running()
    s = lab.settings
    source, old = described(s), lab.address()
    client = clients(lab, hold=1, hold_for=None)  # one WebSocket held until the client stops
    try:
        deadline = time.monotonic() + 10
        while not client.stats.held_open(old):
            assert time.monotonic() < deadline, client.stats.table()
            time.sleep(0.1)
        started = time.monotonic()
        command, new = plan(lab, "classic")  # the same kind under a new name
        stopped = run(command)
        assert stopped.code == 3, stopped.text
        held = re.search(r"connections are still open on (\S+)'s ports: (lab\d): port (\d+): 1", stopped.text)
        assert held and held[1] == s.load_balancer.name and int(held[3]) == s.ports.tls, stopped.text
        assert client.stats.held_open(old), "the held socket is still open: nothing was cut"
        cut = run(command + " --cut")
        assert cut.code == 0, cut.text
        record = awsapi.parameters.read_move(lab.settings)
        assert record.done and record.held == {held[2]: 1}, record
        deadline = time.monotonic() + 30  # the client sees the drop at its next echo (5 s timeout each)
        while not client.stats.dropped(old):
            assert time.monotonic() < deadline, client.stats.table()
            time.sleep(0.1)
        promoting = time.monotonic()  # the drop came before the lab moved on: the retirement cut it
        promote(lab)
    finally:
        stats = client.stop()
    measured, retire = measure("classic: a WebSocket held through drainMax, then --cut", source,
                               described(lab.settings), old, new, started, [stopped, cut], stats)
    report(capsys, measured, stats)
    assert stats.failed() == 0, stats.table()
    dropped = stats.dropped(old)
    assert len(dropped) == 1 and dropped[0].closed is not None, stats.table()
    assert retire <= dropped[0].closed < promoting, (retire, dropped[0], promoting)
    assert [h["reason"] for h in measured.held_at_retirement] == [dropped[0].reason]
    assert [h.address for h in stats.held] == [old, new]  # the client opened another, on the new one


# --- the lab's move plans, pure ---------------------------------------------------------------------

def test_each_planned_move_loads_and_its_promotion_is_the_new_load_balancer():
    from core.settings import from_config
    from lab.__main__ import move_config, next_name, promoted_config
    from tests.conftest import stack_config

    config = stack_config("lab")
    network = ("vpc-0123abcd", ["subnet-0123abcd"])
    ports = {"http": 18085, "tls": 18086, "health": 18082, "proxyHttp": 18087, "proxyTls": 18088}
    for to, kind_after, header in (("classic-on", "classic", True), ("classic-off", "classic", False),
                                   ("network", "network", True), ("classic", "classic", True)):
        moving = from_config("lab", move_config(config, to, "wsgate-lab-2", ports, network), "Pulumi.lab.yaml")
        target = moving.moving_to
        assert target and (target.load_balancer.type, target.proxy_protocol) == (kind_after, header), to
        assert moving.load_balancer.name == "wsgate-lab" and target.ports.health == moving.ports.health
        promoted = from_config("lab", promoted_config(move_config(config, to, "wsgate-lab-2", ports, network)), "x")
        assert (promoted.load_balancer, promoted.ports, promoted.proxy_protocol, promoted.move_to) == \
            (target.load_balancer, target.ports, header, None)
    # a network load balancer back to a Classic ELB: placed by availability zone, draining as it deregistered
    nlb = promoted_config(move_config(config, "network", "wsgate-lab-2", ports, network))
    back = from_config("lab", move_config(nlb, "classic", "wsgate-lab-3", {**ports, "http": 18089, "tls": 18090,
                                                                        "proxyHttp": 18091, "proxyTls": 18092}), "x")
    assert back.moving_to is not None
    lb = back.moving_to.load_balancer
    assert (lb.type, lb.availability_zones, lb.subnets, lb.vpc_id, lb.connection_draining) == \
        ("classic", ["us-east-1a"], [], None, back.load_balancer.deregistration_delay)
    assert next_name("wsgate-lab", set()) == "wsgate-lab-2"
    assert next_name("wsgate-lab-2", {"wsgate-lab-3"}) == "wsgate-lab-4"
