"""`fab status`: gather what is really there (each host over SSH, the load balancer through the
AWS API), let `core/doctor.py` judge it, and show every row with its verdict."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from core.doctor import (
    BAD,
    BROKEN,
    CLOSED,
    NEITHER,
    PLAIN,
    PROXY,
    BalancerFacts,
    HostFacts,
    balancer_of,
    balancer_problems,
    host_notes,
    host_problems,
    logged_script,
    parse_logged,
    probed_ports,
)
from core.errors import KitError
from core.listeners import network_listeners
from core.live import parse_state
from core.network import group_health, target_health
from core.probe import PROBE_HEADER, PROBE_HEADER_V2, PROBE_PATH, Check
from core.render import Tree
from core.session import Remote
from core.settings import Host, Settings
from remote.probe import exchange, live
from remote.ssh import PortClosed, Ssh

if TYPE_CHECKING:
    from awsapi.balancer import Traffic


def _port_mode(ssh: Ssh, conn, settings: Settings, address: str, port: int, expect: str) -> str:
    """How a port answers: with the PROXY header (PROXY), without it (PLAIN), or neither. On a
    network load balancer's hosts, CLOSED when nothing listens there (a proxy port is served only
    while proxy protocol is on); the header is then the v2 one that load balancer sends."""
    network = settings.load_balancer.type == "network"
    path = PROBE_PATH if expect == "redirect" else "/"
    for mode, preface in ((PROXY, PROBE_HEADER_V2 if network else PROBE_HEADER), (PLAIN, b"")):
        check = Check(mode, port, settings.server_name, path, preface, expect)
        try:
            reply = exchange(ssh, conn, address, port, check.exchange())
        except PortClosed:  # only a refused connect: a lost session is an error, not a closed port
            if not network:
                raise
            return CLOSED
        if check.judge(reply, settings, None) is None:
            return mode
    return NEITHER


def _host(settings: Settings, host: Host, tree: Tree, ssh: Ssh) -> HostFacts:
    facts = HostFacts(host.name, host.instance_id, tree.digest)
    try:
        conn = ssh.connect(host)
    except KitError as exc:
        facts.error = str(exc)
        return facts
    try:
        r = ssh.run(conn, Remote.of(settings, host).inspect())
        if not r.ok:
            raise KitError(f"inspecting the host failed: {(r.stderr or r.stdout).strip()[:200]}")
        state = parse_state(r.stdout)
        if state.get("root") == "missing":  # inspect creates nothing: a doctor changes nothing
            raise KitError(f"{Remote.of(settings, host).root} does not exist on the host: `fab rollout` creates "
                           "it (or nginx.root / the host's root names the wrong place)")
        facts.current, facts.nginx = state.get("current", ""), state.get("nginx", "no")
        facts.pid, facts.cmdline = state.get("pid", ""), state.get("cmdline", "")
        facts.locked_by = state.get("locked") or None
        address = settings.bind_of(host) or "127.0.0.1"
        seen = live(ssh, conn, address, settings.ports.health)
        facts.live = seen.digest if seen else None
        if facts.nginx != "no":
            # each port asked as the load balancer that uses it frames its traffic (a move: two)
            facts.ports = {p: _port_mode(ssh, conn, balancer_of(settings, p), address, p, expect)
                           for p, expect in probed_ports(settings).items()}
        _logged(settings, host, tree, ssh, conn, facts, own=[address, "127.0.0.1", "::1"])
    except KitError as exc:
        facts.error = str(exc)
    finally:
        conn.close()
    return facts


def _logged(settings: Settings, host: Host, tree: Tree, ssh: Ssh, conn, facts: HostFacts, own: list[str]) -> None:
    """What nginx logged since the release went live, per port (core.doctor.logged_script), but from
    `own` (where the kit's probes come from): one more command on the connection status has; a
    failure leaves a gap, not an error."""
    remote = Remote.of(settings, host)
    r = ssh.run(conn, remote.wrap(logged_script(remote.root, tree, own)))
    if not r.ok:
        facts.logged_gaps = [f"not read: {(r.stderr or r.stdout).strip()[:200]}"]
        return
    facts.logged, facts.logged_since, facts.logged_gaps = parse_logged(r.stdout)


def _balancer(settings: Settings, now: Traffic | None = None) -> BalancerFacts:
    """`now`: the traffic read the task made already (its network state is used, not read again)."""
    from awsapi import classic, clients, ec2  # botocore: only once the hosts were inspected

    if settings.load_balancer.type == "network":
        return _network_balancer(settings, now)
    d = classic.describe(settings)
    if d is None:
        return BalancerFacts(exists=False)
    registered = [i["InstanceId"] for i in d.get("Instances", [])]
    ingress, unknown = ec2.instance_ingress(settings, sorted(set(registered) | set(settings.load_balancer.instances)))
    return BalancerFacts(
        exists=True,
        listeners=[(x["Listener"]["Protocol"], x["Listener"]["LoadBalancerPort"], x["Listener"]["InstanceProtocol"],
                    x["Listener"]["InstancePort"]) for x in d.get("ListenerDescriptions", [])],
        header_ports=classic.header_ports(settings),
        registered=registered,
        health=classic.instance_health(settings),
        lab_endpoint=clients.is_lab(settings),
        security_groups=list(d.get("SecurityGroups", [])),
        ingress=ingress,
        unknown=unknown,
    )


def _network_balancer(settings: Settings, now: Traffic | None = None) -> BalancerFacts:
    """A network load balancer's facts: each listener with the target groups it forwards to now, the
    proxy ports among them (`header_ports`: they get PROXY v2), the instances in those groups and
    their health there."""
    from awsapi import clients, ec2, network

    state = now.state if now is not None else network.network_state(settings)
    if state is None:
        return BalancerFacts(exists=False)
    ingress, unknown = ec2.instance_ingress(settings,
                                            sorted(set(state.serving) | set(settings.load_balancer.instances)))
    health = group_health(state)
    return BalancerFacts(
        exists=True,
        # the instance side is the group's protocol: TCP (a TLS group would hide the header inside TLS)
        listeners=[(state.protocols.get(port, "?"), port, g.protocol, g.port)
                   for port, groups in state.listeners.items() for g in groups],
        header_ports=state.header_ports,
        registered=state.serving,
        present=list(state.present),
        health=target_health(health),
        groups=[{"listener": port, "group": g.name, "port": g.port, "proxyProtocolV2": g.proxy_protocol_v2,
                 "targets": health.get(g.name, {})}
                for port, groups in sorted(state.listeners.items()) for g in groups],
        lab_endpoint=clients.is_lab(settings),
        security_groups=list(state.security_groups),
        ingress=ingress,
        unknown=unknown,
        network=state.now(settings),
        warm=[x.port for x in network_listeners(settings) if x.warm_port in state.warm],
    )


def gather(settings: Settings, hosts: list[Host], trees: dict[str, Tree], ssh: Ssh, parallel: int = 10,
           now: Traffic | None = None) -> dict:
    """Every fact and every verdict, as one JSON-able view; view["ok"] only when all agree. `now`:
    the load balancer's traffic as the task read it to render (not read again)."""
    from awsapi import certificates, parameters

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        facts = list(pool.map(lambda h: _host(settings, h, trees[h.name], ssh), hosts))
    ssh.close()
    view: dict = {"env": settings.env}
    lb: BalancerFacts | None = None
    record, record_problem = None, None
    try:
        lb = _balancer(settings, now)
        try:
            record = parameters.read_record(settings)
        except KitError as exc:
            record_problem = str(exc)
        problems, notes, gate = balancer_problems(settings, lb, record, record_problem, time.time())
        try:  # what every TLS client gets from the live 443 listener: unusable, or expiring soon
            cert_problems, cert_notes = certificates.live_verdicts(settings)
        except KitError as exc:
            cert_problems, cert_notes = [], [f"certificate not checked: {exc}"]
        problems, notes = [*problems, *cert_problems], [*notes, *cert_notes]
        view["loadBalancer"] = {**asdict(lb), "type": settings.load_balancer.type, "problems": problems, "notes": notes}
        view["gate"] = {**gate, "record": None if record is None else {
            "writtenAt": record.written_at.isoformat(), "ports": record.proxy_protocol_ports,
            "plainPorts": record.plain_ports, "instances": record.instances}}
    except KitError as exc:
        view["loadBalancer"] = {"problems": [f"cannot read the load balancer: {exc}"], "notes": []}
        view["gate"] = None
    policy = lb.header_ports if lb and lb.exists else None
    # the ports the load balancer forwards to (not read: the ports a listener would forward to)
    used = [x[3] for x in lb.listeners] if lb and lb.exists else list(probed_ports(settings))
    beside = _beside_header_ports(settings)
    view["hosts"] = [{**asdict(f), "problems": host_problems(settings, f, policy, beside), "notes": host_notes(f, used)}
                     for f in facts]
    view["ok"] = not view["loadBalancer"]["problems"] and not any(h["problems"] for h in view["hosts"])
    return view


def _beside_header_ports(settings: Settings) -> dict[str, list[int] | None]:
    """Where each load balancer served beside loadBalancer (a move) sends the header now, by name
    (None: it could not be read; [] before it exists)."""
    from awsapi.balancer import header_ports

    out: dict[str, list[int] | None] = {}
    for b in settings.balancers[1:]:
        try:
            out[b.load_balancer.name] = header_ports(b)
        except KitError:
            out[b.load_balancer.name] = None
    return out


def _logged_cell(row: dict) -> str:
    """Per port, the connections closed for a broken PROXY header and the 400s (`-`: none logged)."""
    cells = [f"{port}: {n[BROKEN]} broken, {n[BAD]} x 400" for port, n in sorted(row["logged"].items(),
                                                                                  key=lambda kv: int(kv[0]))
             if n[BROKEN] or n[BAD]]
    return "; ".join(cells) or ("-" if row["logged_since"] else "?")


def show(reporter, view: dict) -> None:
    t = Table(title=f"hosts of {view['env']}", title_justify="left")
    for col in ("host", "instance", "live", "rendered", "reads PROXY on", "logged since live", "verdict"):
        t.add_column(col, overflow="fold")
    for r in view["hosts"]:
        reads = ",".join(str(p) for p, m in sorted(r["ports"].items()) if m == PROXY) or ("off" if r["ports"] else "?")
        verdict = "[green]ok[/]" if not r["problems"] else "[red]" + escape("; ".join(r["problems"])) + "[/]"
        t.add_row(escape(r["host"]), r["instance"] or "-", (r["live"] or "no answer")[:12], r["rendered"][:12],
                  reads, _logged_cell(r), verdict)
    reporter.out.print(t)
    for r in view["hosts"]:
        for note in r.get("notes", []):
            reporter.message(f"  note: {r['host']}: {note}")
    lb = view["loadBalancer"]
    if lb.get("exists"):
        routes = ", ".join(f"{a}:{b} -> {c}:{d}" for a, b, c, d in lb["listeners"])
        reporter.message(f"load balancer: listeners {routes}; "
                         + (f"PROXY v2 to ports {lb['header_ports'] or 'none'}" if lb["type"] == "network" else
                            f"ProxyProtocol policy on ports {lb['header_ports'] or 'none'}"))
        for g in lb.get("groups", []):
            targets = ", ".join(f"{i} {word}" for i, word in sorted(g["targets"].items())) or "no targets"
            reporter.message(f"  listener {g['listener']} -> {g['group']} (port {g['port']}, PROXY v2 "
                             f"{'on' if g['proxyProtocolV2'] else 'off'}): {targets}")
        for instance, state in sorted(lb["health"].items()):
            reporter.message(f"  {instance}: {state}")
    for note in lb.get("notes", []):
        reporter.message(f"  note: {note}")
    for problem in lb["problems"]:
        reporter.message(f"[red]load balancer: {escape(problem)}[/]", markup=True)
    if view.get("gate"):
        reporter.message(f"gate: {view['gate']['state']}: {view['gate']['message']}")
    reporter.message("[green]status: everything agrees[/]" if view["ok"] else "[red]status: problems found[/] "
                     "(what each verdict means: docs/troubleshooting.md#fab-status-verdicts)", markup=True)
