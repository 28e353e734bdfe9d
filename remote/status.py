"""`fab status`: what is live on each host, what the load balancer does, and the gate's view."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rich.markup import escape
from rich.table import Table

from core.errors import KitError
from core.gate import missing_backends
from core.plan import Remote, digest_of_link, parse_state
from core.probe import checks, header_request
from core.render import Tree
from core.settings import Host, Settings
from remote.probe import exchange, live
from remote.ssh import Ssh


def _host(settings: Settings, host: Host, tree: Tree, ssh: Ssh) -> dict:
    row = {"host": host.name, "instance": host.instance_id, "address": host.address, "rendered": tree.digest,
           "current": None, "live": None, "running": None, "proxy_protocol_ports": [], "probe": None, "error": None}
    try:
        conn = ssh.connect(host)
    except KitError as exc:
        row["error"] = str(exc)
        return row
    try:
        remote = Remote.of(settings, host)
        state = parse_state(ssh.run(conn, remote.inspect()).stdout)
        row["current"] = digest_of_link(state.get("current", ""))
        row["running"] = state.get("running") == "yes"
        address = settings.bind_of(host) or "127.0.0.1"
        seen = live(ssh, conn, address, settings.ports.health)
        row["live"] = seen.digest if seen else None
        for port in settings.ports.proxied:
            reply = exchange(ssh, conn, address, port, header_request(settings))
            if reply.status not in (None, 400):
                row["proxy_protocol_ports"].append(port)
        if row["live"]:
            problems = []
            for check in checks(settings):
                problem = check.judge(exchange(ssh, conn, address, check.port, check.request), settings, row["live"])
                if problem:
                    problems.append(problem)
            row["probe"] = problems or "ok"
    except KitError as exc:
        row["error"] = str(exc)
    finally:
        conn.close()
    return row


def gather(settings: Settings, hosts: list[Host], trees: dict[str, Tree], ssh: Ssh, parallel: int = 10) -> dict:
    from remote import aws

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        rows = list(pool.map(lambda h: _host(settings, h, trees[h.name], ssh), hosts))
    view: dict = {"env": settings.env, "hosts": rows}
    try:
        d = aws.describe(settings)
        record = aws.read_record(settings)
        backends = list(settings.load_balancer.instances) or [h.instance_id for h in hosts if h.instance_id]
        view["loadBalancer"] = None if d is None else {
            "name": d["LoadBalancerName"], "dnsName": d.get("DNSName"),
            "listeners": [f"{x['Listener']['Protocol']}:{x['Listener']['LoadBalancerPort']} -> "
                          f"{x['Listener']['InstanceProtocol']}:{x['Listener']['InstancePort']}"
                          for x in d.get("ListenerDescriptions", [])],
            "proxyProtocolPorts": aws.proxy_protocol_ports(settings),
            "instanceHealth": aws.instance_health(settings),
        }
        view["gate"] = {
            "wanted": settings.proxy_protocol,
            "record": None if record is None else {"writtenAt": record.written_at.isoformat(),
                                                    "ports": record.proxy_protocol_ports,
                                                    "instances": record.instances},
            "missing": missing_backends(settings.env, backends, list(settings.ports.proxied), record,
                                        None if record else f"no readiness record at {settings.parameter_path}"),
        }
    except KitError as exc:
        view["aws_error"] = str(exc)
    return view


def show(reporter, view: dict) -> None:
    t = Table(title=f"hosts of {view['env']}", title_justify="left")
    for col in ("host", "instance", "live", "rendered", "proxy_protocol", "probe"):
        t.add_column(col, overflow="fold")
    for r in view["hosts"]:
        if r["error"]:
            t.add_row(r["host"], r["instance"] or "-", "[red]?[/]", r["rendered"][:12], "?",
                      f"[red]{escape(r['error'])}[/]")
            continue
        same = r["live"] == r["rendered"]
        live_text = (r["live"] or "no answer")[:12]
        probe = r["probe"] if isinstance(r["probe"], str) else "; ".join(r["probe"] or ["-"])
        t.add_row(r["host"], r["instance"] or "-", f"[{'green' if same else 'yellow'}]{live_text}[/]",
                  r["rendered"][:12], ",".join(map(str, r["proxy_protocol_ports"])) or "off",
                  f"[{'green' if probe == 'ok' else 'red'}]{escape(probe)}[/]")
    reporter.out.print(t)
    if "aws_error" in view:
        reporter.message(f"[red]AWS: {escape(view['aws_error'])}[/]", markup=True)
        return
    lb = view["loadBalancer"]
    if lb is None:
        reporter.message("load balancer: not created yet (pulumi up)")
    else:
        reporter.message(f"load balancer {lb['name']} ({lb['dnsName']}): {', '.join(lb['listeners'])}")
        reporter.message(f"  ProxyProtocol policy on ports: {lb['proxyProtocolPorts'] or 'none'}")
        for instance, state in sorted(lb["instanceHealth"].items()):
            reporter.message(f"  {instance}: {state}")
    gate = view["gate"]
    if not gate["wanted"]:
        reporter.message("gate: proxy protocol not asked for (proxyProtocol: false)")
    elif gate["missing"]:
        reporter.message("gate: [yellow]closed[/] for: " + escape("; ".join(f"{i}: {why}" for i, why in gate["missing"].items())),
                         markup=True)
    else:
        reporter.message("gate: [green]open[/]: every backend is in the readiness record", markup=True)
