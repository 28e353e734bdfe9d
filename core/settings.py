"""The one settings model: read from `Pulumi.<env>.yaml`, validated here, used by every half.

The Pulumi program, the `fab` tasks and the nginx renderer all take a `Settings`; none of
them reads the stack file on its own. Every value that ends up in nginx syntax is checked
here against a strict pattern, so a value can never inject a directive.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from core.errors import SettingsError
from core.files import Unreadable, read_text

PROJECT = "wsgate"  # Pulumi project name: the namespace of our keys in Pulumi.<env>.yaml

# AWS's default quotas for one load balancer, as its quota pages name them (docs/settings.md#aws-quotas);
# adjustable through Service Quotas (loadBalancer.raisedQuotas).
CLASSIC_INSTANCES_QUOTA = 1000  # "Registered Instances per Classic Load Balancer"
TARGET_GROUP_QUOTA = 1000  # "Targets per target group per Region (instances or IP addresses)"
NLB_TARGETS_QUOTA = 3000  # "Targets per Network Load Balancer"
NLB_CROSS_ZONE_TARGETS_QUOTA = 500  # the same with cross-zone load balancing on, whatever the zones
# A network load balancer's instance is in up to 4 of the kit's groups at once (the plain and the
# proxy group of each of its two listeners, during a switch), and AWS counts a target registered
# in N groups as N targets.
KIT_TARGET_GROUPS = 4

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_ENV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _dns_name(value: str) -> str:
    if len(value) > 253 or not _DNS.match(value):
        raise ValueError("not a valid DNS name (letters, digits, hyphens and dots only)")
    return value.lower()


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"not a CIDR ({exc})") from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IP address") from None


def _host(value: str) -> str:
    try:
        return _ip(value)
    except ValueError:
        return _dns_name(value)


def _path(value: str) -> str:
    if not _PATH.match(value) or "//" in value:
        raise ValueError("not a plain path (letters, digits, . _ / + - only)")
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return _path(value)


def _root(value: str) -> str:
    """An nginx root without a trailing slash: the host compares `-c ROOT/current/nginx.conf` with
    what the pid's command line says (a systemd drop-in written from the docs), character for character."""
    return _absolute_path(value).rstrip("/") or "/"


def _user(value: str) -> str:
    if not _USER.match(value):
        raise ValueError("not a valid user name")
    return value


def _upstream(value: str) -> str:
    """`host:port`, `[v6]:port` or `unix:/path`: the forms nginx's `server` takes."""
    if value.startswith("unix:"):
        _absolute_path(value[5:])
        return value
    m = re.match(r"^(\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$", value)
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ValueError("not host:port, [ipv6]:port or unix:/path")
    if m["v6"]:
        if ipaddress.ip_address(m["v6"]).version != 6:
            raise ValueError("brackets are for IPv6 addresses")
    else:
        _host(m["host"])
    return value


_TARGET = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:@\[\]\s]+))"
                     r"(?::(?P<port>[^:]*))?$")


