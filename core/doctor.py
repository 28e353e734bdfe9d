"""`fab status` judged: facts in (what each host runs and reads, what the load balancer has),
every disagreement out, each with what to do. Pure: `remote/status.py` gathers the facts.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from core.gate import plan_for
from core.listeners import NetworkListener, listeners, network_listeners
from core.live import digest_of_link
from core.network import ListenerNow, health_holds, network_forwarding, retire_waits
from core.record import ReadinessRecord
from core.render import Tree
from core.settings import Settings

PROXY, PLAIN, NEITHER = "proxy", "plain", "neither"  # how a port answers: with the header, without, or not at all
CLOSED = "closed"  # nothing listens on the port (read on a network load balancer's hosts only)
_ANSWERS = {PROXY: "reads the PROXY header", PLAIN: "does not read the PROXY header",
            NEITHER: "answers neither with nor without a PROXY header", CLOSED: "is not served"}


@dataclass
class HostFacts:
    host: str
    instance: str | None
    rendered: str
    error: str | None = None  # could not be reached or inspected
    nginx: str = "no"  # no | ours | foreign
    pid: str = ""
    cmdline: str = ""
    current: str = ""  # the `current` link (releases/<digest>)
    live: str | None = None  # the digest nginx answers with
    locked_by: str | None = None  # the run holding the rollout lock, if any
    ports: dict[int, str] = field(default_factory=dict)  # port -> PROXY | PLAIN | NEITHER | CLOSED (probed_ports)
    # what nginx logged since `current` last changed (logged_script): port -> {BROKEN: n, BAD: n}
    logged: dict[int, dict[str, int]] = field(default_factory=dict)
    logged_since: str = ""  # when `current` last changed, in the host's local time ("": unknown)
    logged_gaps: list[str] = field(default_factory=list)  # why a count may be short (a log too big, unreadable)


@dataclass(frozen=True)
class Ingress:
    """One inbound rule of a security group on a backend instance."""

    group: str  # sg-... (name)
    protocol: str  # tcp, udp, -1 (all)
    from_port: int | None
    to_port: int | None
    source: str  # a CIDR, a prefix list, or sg-...

    def opens(self, port: int) -> bool:
        if self.protocol == "-1":
            return True
        return self.protocol == "tcp" and (self.from_port or 0) <= port <= (self.to_port or 65535)


@dataclass
class BalancerFacts:
    exists: bool
    listeners: list[tuple[str, int, str, int]] = field(default_factory=list)  # protocol, port, instance protocol, port
    # backend ports that get the header now: classic, those with the ProxyProtocol policy; network,
    # the proxy ports whose target group (PROXY v2) a listener forwards to
    header_ports: list[int] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    health: dict[str, str] = field(default_factory=dict)  # instance -> InService / OutOfService (why)
    lab_endpoint: bool = False  # the lab's AWS endpoint (moto): keeps no listener instance protocol, knows no health
    security_groups: list[str] = field(default_factory=list)  # the load balancer's own
    ingress: dict[str, list[Ingress]] = field(default_factory=dict)  # backend instance -> its inbound rules
    unknown: list[str] = field(default_factory=list)  # backend instances EC2 does not know
    present: list[str] | None = None  # network: instances in any of the kit's groups (None: `registered`)
    # network: per listener, the groups it forwards to: {listener, group, port, proxyProtocolV2, targets}
    groups: list[dict] = field(default_factory=list)
    # network: each listener as the program reads it (NetworkState.now; None: not read), and the
    # listeners whose warm listener exists (their proxy group is health-checked: a switch only waits)
    network: dict[int, ListenerNow] | None = None
    warm: list[int] = field(default_factory=list)


def _switch_waits(s: Settings, lb: BalancerFacts, decision_ports: tuple[int, ...] | list[int],
                  join: tuple[str, ...]) -> dict[NetworkListener, str]:
    """Network listener -> why it is not on the group the gate moves it to yet (its proxy group, or
    back to its plain group): AWS does not say that group healthy yet while its warm listener has
    AWS check it (health_holds). Only those: a listener with no warm listener needs `pulumi up` to
    get one."""
    holds = health_holds(s, network_forwarding(decision_ports, s), lb.network or {}, join)
    return {x: holds[x.port] for x in network_listeners(s) if x.port in holds and x.port in lb.warm}


def host_problems(s: Settings, h: HostFacts, header_ports: list[int] | None,
                  beside_header_ports: dict[str, list[int] | None] | None = None) -> list[str]:
    """What is wrong with one host, each with what to do; [] when it agrees with everything.
    `header_ports`: where this load balancer sends the header now (None: unknown);
    `beside_header_ports`: the same for each other load balancer served during a move, by name
    (absent: unknown, judged by the settings)."""
    if h.error:
        return [f"cannot inspect: {h.error}"]
    out = []
    if h.nginx == "foreign":
        out.append(f"the pid file names an nginx wsgate did not start (pid {h.pid}: {h.cmdline}): hand the host over")
    elif h.nginx == "no":
        out.append("nginx is not running: run `fab rollout`")
    current = digest_of_link(h.current)
    if h.live and h.live != h.rendered:
        out.append(f"serves {h.live[:12]}, rendered {h.rendered[:12]}: run `fab rollout`")
    if h.live and current != h.live:
        out.append(f"`current` names {(current or 'nothing')[:12]} but nginx runs {h.live[:12]}: "
                   "a restart would load another config; run `fab rollout`")
    if h.nginx == "ours" and not h.live:
        out.append("the health port does not answer")
    if h.locked_by:
        out.append(f"a run holds the rollout lock ({h.locked_by})")
    balancers = s.balancers
    if len(balancers) == 1:
        return out + _port_problems(s, h.ports, header_ports)
    # during a move each port is judged by the load balancer that uses it (its own header ports)
    beside = beside_header_ports or {}
    for b in balancers:
        modes = {port: mode for port, mode in h.ports.items() if balancer_of(s, port) is b}
        theirs = header_ports if b is s else beside.get(b.load_balancer.name)
        out += _port_problems(b, modes, theirs)
    return out


def _port_problems(s: Settings, modes: dict[int, str], header_ports: list[int] | None) -> list[str]:
    port_problems = network_port_problems if s.load_balancer.type == "network" else classic_port_problems
    return port_problems(s, modes, header_ports)


def balancer_of(s: Settings, port: int) -> Settings:
    """The load balancer served (Settings.balancers) whose port this is, as whole settings (the
    first when none or several claim it: a shared health port). `fab status` asks a port how it
    answers framed as that load balancer frames it."""
    for b in s.balancers:
        if port in _probed(b):
            return b
    return s


def probed_ports(s: Settings) -> dict[int, str]:
    """The ports `fab status` asks how they answer, each with what it serves (`redirect` or `app`):
    classic, the proxied ports; network, the plain ports and the proxy ports beside them; of every
    load balancer served (both during a move)."""
    out: dict[int, str] = {}
    for b in s.balancers:
        out.update(_probed(b))
    return out


def _probed(s: Settings) -> dict[int, str]:
    """probed_ports of one load balancer."""
    p = s.ports
    if s.load_balancer.type == "network":
        return {p.http: "redirect", p.tls: "app", p.proxy_http: "redirect", p.proxy_tls: "app"}
    return {p.http: "redirect", p.tls: "app"}


def classic_port_problems(s: Settings, modes: dict[int, str], header_ports: list[int] | None) -> list[str]:
    """Classic: a port must read the header exactly where the policy is on (or, the load balancer
    unknown, where the settings ask for it)."""
    out = []
    want = PROXY if s.proxy_protocol else PLAIN
    for port, mode in sorted(modes.items()):
        if mode == NEITHER:
            out.append(f"port {port} answers neither with nor without a PROXY header")
        elif header_ports is not None and (mode == PROXY) != (port in header_ports):
            lb = "sends" if port in header_ports else "does not send"
            out.append(f"port {port} {'reads' if mode == PROXY else 'does not read'} the PROXY header but the "
                       f"load balancer {lb} it: every request through it fails "
                       + ("(attach the policy: `pulumi up` once every host is ready)" if mode == PROXY
                          else "(run `fab rollout` with proxyProtocol: true)"))
        elif mode != want and header_ports is None:
            out.append(f"port {port} {'reads' if mode == PROXY else 'does not read'} the PROXY header; the "
                       f"settings ask for {'it' if s.proxy_protocol else 'none'}: run `fab rollout`")
    return out


def network_port_problems(s: Settings, modes: dict[int, str], header_ports: list[int] | None) -> list[str]:
    """Network: the plain ports answer plain requests, always (their target groups send no header);
    a proxy port reads the header whenever a listener forwards to its group (`header_ports`: those ports
    now; None: unknown), and once proxy protocol is on. A proxy port nothing forwards to while
    proxy protocol is off may be served or not: nothing reaches it."""
    found = (_network_port_problem(s, port, mode, header_ports) for port, mode in sorted(modes.items()))
    return [problem for problem in found if problem]


def _network_port_problem(s: Settings, port: int, mode: str, header_ports: list[int] | None) -> str | None:
    p = s.ports
    plain = port in (p.http, p.tls)
    forwarded = header_ports is not None and port in header_ports  # a listener forwards to this proxy port's group
    if port in s.retired and mode in (CLOSED, PLAIN):  # its group retired (Settings.retiring): nothing reaches it
        return None
    if mode == NEITHER:
        return f"port {port} {_ANSWERS[mode]}" if plain or forwarded or s.proxy_protocol else None
    if plain:
        if mode == PLAIN:
            return None
        partner = p.proxy_http if port == p.http else p.proxy_tls  # its listener's proxy group's port
        why = " but its plain target group sends none" if mode == PROXY else ""
        fails = header_ports is not None and partner not in header_ports  # the listener forwards to this plain port
        # turning off: the listener goes back to this plain port
        back = mode == CLOSED and not s.proxy_protocol and header_ports is not None and partner in header_ports
        todo = ("run `fab rollout --apply`: it serves the plain ports again before the listeners move back"
                if back else "run `fab rollout`")
        return (f"port {port} {_ANSWERS[mode]}{why}"
                + (f": every request through it fails ({todo})" if fails else f" ({todo})"))
    if mode == PROXY:
        return None
    if forwarded:
        return (f"port {port} {_ANSWERS[mode]} but the load balancer sends it: every request through it fails "
                "(run `fab rollout` with proxyProtocol: true)")
    if s.proxy_protocol:
        return (f"port {port} {_ANSWERS[mode]}; the settings ask for the PROXY header there: run `fab rollout` "
                "(the gate keeps its listener on the plain target group until then)")
    return None


def balancer_problems(s: Settings, lb: BalancerFacts | None, record: ReadinessRecord | None,
                      record_problem: str | None, clock: float | None = None) -> tuple[list[str], list[str], dict]:
    """(problems, notes, the gate's view) for the load balancer, the gate computed exactly as
    the Pulumi program computes it (backends: loadBalancer.instances). `clock`: now, seconds since
    the epoch (a network plain group waiting to retire is said only with it)."""
    backends = list(s.load_balancer.instances)
    header_ports = list(lb.header_ports) if lb else []
    gated = plan_for(s, registered=lb.registered if lb else [], header_ports=header_ports, record=record,
                     record_problem=record_problem, present=lb.present if lb else None)
    decision = gated.decision
    gate = {"state": decision.state.value, "ports": list(decision.ports), "missing": decision.missing,
            "waiting": gated.waiting, "message": decision.message}
    problems: list[str] = []
    notes: list[str] = []
    if lb is None or not lb.exists:
        return [f"load balancer {s.load_balancer.name} does not exist: run `pulumi up`"], notes, gate
    waiting = _switch_waits(s, lb, decision.ports, gated.join) if lb.network is not None else {}
    # turning off, a listener still on its proxy group while AWS checks its plain group: the kit's pace
    going_back = {x.proxy.port for x in waiting if not s.proxy_protocol}
    if decision.warn or (not s.proxy_protocol and not set(header_ports) <= going_back):
        problems.append(f"gate {decision.state.value}: {decision.message}")
    if s.retired:
        notes.append(f"plain port(s) {', '.join(map(str, sorted(s.retired)))} retired: their listeners forward to "
                     "the proxy groups and the plain groups hold no target; the hosts no longer serve them")
    if s.load_balancer.type == "network":
        # a listener forwards to its proxy group when the decision covers that group's port
        # (core.network.network_forwarding)
        want_ports = sorted(set(decision.ports) & set(s.proxy_ports))
        now = "the listeners send PROXY v2 to ports"
    else:
        want_ports, now = list(decision.ports), "the ProxyProtocol policy is on ports"
    # a listener waiting for the health of the group it moves to (either way) is where it should be for now
    if sorted(lb.header_ports) != want_ports and not (
            waiting and set(lb.header_ports) ^ set(want_ports) <= {x.proxy.port for x in waiting}):
        problems.append(f"{now} {lb.header_ports or 'none'}, the gate wants {want_ports or 'none'}: run `pulumi up`")
    notes += [waiting[x] for x in sorted(waiting, key=lambda x: x.port)]
    if lb.network is not None and clock is not None:
        waits = retire_waits(s, network_forwarding(decision.ports, s), lb.network, clock)
        notes += [waits[port] for port in sorted(waits)]
    for protocol, port, instance_protocol, instance_port in lb.listeners:
        if instance_protocol.upper() != "TCP":
            if lb.lab_endpoint:
                notes.append(f"listener {protocol}:{port}: instance protocol not checked (this AWS endpoint "
                             f"reports {instance_protocol} whatever was set)")
            elif s.proxy_protocol:
                problems.append(f"listener {protocol}:{port} -> {instance_protocol}:{instance_port}: the instance "
                                "protocol must be TCP for the PROXY header to reach nginx")
    problems += listener_problems(s, lb)
    problems += exposure_problems(list(s.proxy_ports), lb.security_groups, lb.ingress)
    problems += unnamed_problems(s, lb)
    for instance in lb.unknown:
        if lb.lab_endpoint:
            notes.append(f"{instance}: security groups not checked (this AWS endpoint runs no instances)")
        else:
            problems.append(f"{instance}: EC2 does not know this instance (its security groups cannot be checked)")
    for instance in backends:
        if instance in gated.waiting:
            problems.append(f"{instance} {gated.waiting[instance]}")
        elif instance not in lb.registered:
            problems.append(f"{instance} is not registered with the load balancer: run `pulumi up`")
        elif instance not in lb.health and lb.lab_endpoint:
            notes.append(f"{instance}: health not reported by this AWS endpoint (it runs no instances)")
        elif not lb.health.get(instance, "").startswith("InService"):
            problems.append(f"{instance} is {lb.health.get(instance) or 'of unknown health'}")
    return problems, notes, gate


def listener_problems(s: Settings, lb: BalancerFacts) -> list[str]:
    """Every listener the settings declare exists (a certificate AWS refused leaves no 443 listener), and
    a Classic one forwards to the port the hosts serve it on (it changes only by delete and create)."""
    have = {port: (protocol, instance_port) for protocol, port, _, instance_port in lb.listeners}
    out = []
    for want in listeners(s):
        key = "ports.http" if want.lb_port == 80 else "ports.tls"
        if want.lb_port not in have:
            why = (" (a certificate AWS refused, not issued or in another region, leaves none: check "
                   "loadBalancer.certificateArn)" if want.protocol == "ssl" else "")
            out.append(f"no listener on port {want.lb_port}: nothing reaches the hosts through it{why}; "
                       "run `pulumi up`")
        elif s.load_balancer.type == "classic" and have[want.lb_port][1] != want.instance_port:
            protocol, port = have[want.lb_port]
            out.append(f"listener {protocol}:{want.lb_port} forwards to instance port {port}, which the hosts do "
                       f"not serve ({key} is {want.instance_port}): every request through it fails; `pulumi up` "
                       f"recreates it on {want.instance_port} (new connections refused in between, open "
                       f"WebSockets cut), or set {key} back to {port} and run `fab rollout`")
    return out


def unnamed_problems(s: Settings, lb: BalancerFacts) -> list[str]:
    """An instance the load balancer has that loadBalancer.instances does not name (an Auto Scaling
    group, the console): no rollout reaches it, and the gate's proof does not cover it."""
    named = set(s.load_balancer.instances)
    header = f" and the PROXY header on ports {sorted(lb.header_ports)}" if lb.header_ports else ""
    return [f"{instance} is registered with the load balancer but loadBalancer.instances does not name it (an "
            f"Auto Scaling group, the console?): no rollout reaches or proves it, yet it gets traffic{header}; "
            "add it to loadBalancer.instances (and the hosts) and run `fab rollout`, or deregister it"
            for instance in sorted((set(lb.registered) | set(lb.present or [])) - named)]


def exposure_problems(ports: list[int], lb_groups: list[str], ingress: dict[str, list[Ingress]]) -> list[str]:
    """Every rule on a backend instance that lets anything but the load balancer reach a port
    that reads the PROXY header: whoever reaches it can claim any client address."""
    out = []
    for instance, rules in sorted(ingress.items()):
        for rule in rules:
            opened = [p for p in ports if rule.opens(p)]
            if opened and rule.source not in lb_groups:
                out.append(f"{instance}: security group {rule.group} opens port(s) {', '.join(map(str, opened))} to "
                           f"{rule.source}, beyond the load balancer: anyone there can forge a PROXY header "
                           "(remove the rule; the kit's instance group admits the load balancer only)")
    return out


# --- the hosts' own evidence: what nginx logged since the release went live -------------------

BROKEN, BAD = "brokenHeader", "badRequest"  # closed while reading the PROXY header; answered 400
LOG_BYTES = 8 * 1024 * 1024  # of each log, only its last 8 MiB are read
LOG_SECONDS = 10  # each log's count is cut off after this long
_LOG_DIRECTIVE = re.compile(r"^\s*(error_log|access_log)\s+([^\s;]+)", re.MULTILINE)
# Both leave out connections from the host itself (`own`): the kit's own probes, over SSH.
# nginx's error log: an entry starts with its local time; the one for a connection closed while
# reading the PROXY header ends (maybe lines later: the bytes it got are quoted raw) with
# "while reading PROXY protocol, client: C, server: ADDRESS:PORT"
_ERROR_AWK = r"""
BEGIN { split(own, o, " "); for (i in o) self[o[i]] = 1 }
/^[0-9][0-9][0-9][0-9]\/[0-9][0-9]\/[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9] / { t = substr($0, 1, 19) }
/ while reading PROXY protocol, client: .*, server: / {
  c = $0; sub(/.* while reading PROXY protocol, client: /, "", c); sub(/, server: .*/, "", c)
  p = $0; sub(/.*, server: /, "", p); sub(/.*:/, "", p); sub(/[^0-9].*/, "", p)
  if (t >= since && p != "" && !(c in self)) n[p]++
}
END { for (p in n) print "brokenHeader", p, n[p] }
"""
# elb_log (nginx/http.d/00-base.conf.j2): ... [$time_local] "$request" $status ... $server_port $remote_addr
_ACCESS_AWK = r"""
BEGIN { split(own, o, " "); for (i in o) self[o[i]] = 1 }
/" 400 [0-9]+ "/ {
  if (!match($0, /\[[0-9][0-9]\/[A-Z][a-z][a-z]\/[0-9][0-9][0-9][0-9]:[0-9][0-9]:[0-9][0-9]:[0-9][0-9]/)) next
  d = substr($0, RSTART + 1, RLENGTH - 1)
  m = (index("JanFebMarAprMayJunJulAugSepOctNovDec", substr(d, 4, 3)) + 2) / 3
  t = sprintf("%s/%02d/%s %s", substr(d, 8, 4), m, substr(d, 1, 2), substr(d, 13, 8))
  if (t >= since && $(NF - 1) ~ /^[0-9]+$/ && !($NF in self)) n[$(NF - 1)]++
}
END { for (p in n) print "badRequest", p, n[p] }
"""


def log_files(tree: Tree) -> tuple[list[str], list[str]]:
    """(error logs, access logs) as the rendered config names them (relative: under ROOT, nginx's -p)."""
    found: dict[str, set[str]] = {"error_log": set(), "access_log": set()}
    for name, text in tree.files.items():
        if name.endswith(".conf"):
            for directive, path in _LOG_DIRECTIVE.findall(text):
                if path not in ("off", "stderr") and not path.startswith("syslog:"):
                    found[directive].add(path)
    return sorted(found["error_log"]), sorted(found["access_log"])


def logged_script(root: str, tree: Tree, own: list[str]) -> str:
    """A POSIX sh script for the host: since when `current` was last swapped (its own mtime: the last
    rollout or rollback), per port, the connections nginx closed while reading the PROXY header and
    the 400s it answered, but those from `own` (the host's addresses the kit probes from). Bounded:
    the last LOG_BYTES of each log, LOG_SECONDS each."""
    errors, accesses = log_files(tree)
    peers = shlex.quote(" ".join(own))

    def each(paths: list[str], awk: str) -> str:
        return "".join(
            f"f={shlex.quote(path)}\n"
            "if [ ! -e \"$f\" ]; then :; elif [ ! -r \"$f\" ]; then echo \"unreadable $f\"; else\n"
            f"  [ \"$(wc -c < \"$f\")\" -gt {LOG_BYTES} ] && echo \"partial $f\"\n"
            f"  tail -c {LOG_BYTES} \"$f\" | timeout {LOG_SECONDS} awk -v since=\"$since\" -v own={peers} "
            f"{shlex.quote(awk)} || echo \"unread $f\"\n"
            "fi\n" for path in paths)

    return (f"cd {shlex.quote(root)} || exit 0\n"
            "t=$(stat -c %Y current 2>/dev/null) || exit 0\n"
            "since=$(date -d \"@$t\" '+%Y/%m/%d %H:%M:%S') || exit 0\n"
            "echo \"since $since\"\n" + each(errors, _ERROR_AWK) + each(accesses, _ACCESS_AWK))


def parse_logged(text: str) -> tuple[dict[int, dict[str, int]], str, list[str]]:
    """`logged_script`'s output: (port -> counts, since, gaps)."""
    counts: dict[int, dict[str, int]] = {}
    since, gaps = "", []
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "since":
            since = rest
        elif word in (BROKEN, BAD) and len(rest.split()) == 2 and all(x.isdigit() for x in rest.split()):
            port, n = map(int, rest.split())
            per = counts.setdefault(port, {BROKEN: 0, BAD: 0})
            per[word] += n
        elif word in ("partial", "unreadable", "unread"):
            gaps.append({"partial": f"{rest}: only its last {LOG_BYTES // (1024 * 1024)} MiB read",
                         "unreadable": f"{rest}: not readable by the SSH user (set ssh.sudo)",
                         "unread": f"{rest}: not read within {LOG_SECONDS}s"}[word])
    return counts, since, gaps


def host_notes(h: HostFacts, used: list[int]) -> list[str]:
    """The host's own evidence that it and the load balancer disagree, on the ports the load balancer
    forwards to (`used`). Notes, not problems: a Classic cutover's window leaves such lines too."""
    since = f"since {h.logged_since}" if h.logged_since else "since `current` last changed"
    out = []
    for port in sorted(set(h.logged) & set(used)):
        broken, bad = h.logged[port].get(BROKEN, 0), h.logged[port].get(BAD, 0)
        if broken:
            out.append(f"port {port}: nginx closed {broken} connection(s) without a valid PROXY header {since} "
                       "(`broken header` in its error log): the load balancer sent none there, or something else "
                       "reaches the port; if it grows outside a cutover window, compare the header ports with "
                       "the port's setting (`pulumi up`) and the security groups")
        if bad:
            out.append(f"port {port}: nginx answered {bad} request(s) with 400 {since}: a PROXY header on a port "
                       "that does not read it (the load balancer sends it: `fab rollout` with proxyProtocol: "
                       "true), or malformed requests; if it grows outside a cutover window, run `fab rollout`")
    return out + [f"logs: {gap}" for gap in h.logged_gaps]