def target(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (host: a DNS name, an IPv4 address or `[IPv6]`) -> (user, host, port)."""
    m = _TARGET.match(spec.strip())
    if not m:
        raise ValueError(f"{spec!r} is not [user@]host[:port] (an IPv6 address goes in brackets)")
    if m["user"]:
        _user(m["user"])
    if m["v6"]:
        try:
            if ipaddress.ip_address(m["v6"]).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{spec!r}: brackets are for IPv6 addresses") from None
        host = m["v6"]
    else:
        host = _host(m["host"])
    port = m["port"]
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{spec!r}: the port must be a number from 1 to 65535")
    return m["user"], host, int(port) if port else None


def _gateway(value: str) -> str:
    """A bastion, or a chain of them (`a,b`, as ssh's ProxyJump), each `[user@]host[:port]`."""
    for hop in value.split(","):
        target(hop)
    return value


def _not_bool(value: Any) -> Any:
    """A number field refuses YAML's true/false (pydantic would read them as 1 and 0: `http: yes`, port 1)."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a boolean: give a number")
    return value


NotBool = BeforeValidator(_not_bool)


def _worker_processes(value: Any) -> int | str:
    """nginx's worker_processes: `auto` or a number from 1 to 1024 (also as a string, as `pulumi config set` writes)."""
    if value == "auto":
        return value
    if not isinstance(value, bool) and isinstance(value, (int, str)) and str(value).strip().isdigit() \
            and 1 <= int(value) <= 1024:
        return int(value)
    raise ValueError("not auto or a number of processes from 1 to 1024")


def _pattern(regex: str, what: str):
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"not a valid {what}")
        return value

    return AfterValidator(check)


DnsName = Annotated[str, AfterValidator(_dns_name)]
Cidr = Annotated[str, AfterValidator(_cidr)]
IpAddress = Annotated[str, AfterValidator(_ip)]
HostName = Annotated[str, AfterValidator(_host)]
PlainPath = Annotated[str, AfterValidator(_path)]
AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
RootPath = Annotated[str, AfterValidator(_root)]
UserName = Annotated[str, AfterValidator(_user)]
Upstream = Annotated[str, AfterValidator(_upstream)]
Gateway = Annotated[str, AfterValidator(_gateway)]
Port = Annotated[int, NotBool, Field(ge=1, le=65535)]
Seconds = Annotated[int, NotBool, Field(gt=0)]
InstanceId = Annotated[str, _pattern(r"^i-([0-9a-f]{8}|[0-9a-f]{17})$", "EC2 instance ID (i-0123456789abcdef0)")]
SubnetId = Annotated[str, _pattern(r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$", "subnet ID")]
VpcId = Annotated[str, _pattern(r"^vpc-([0-9a-f]{8}|[0-9a-f]{17})$", "VPC ID")]
CertificateArn = Annotated[
    str,
    _pattern(
        r"^arn:aws(-[a-z]+)*:(acm:[a-z0-9-]+:\d{12}:certificate/[A-Za-z0-9-]+"
        r"|iam::\d{12}:server-certificate/[A-Za-z0-9+=,.@_/-]+)$",
        "ACM or IAM certificate ARN",
    ),
]
LbName = Annotated[str, _pattern(r"^(?!-)[A-Za-z0-9-]{1,32}(?<!-)$",
                                 "Classic ELB name (1-32 letters, digits, hyphens)")]
ParameterPath = Annotated[str, _pattern(r"^(/[A-Za-z0-9_.-]+){2,}$", "Parameter Store path (/a/b, two levels or more)")]
HostedZoneId = Annotated[str, AfterValidator(lambda v: v.removeprefix("/hostedzone/")),
                         _pattern(r"^(/hostedzone/)?[A-Z0-9]{1,32}$", "Route 53 hosted zone ID (Z0123456789ABC)")]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class Ports(Model):
    """Instance ports nginx listens on."""

    PLAIN: ClassVar[tuple[str, ...]] = ("http", "tls", "health")
    PROXY: ClassVar[tuple[str, ...]] = ("proxy_http", "proxy_tls")  # network load balancer only

    http: Port = 80  # behind the TCP:80 listener: redirects to https
    tls: Port = 81  # behind the SSL:443 listener: the app (TLS ends at the load balancer)
    health: Port = 8081  # plain HTTP, never PROXY: the load balancer's health check
    # Network load balancer only: the same two services with `proxy_protocol`, beside the plain
    # ports, behind the listeners' proxy target groups (PROXY v2). The gate moves a listener
    # between its plain and its proxy group; a port never changes its mind about the header.
    proxy_http: Port = 82
    proxy_tls: Port = 83

    @model_validator(mode="after")
    def _distinct(self) -> Ports:
        # The proxy ports count here where they are set; their defaults are checked by Settings
        # for a network load balancer only (a classic environment never uses them).
        problem = self.clash(self.PLAIN + tuple(n for n in self.PROXY if n in self.model_fields_set))
        if problem:
            raise ValueError(problem)
        return self

    def clash(self, names: tuple[str, ...]) -> str | None:
        """Why two of these ports are one (None: they are distinct)."""
        seen: dict[int, str] = {}
        for name in names:
            port = getattr(self, name)
            if port in seen:
                return f"port {port} is used by both ports.{to_camel(seen[port])} and ports.{to_camel(name)}"
            seen[port] = name
        return None

    @property
    def proxied(self) -> tuple[int, int]:
        """The ports the ProxyProtocol policy covers."""
        return (self.http, self.tls)


class AccessLogs(Model):
    bucket: DnsName
    prefix: PlainPath = "elb"
    interval: Literal[5, 60] = 60


NLB_TLS_IDLE_TIMEOUT = 350  # a network load balancer's TLS listener: fixed, not configurable


class LoadBalancer(Model):
    """The load balancer in front of the hosts (Pulumi owns it): a Classic ELB, or a Network
    Load Balancer (ELBv2) with a plain and a proxy target group per listener."""

    name: LbName
    type: Literal["classic", "network"] = "classic"
    certificate_arn: CertificateArn
    subnet_cidrs: list[Cidr] = Field(min_length=1)  # where the ELB connects from: set_real_ip_from
    subnets: list[SubnetId] = []
    availability_zones: list[str] = []
    vpc_id: VpcId | None = None
    internal: bool = False
    ssl_policy: Annotated[str, _pattern(r"^[A-Za-z0-9-]+$", "ELB security policy name")] = (
        "ELBSecurityPolicy-TLS-1-2-2017-01"
    )
    # classic: 1-3600; network: the TCP listener's, 60-6000 (its TLS listener's is fixed at 350)
    idle_timeout: Annotated[int, NotBool, Field(ge=1)] = 300
    allowed_cidrs: list[Cidr] = ["0.0.0.0/0"]  # who may reach the listeners 80/443
    instances: list[InstanceId] = []
    cross_zone: bool = True
    raised_quotas: bool = False  # the account's load balancer quotas were raised: skip AWS's default ones
    connection_draining: Annotated[int, NotBool, Field(ge=0, le=3600)] = 300  # classic; 0: off
    deregistration_delay: Annotated[int, NotBool, Field(ge=0, le=3600)] = 30  # network: seconds a leaving target drains
    # network: the least seconds the hosts keep reading the header after the listeners left the proxy
    # groups (a listener change reaches the load balancer's nodes over time: users report about 75 s)
    switch_drain: Annotated[int, NotBool, Field(ge=1, le=3600)] = 75
    # network: the warm listener of the TCP:80 listener's proxy group listens here, the TLS:443
    # one's on the next port (1024-65534: never a listener's own 80 or 443); a TCP listener nobody
    # can reach that makes AWS health-check a proxy group before a listener switches to it
    warm_port: Annotated[int, NotBool, Field(ge=1024, le=65534)] = 64080
    # network, TLS listener: never h2 (nginx would get cleartext h2 on a plain HTTP/1.1 port)
    alpn_policy: Literal["None", "HTTP1Only"] = "HTTP1Only"
    access_logs: AccessLogs | None = None
    tags: dict[str, str] = {}
    # Who applies the stack for `fab rollout --apply`: `pulumi` (the Automation API), or a
    # `module:Class` implementing remote.applier.Applier (the lab names its own).
    applier: Annotated[str, _pattern(r"^(pulumi|[a-z_][a-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$",
                                     "applier (pulumi, or module:Class)")] = "pulumi"

    @field_validator("idle_timeout")
    @classmethod
    def _idle_range(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("type") == "network":
            if not 60 <= value <= 6000:
                raise ValueError(f"a network load balancer's TCP listener takes 60-6000 seconds (its TLS listener "
                                 f"is fixed at {NLB_TLS_IDLE_TIMEOUT})")
        elif value > 3600:
            raise ValueError("Input should be less than or equal to 3600")
        return value

    @model_validator(mode="after")
    def _placement(self) -> LoadBalancer:
        if self.type == "network":
            problems = []
            if self.availability_zones:
                problems.append("a network load balancer is placed by subnets, not availabilityZones")
            elif not self.subnets:
                problems.append("a network load balancer needs subnets (one per availability zone)")
            if not self.vpc_id:
                problems.append("a network load balancer needs vpcId (the VPC of its target groups and security "
                                "groups)")
            if problems:
                raise ValueError("; ".join(problems))
            return self
        if bool(self.subnets) == bool(self.availability_zones):
            raise ValueError("set exactly one of subnets (in a VPC) or availabilityZones")
        return self


ALIAS_TTL = 60  # what resolvers get for an alias record to a load balancer: the load balancer's own TTL


class Dns(Model):
    """The service's name in a Route 53 hosted zone, as code: one weighted alias record per load
    balancer (`evaluateTargetHealth` on). What moves clients from one load balancer to another
    (`fab move`, docs/moving.md)."""

    zone_id: HostedZoneId
    name: DnsName  # the service's name, inside the zone
    # How long resolvers and clients may hold an answer: what `fab move` waits after the last
    # weight change before it counts connections. AWS gives alias records the load balancer's
    # 60 s; a lower value is for the lab's DNS only (a test endpoint in aws:endpoints).
    ttl: Annotated[int, NotBool, Field(ge=1, le=86400)] = ALIAS_TTL
    # The share of the weight (percent) the new load balancer gets at each step; the last is 100.
    steps: list[Annotated[int, NotBool, Field(ge=1, le=100)]] = [100]
    pause: Seconds | None = None  # between two steps (default: ttl)
    quiet: Seconds = 30  # the drain: no connection on the old load balancer's ports for this long
    drain_max: Seconds = 900  # the drain's bound: past it the open connections are shown, nothing cut
    # The DNS server (host:port) `fab move` asks for a load balancer's address, to prove it with a
    # request through each listener (default: the system's resolver; the lab names its own).
    resolver: Annotated[str, AfterValidator(lambda v: _upstream(v) and v)] | None = None
    # Where the controller reaches each listener for that proof, when not on the listener's own
    # port (80, 443): the lab's stand-ins listen on high ports.
    listener_ports: dict[Literal[80, 443], Port] = {}

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:], strict=False)) or not value or value[-1] != 100:
            raise ValueError("steps must rise and end at 100 (percent of the weight on the new load balancer)")
        return value

    @property
    def pause_seconds(self) -> int:
        return self.pause or self.ttl


class MoveTo(Model):
    """The load balancer being moved to, beside `loadBalancer` (the one serving now): its own kind,
    name, listeners, ports and proxy protocol. The hosts serve both at once while `fab move` runs."""

    load_balancer: LoadBalancer
    proxy_protocol: bool = False
    ports: Ports


class App(Model):
    """The WebSocket service behind nginx on each host."""

    upstreams: list[Upstream] = Field(min_length=1)


class Nginx(Model):
    """How nginx runs on the hosts. Relative paths are relative to `root` (nginx's -p prefix)."""

    binary: AbsolutePath = "/usr/sbin/nginx"
    root: RootPath = "/etc/nginx/wsgate"  # releases/, current -> releases/<digest>, previous
    pid_file: PlainPath = "/run/nginx.pid"
    log_dir: PlainPath = "/var/log/nginx"
    temp_dir: PlainPath = "/var/lib/nginx"
    user: UserName | None = "www-data"  # worker user; null when the master does not run as root
    bind: IpAddress | None = None  # listen address; null: all addresses
    worker_processes: Annotated[int | str, PlainValidator(_worker_processes)] = "auto"
    worker_connections: Annotated[int, NotBool, Field(ge=16, le=1_000_000)] = 4096
    worker_shutdown_timeout: Seconds = 120  # old workers' grace for open WebSockets after a reload
    proxy_connect_timeout: Seconds = 5
    proxy_read_timeout: Seconds | None = None  # default: load balancer idle timeout + 60
    proxy_send_timeout: Seconds | None = None  # default: load balancer idle timeout + 60


class Ssh(Model):
    """How `fab` reaches the hosts. Host entries may override user, port, identity and gateway."""

    user: UserName | None = None  # default: ~/.ssh/config, then the local user
    port: Port | None = None  # default: ~/.ssh/config, then 22
    identity_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"  # host keys are checked strictly against this file
    config_file: str | None = "~/.ssh/config"  # honoured when it exists; null: ignore
    gateway: Gateway | None = None  # bastion, as [user@]host[:port] (a chain: a,b)
    connect_timeout: Seconds = 10
    command_timeout: Seconds = 120
    # a host's session (and its rollout lock) ends this long after the controller is gone
    idle_timeout: Annotated[int, NotBool, Field(ge=2)] = 30
    sudo: bool = False  # run remote commands with `sudo -n` (login user is not root)


class Host(Model):
    """One backend host reached over SSH (used by the `fab` tasks)."""

    name: Annotated[str, _pattern(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", "host name")]
    address: HostName
    instance_id: InstanceId | None = None
    ssh_user: UserName | None = None
    ssh_port: Port | None = None
    identity_file: str | None = None
    gateway: Gateway | None = None
    bind: IpAddress | None = None  # overrides nginx.bind for this host
    root: RootPath | None = None  # overrides nginx.root for this host


class Record(Model):
    """Where `fab rollout` writes the readiness record that the gate reads."""

    parameter_path: ParameterPath | None = None  # default: /wsgate/<env>/readiness


class Aws(Model):
    """The `aws:` keys of the stack file that the Fabric half needs too."""

    region: Annotated[str, _pattern(r"^[a-z]{2}(-[a-z]+)+-\d$", "AWS region")]
    endpoints: dict[str, str] = {}  # service -> URL (the lab's loopback AWS endpoint)


class Settings(Model):
    env: Annotated[str, _pattern(_ENV.pattern, "environment name")]
    server_name: DnsName
    proxy_protocol: bool = False
    ports: Ports = Ports()
    load_balancer: LoadBalancer
    # Never from a stack file: the plain ports the load balancer has retired (network, proxy
    # protocol on), read from AWS by the tasks (`retiring`): the hosts stop serving them.
    _retired: frozenset[int] = PrivateAttr(default=frozenset())
    app: App
    nginx: Nginx = Nginx()
    hosts: list[Host] = []
    discover: bool = False  # hosts: the instances registered with the load balancer (AWS API)
    ssh: Ssh = Ssh()
    record: Record = Record()
    aws: Aws
    dns: Dns | None = None
    move_to: MoveTo | None = None
    _target: Settings | None = PrivateAttr(default=None)  # move_to as whole settings (Settings.moving_to)
    # Never from a stack file: the other load balancers whose ports the hosts serve beside this one's
    # (during a move, core.move.served), each as whole settings (`serving`).
    _beside: tuple[Settings, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        idle = self.lb_idle_timeout
        network = self.load_balancer.type == "network"
        for key in ("proxy_read_timeout", "proxy_send_timeout"):
            value = getattr(self.nginx, key)
            if value is not None and value < idle:
                limit = (f"the network load balancer's longest idle timeout ({idle}: loadBalancer.idleTimeout for "
                         f"TCP, {NLB_TLS_IDLE_TIMEOUT} fixed for TLS)" if network
                         else f"loadBalancer.idleTimeout ({idle})")
                raise ValueError(
                    f"nginx.{to_camel(key)} ({value}) must be >= {limit},"
                    " or nginx closes idle WebSockets the load balancer still holds open"
                )
        if network:
            problem = self.ports.clash(Ports.PLAIN + Ports.PROXY)
            if problem:
                raise ValueError(f"{problem} (a network load balancer uses ports.proxyHttp and ports.proxyTls too)")
        if self.hosts and self.discover:
            raise ValueError("set hosts or discover: true, not both")
        problem = self.quota_problem()
        if problem:
            raise ValueError(problem)
        names = [h.name for h in self.hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"host names must be unique: {', '.join(dupes)}")
        ids = [h.instance_id for h in self.hosts if h.instance_id]
        shared = sorted({i for i in ids if ids.count(i) > 1})
        if shared:  # the record names an instance's digest: two hosts on one ID would prove each other
            raise ValueError(f"hosts[].instanceId must be unique: {', '.join(shared)} is given to more than one host")
        if self.dns and self.dns.ttl < ALIAS_TTL and not self.aws.endpoints:
            raise ValueError(f"dns.ttl {self.dns.ttl} is below the {ALIAS_TTL} s AWS gives an alias record to a load "
                             "balancer: resolvers would hold answers longer than the kit waits")
        if self.move_to:
            self._target = self._moving_to()
        return self

    def _moving_to(self) -> Settings:
        """moveTo as whole settings (validated as such), and the two load balancers' ports checked
        against each other."""
        m = self.move_to
        assert m is not None
        if not self.dns:
            raise ValueError("moveTo needs dns: the weighted records that move the clients from one load balancer "
                             "to the other")
        if m.load_balancer.name == self.load_balancer.name:
            raise ValueError(f"moveTo.loadBalancer.name is {m.load_balancer.name!r}, the name of loadBalancer: two "
                             "load balancers need two names")
        data = self.model_dump(exclude={"move_to"}, exclude_unset=False)
        data.update(load_balancer=m.load_balancer.model_dump(), proxy_protocol=m.proxy_protocol,
                    ports=m.ports.model_dump())
        try:
            target = Settings.model_validate(data)
        except ValidationError as exc:
            raise ValueError("; ".join(f"moveTo{''.join('.' + to_camel(str(p)) for p in e['loc'])}: "
                                       f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None
        problem = framing_clash(self, target)
        if problem:
            raise ValueError(problem)
        return target

    @property
    def moving_to(self) -> Settings | None:
        """The settings of the load balancer being moved to (moveTo), whole; None when no move is set."""
        return self._target

    @property
    def balancer_names(self) -> tuple[str, ...]:
        """The load balancers these settings name: loadBalancer, and moveTo's when a move is set."""
        return (self.load_balancer.name, *([self.move_to.load_balancer.name] if self.move_to else []))

    def served(self) -> dict[int, tuple[str, str]]:
        """port -> (framing, role) of every service port these settings serve: framing `plain`,
        `v1` (a Classic ELB's policy) or `v2` (a network load balancer's proxy groups)."""
        lb = self.load_balancer
        out: dict[int, tuple[str, str]] = {}
        for role in ("http", "tls"):
            port = getattr(self.ports, role)
            header = self.proxy_protocol and lb.type == "classic"
            out[port] = ("v1" if header else "plain", role)
            if lb.type == "network" and self.proxy_protocol:
                out[getattr(self.ports, f"proxy_{role}")] = ("v2", f"proxy_{role}")
        return out

    def root_of(self, host: Host) -> str:
        return host.root or self.nginx.root

    @property
    def instances(self) -> list[str]:
        """Every instance ID these settings name: loadBalancer.instances and the hosts' instanceId."""
        return sorted({*self.load_balancer.instances, *(h.instance_id for h in self.hosts if h.instance_id)})

    def quota_problem(self) -> str | None:
        """The first of AWS's default quotas for one load balancer that the configured instances
        exceed (AWS would refuse a registration halfway through a rollout), or None."""
        lb, n = self.load_balancer, len(self.instances)
        if lb.raised_quotas:
            return None
        named = f"{n} instances (loadBalancer.instances and hosts[].instanceId)"
        if lb.type == "classic":
            checks = [(n, CLASSIC_INSTANCES_QUOTA, named, "registered instances per Classic Load Balancer")]
        else:
            targets = n * KIT_TARGET_GROUPS
            counted = f"{named}, each in up to {KIT_TARGET_GROUPS} target groups: {targets} targets"
            checks = [(n, TARGET_GROUP_QUOTA, named, "targets per target group"),
                      (targets, NLB_TARGETS_QUOTA, counted, "targets per Network Load Balancer")]
            if lb.cross_zone:
                checks.append((targets, NLB_CROSS_ZONE_TARGETS_QUOTA, counted,
                               "targets per Network Load Balancer with cross-zone load balancing on "
                               "(loadBalancer.crossZone)"))
        for count, quota, what, name in checks:
            if count > quota:
                return (f"{what} exceed AWS's default quota of {quota:,} {name}: split the fleet over more "
                        "load balancers (environments), or once the account's quota is raised set "
                        "loadBalancer.raisedQuotas: true (docs/troubleshooting.md#aws-quota)")
        return None

    def bind_of(self, host: Host) -> str | None:
        return host.bind or self.nginx.bind

    @property
    def lb_idle_timeout(self) -> int:
        """The longest the load balancer keeps an idle connection open (a network load balancer's
        TLS listener: fixed at 350 s, whatever loadBalancer.idleTimeout says for TCP)."""
        idle = self.load_balancer.idle_timeout
        return max(idle, NLB_TLS_IDLE_TIMEOUT) if self.load_balancer.type == "network" else idle

    def retiring(self, ports: list[int] | set[int] | frozenset[int]) -> Settings:
        """These settings with the plain ports `ports` no longer served (only with a network load
        balancer and proxy protocol on: the ELBv2 API says their listeners forward to the proxy
        groups and the plain groups hold no target, not even a draining one)."""
        out = self.model_copy()
        if self.load_balancer.type == "network" and self.proxy_protocol:
            out._retired = frozenset(ports) & {self.ports.http, self.ports.tls}
        return out

    def serving(self, balancers: list[Settings]) -> Settings:
        """These settings, the hosts serving the ports of every load balancer in `balancers` (whole
        settings: core.move.served, each as the load balancer has it) in that order, this one's first;
        a load balancer of this name in `balancers` is this one (never served twice)."""
        out = self.model_copy()
        mine = self.load_balancer.name
        out._beside = tuple(b for b in balancers if b.load_balancer.name != mine)
        return out

    @property
    def balancers(self) -> list[Settings]:
        """The load balancers whose ports the hosts serve, as whole settings: these settings first,
        then those served beside them (`serving`); [self] without a move."""
        return [self, *self._beside]

    @property
    def retired(self) -> frozenset[int]:
        """The plain ports the hosts no longer serve (`retiring`)."""
        return self._retired

    @property
    def proxy_ports(self) -> tuple[int, int]:
        """The instance ports that get the PROXY header once the gate is open: classic, the plain
        ports themselves (the policy goes on them, `ports.proxied`); network, the proxy ports
        beside them (the listeners switch to their target groups)."""
        if self.load_balancer.type == "network":
            return (self.ports.proxy_http, self.ports.proxy_tls)
        return self.ports.proxied

    @property
    def read_timeout(self) -> int:
        return self.nginx.proxy_read_timeout or self.lb_idle_timeout + 60

    @property
    def send_timeout(self) -> int:
        return self.nginx.proxy_send_timeout or self.lb_idle_timeout + 60

    @property
    def parameter_path(self) -> str:
        return self.record.parameter_path or f"/{PROJECT}/{self.env}/readiness"

    @property
    def parameter_dir(self) -> str:
        return self.parameter_path.rsplit("/", 1)[0]


def framing_clash(source: Settings, target: Settings) -> str | None:
    """Why two load balancers of one environment cannot share the hosts (None: they can): a port
    the two would frame differently, or a service port both use (the drain counts connections per
    port, so a port must belong to one load balancer). The health port may be shared."""
    theirs = target.served()
    for port, (framing, role) in sorted(source.served().items()):
        if port in theirs:
            other, other_role = theirs[port]
            why = (f"loadBalancer {source.load_balancer.name!r} frames it {framing}, "
                   f"moveTo {target.load_balancer.name!r} {other}" if other != framing else
                   "both would send clients to it, and the drain could not tell whose connections it holds")
            return (f"port {port} is ports.{to_camel(role)} of loadBalancer and moveTo.ports.{to_camel(other_role)}: "
                    f"{why}; give moveTo.ports ports of their own")
    health = target.ports.health
    if health in source.served():
        return f"moveTo.ports.health {health} is a service port of loadBalancer"
    if source.ports.health in theirs:
        return f"ports.health {source.ports.health} is a service port of moveTo"
    return None


def stack_file(env: str, directory: Path | str = ".") -> Path:
    return Path(directory) / f"Pulumi.{env}.yaml"


NOT_FROM_THE_FILE = ("env", "aws")  # Settings fields the file names otherwise: its name, and the aws: keys


def from_config(env: str, config: dict[str, Any], source: str) -> Settings:
    """Build settings from a stack's `config:` map (keys like `wsgate:ports`, `aws:region`)."""
    data: dict[str, Any] = {"env": env, "aws": {}}
    problems: list[tuple[str, object, str]] = []
    for key, value in (config or {}).items():
        namespace, _, name = str(key).partition(":")
        if not isinstance(key, str) or not namespace or not name:
            problems.append((str(key), _shown(value), "not a namespaced key: the kit reads wsgate:KEY, aws:region "
                             "and aws:endpoints"))
        elif namespace == PROJECT and name in NOT_FROM_THE_FILE:
            problems.append((key, _shown(value), "unknown key"))
        elif namespace == PROJECT:
            data[name] = value
        elif namespace == "aws" and name in ("region", "endpoints"):
            if name == "endpoints":
                value, problem = _endpoints(value)
                if problem:
                    problems.append(("aws:endpoints", _shown(value), problem))
                    continue
            data["aws"][name] = value
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        found = [_problem(dict(e)) for e in exc.errors()]
        # a required key missing while another namespace names it: a misspelt wsgate: (`wsgte:serverName`)
        elsewhere = {str(k).partition(":")[2]: k for k in config or {}
                     if isinstance(k, str) and str(k).partition(":")[0] not in (PROJECT, "aws")}
        for i, (key, value, reason) in enumerate(found):
            other = elsewhere.get(key.removeprefix(f"{PROJECT}:")) if reason == "required" else None
            if other:
                found[i] = (key, value, f"{reason} ({other} is not read: the kit's keys are {PROJECT}:KEY)")
        raise SettingsError(source, problems + found) from None
    if problems:
        raise SettingsError(source, problems)
    return settings


class _DuplicateKey(yaml.YAMLError):
    """A mapping of the file names a key twice (YAML would keep the last one, silently)."""

    def __init__(self, key: object, line: int, first: int):
        super().__init__(f"line {line}: {key} is given twice (first on line {first}): YAML would keep only the "
                         "last; keep one")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader, refusing a key given twice in one mapping (as Pulumi does)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: the constructor refuses it as such
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def read_file(path: Path) -> Any:
    """An environment file, as YAML; a file that cannot be read or parsed is refused, naming it (and its line)."""
    def refused(reason: str) -> SettingsError:
        return SettingsError(path.name, [("file", str(path), reason)])

    try:
        text = read_text(path)
    except Unreadable as exc:
        raise refused("no such environment file" if exc.kind == "missing" else
                      "is a directory, not an environment file" if exc.kind == "directory" else exc.reason) from None
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as exc:
        raise refused(str(exc)) from None
    except yaml.YAMLError as exc:
        raise refused(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise refused("not valid YAML: nested too deeply") from None


def load(env: str, directory: Path | str = ".") -> Settings:
    """Read and validate `Pulumi.<env>.yaml` in `directory`, or the file `env` names."""
    if env.endswith((".yaml", ".yml")):
        path = Path(env)
        if not path.name.startswith("Pulumi."):
            raise SettingsError(path.name, [("file", str(path), "not a Pulumi.<env>.yaml file: the environment is "
                                             "named by its file, as Pulumi names the stack")])
        env = path.name.removeprefix("Pulumi.").rsplit(".", 1)[0]
    else:
        path = stack_file(env, directory)
    if not _ENV.match(env):
        raise SettingsError(env if "/" in env else path.name, [("env", env, "not a valid environment name")])
    doc = read_file(path)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(doc, (dict, type(None))) or not isinstance(config, (dict, type(None))):
        raise SettingsError(path.name, [("config", _shown(config if isinstance(doc, dict) else doc),
                                         "expected a mapping under config:")])
    settings = from_config(env, config or {}, path.name)
    check_neighbours(settings, path.parent, path.name)
    return settings


def check_neighbours(settings: Settings, directory: Path | str, source: str) -> None:
    """Refuse an environment that shares its readiness record or its load balancer with another
    environment file beside it (same region): one would read, overwrite or detach the other's."""
    problems: list[tuple[str, object, str]] = []
    for other in sorted(Path(directory).glob("Pulumi.*.yaml")):
        env = other.name.removeprefix("Pulumi.").rsplit(".", 1)[0]
        if env == settings.env or not _ENV.match(env):
            continue
        try:
            doc = read_file(other) or {}
            theirs = from_config(env, doc.get("config") or {}, other.name)
        except (AttributeError, SettingsError):
            continue  # reported when that environment is used
        if theirs.aws.region != settings.aws.region:
            continue
        if theirs.parameter_path == settings.parameter_path:
            problems.append((f"{PROJECT}:record.parameterPath", settings.parameter_path,
                             f"environment {env!r} ({other.name}) uses the same readiness record: each "
                             "environment needs its own"))
        for name in sorted(set(settings.balancer_names) & set(theirs.balancer_names)):
            key = "loadBalancer.name" if name == settings.load_balancer.name else "moveTo.loadBalancer.name"
            problems.append((f"{PROJECT}:{key}", name,
                             f"environment {env!r} ({other.name}) manages a load balancer of the same name in "
                             f"{settings.aws.region}: each environment needs its own"))
    if problems:
        raise SettingsError(source, problems)


def _endpoints(value: Any) -> tuple[Any, str | None]:
    """pulumi-aws's `aws:endpoints` is a list of one-key maps; flatten it. An item that is not a map is
    refused (dropping it would send that service's calls to AWS itself)."""
    if isinstance(value, list):
        if not all(isinstance(item, dict) for item in value):
            return value, "a list of maps (- ec2: URL) or one map (service: URL)"
        flat: dict[str, Any] = {}
        for item in value:
            flat.update(item)
        return flat, None
    return value, None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 200, 200, 40


class _Shown:
    """A value as a message shows it: bounded (a huge or deeply nested value is cut, not printed whole)."""

    def __init__(self, value: object):
        self.value = value

    def __repr__(self) -> str:
        return _REPR.repr(self.value)


def _shown(value: object) -> object:
    small = value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**40) \
        or (isinstance(value, str) and len(value) <= 200)
    return value if small else _Shown(value)


def _problem(error: dict[str, Any]) -> tuple[str, object, str]:
    loc = [str(p) for p in error["loc"]]
    if not loc:
        key = ""
    elif loc[:1] == ["aws"]:
        key = "aws:" + ".".join(loc[1:])
    else:
        key = f"{PROJECT}:" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    ctx_error = (error.get("ctx") or {}).get("error")
    reason = str(ctx_error) if ctx_error is not None else error["msg"]
    value = error.get("input")
    if isinstance(value, dict):  # a rule across keys: the reason names them
        value = None
    value = _shown(value)
    if error["type"] == "missing":
        value, reason = None, "required"
    elif error["type"] == "extra_forbidden":
        reason = "unknown key"
    return key, value, reason
