"""SSH edge: one strict, time-bounded connection per host (Fabric on paramiko).

Fabric's default accepts unknown host keys silently (AutoAddPolicy) and never reads
known_hosts; here every connection checks the host key against the configured known_hosts
and refuses unknown or changed keys. Connect and command timeouts are always set.

At fleet size: known_hosts is indexed once per run and a key is built only for a host that
connects; the process may hold every connection at once (its open-files limit is raised, or the
run refused, up front). Every hop is the kit's own (a bastion channel, strict keys): a
ProxyCommand, which OpenSSH would run outside the kit's host key check and Ctrl-C would kill, is
refused before anything connects.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import resource
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import paramiko
from fabric import Config, Connection
from paramiko.config import SSHConfig

from core.errors import KitError
from core.files import Unreadable, read_bytes, read_text
from core.knownhosts import Entry, KnownHosts, KnownHostsError, lookup_name
from core.settings import Host, Settings, target

# paramiko logs refused channels (probes of a port not yet open) as errors; what a person
# reads is ours: our errors name host, step and cause.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

KEEPALIVE = 5  # seconds between SSH keepalives: a dead peer is noticed, an idle NAT keeps the flow
# A restore's reconnection: a bastion or host that dropped once gets this many tries, this far apart
# (a bastion that failed is tried again at most once a pause, whichever host asks).
RECONNECT_ATTEMPTS, RECONNECT_PAUSE = 4, 2.0
# Every connection is held for the whole run: one socket per host reached directly and per bastion
# hop (a host behind a bastion is a channel on the bastion's socket), plus what the process holds
# anyway (stdio, AWS clients' pools, the Pulumi engine's pipes, logs).
DESCRIPTOR_MARGIN = 128


_AEAD = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class _Transport(paramiko.Transport):
    """paramiko's transport, AES-GCM first (as OpenSSH prefers it, after ChaCha20, which paramiko lacks):
    an AEAD cipher needs no separate MAC, which paramiko checks byte by byte in Python on every
    packet. Every other algorithm, and the order of the rest, stays paramiko's.

    Its thread wakes once a keepalive interval while the connection is idle, not ten times a second:
    each wake-up takes the GIL, and a run holds every host's connection while the others work (100
    idle connections cost 67 ms of CPU a second, 6 ms so). A wake-up only sends a due keepalive and
    notices a closed transport; data and a close from the peer wake it at once, and closing it
    never waits for one."""

    _active_check_timeout = float(KEEPALIVE)
    _preferred_ciphers = _AEAD + tuple(c for c in paramiko.Transport._preferred_ciphers if c not in _AEAD)


class SshError(KitError):
    """A host could not be reached, refused us, or a command could not run."""


class PortClosed(SshError):
    """The host refused a connection to one of its own ports: nothing listens there."""


class HostKeyError(SshError):
    """The host's key is unknown or differs from known_hosts."""


class _Unsupported(HostKeyError):
    """A known_hosts line of a key type paramiko cannot build (ssh-dss, say): passed over when the host
    has another key, the reason it is refused when it has none."""


KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256/384/521", "ssh-rsa")  # what paramiko builds from known_hosts


class _UnknownKey(Exception):
    """Raised by the host key policy: paramiko found no key for the host among those we gave it."""

    def __init__(self, key: paramiko.PKey):
        super().__init__(key.get_name())
        self.key = key


class _Strict(paramiko.MissingHostKeyPolicy):
    """Refuse a host with no known key, keeping the key it presented for the message."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownKey(key)


class Session:
    """A command that holds a lock on the host and serves one request a line (`session` in core/session.sh).

    Closing it closes its stdin: the command ends and the lock is released. A request that
    times out or loses the connection leaves the session `broken`: what the host did with
    it is unknown, and nothing more is sent on it.
    """

    def __init__(self, chan: paramiko.Channel, done: str, timeout: int):
        self.chan, self.timeout = chan, timeout
        self._done = re.compile(rb"(?:^|\n)" + re.escape(done.encode()) + rb" (\d+)\n")
        self._buffer = b""
        self._busy = threading.Lock()  # one request at a time (the heartbeat must not interleave)
        self.broken = False

    def request(self, word: str, payload: bytes | None = None) -> Result:
        """Send a request (and a one-line payload); its output and exit code."""
        with self._busy:
            return self._request(word, payload)

    def ping(self) -> None:
        """Tell the host the controller is still there (unless a request is in flight: that tells it too)."""
        if not self.broken and self._busy.acquire(blocking=False):
            try:
                self._request("ping", None)
            except SshError:
                pass  # the next real request reports it
            finally:
                self._busy.release()

    def _request(self, word: str, payload: bytes | None) -> Result:
        if self.broken:
            raise SshError(f"{word}: the host session was lost earlier in this run")
        deadline = time.monotonic() + self.timeout
        try:
            self.chan.settimeout(self.timeout)
            self.chan.sendall(word.encode() + b"\n" + (payload + b"\n" if payload is not None else b""))
            while not (m := self._done.search(self._buffer)):
                chunk = _recv(self.chan.recv, self.chan, deadline)
                if not chunk:
                    raise EOFError("the host session ended")
                self._buffer += chunk
        except TimeoutError:
            self.broken = True
            raise SshError(f"{word}: no answer within {self.timeout}s (ssh.commandTimeout)") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.broken = True
            raise SshError(f"connection lost: {exc or type(exc).__name__}") from None
        output = self._buffer[:m.start()].decode(errors="replace")
        self._buffer = self._buffer[m.end():]
        return Result(int(m[1]), output, "")

    def close(self) -> None:
        self.chan.close()


class Result:
    def __init__(self, exited: int, stdout: str, stderr: str):
        self.exited, self.stdout, self.stderr = exited, stdout, stderr

    @property
    def ok(self) -> bool:
        return self.exited == 0


_SETTING = re.compile(r"^\s*(\w+)(?:\s*=\s*|\s+)(.*?)\s*$")


def _config_path(settings: Settings) -> str | None:
    """The ssh config file the run honours (None: none)."""
    path = settings.ssh.config_file and os.path.expanduser(settings.ssh.config_file)
    return path if path and os.path.exists(path) else None


def _read_text(path: str | Path, what: str) -> str:
    """A text file the run depends on; one that cannot be read is named with the cause."""
    try:
        return read_text(path)
    except Unreadable as exc:
        reason = "is a directory, not a file" if exc.kind == "directory" else exc.reason
        raise SshError(f"{what} {path}{' ' if reason.startswith('line ') else ': '}{reason}") from None


def _ssh_config(path: str) -> SSHConfig:
    """The ssh config file, parsed; a line it cannot parse is named with its number."""
    text = _read_text(path, "ssh config")
    config = SSHConfig()
    try:
        config.parse(iter(text.splitlines()))
    except paramiko.ssh_exception.ConfigParseError as exc:
        number = next((n for n, line in enumerate(text.splitlines(), 1)
                       if line.strip() and not line.strip().startswith("#")
                       and not re.match(SSHConfig.SETTINGS_REGEX, line.strip())), None)
        where = f" line {number}" if number else ""
        raise SshError(f"ssh config {path}{where}: cannot parse it ({exc}); see "
                       f"docs/troubleshooting.md#bad-ssh-config") from None
    return config


def check_identity(identity: str, key: str) -> None:
    """Refuse, before anything connects, an identity file that paramiko could not use: missing, a directory,
    unreadable, or not a key at all. A public key passes (as in OpenSSH, it may name which of the agent's
    keys to use: paramiko then authenticates with the agent), and so does an encrypted key."""
    path = Path(os.path.expanduser(identity))
    if path.name.endswith("-cert.pub"):  # a certificate: paramiko reads the private key beside it
        path = path.with_name(path.name.removesuffix("-cert.pub"))
    what = f"identity file {identity} ({key})"
    try:
        head = read_bytes(path, 65536)
    except Unreadable as exc:
        raise SshError(f"{what} does not exist" if exc.kind == "missing" else
                       f"{what}: is a directory, not a key file" if exc.kind == "directory" else
                       f"{what}: {exc.reason}") from None
    if b"PRIVATE KEY-----" not in head and not head.lstrip().startswith((b"ssh-", b"ecdsa-", b"sk-")):
        raise SshError(f"{what}: not a key (no -----BEGIN ... PRIVATE KEY----- line, nor a public key)")


def config_line(path: str, key: str, value: str) -> int | None:
    """The number of the first line of an ssh config file that sets `key` to `value`, else the first
    that sets `key` (paramiko expands %h and the like in some values); None: not found."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    setting = [(number, m[2].strip('"')) for number, line in enumerate(lines, 1)
               if (m := _SETTING.match(line)) and m[1].lower() == key]
    exact = [number for number, found in setting if found == value]
    found = exact or [number for number, _ in setting]
    return found[0] if found else None


def _fabric_config(settings: Settings) -> Config:
    path = _config_path(settings)
    # explicit either way: Fabric reads no ssh config file of its own (and cannot fail on one)
    return Config(ssh_config=_ssh_config(path) if path else SSHConfig())


def ensure_descriptors(need: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `need` where the hard limit allows; the soft limit now.

    Refuses (before any change) when the hard limit is below `need`: a run that holds every
    connection would otherwise fail partway, with hosts already changed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SshError(f"this run holds a connection to every host at once and needs {need} file descriptors; "
                       f"the limit is {soft} (hard limit {hard}): raise it (`ulimit -n {need}`) or run fewer "
                       f"hosts at a time; see docs/troubleshooting.md#too-many-open-files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


def _recv(recv, chan: paramiko.Channel, deadline: float) -> bytes:
    """One read from a stream of `chan` (b"" at EOF), or socket.timeout at `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError()
    chan.settimeout(remaining)
    return recv(65536)


def _drain(recv, chan: paramiko.Channel, deadline: float) -> bytes:
    """Everything a stream of `chan` sends until EOF, or socket.timeout at `deadline`."""
    chunks = []
    while chunk := _recv(recv, chan, deadline):
        chunks.append(chunk)
    return b"".join(chunks)


class Ssh:
    """Connections for one run: one per host, opened once and reused for every step.

    known_hosts is read once per run into an index (core/knownhosts.py); a host's keys are built
    only when it connects, from the lines that name it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.config_path = _config_path(settings)
        self.config = _fabric_config(settings)
        self.known_hosts = Path(os.path.expanduser(settings.ssh.known_hosts))
        self._gateways: dict[str, Connection | tuple[SshError, float]] = {}
        self._index: KnownHosts | None = None
        self._keys: dict[str, list[paramiko.PKey]] = {}  # lookup name -> its keys, built once
        self.decoded = 0  # keys built from known_hosts this run (every other line stays text)
        self._lock = threading.RLock()

    @classmethod
    def for_run(cls, settings: Settings, hosts: Iterable[Host]) -> Ssh:
        """The run's connections, with its bad input refused up front (`preflight`)."""
        ssh = cls(settings)
        ssh.preflight(hosts)
        return ssh

    # -- up front: everything a run needs, checked before any host is touched ---------------

    def preflight(self, hosts: Iterable[Host]) -> None:
        """Refuse bad input before any connection: known_hosts unreadable or malformed, an ssh config
        value Fabric cannot take (named with file and line), a ProxyCommand hop, an identity file that
        is not a readable private key; then make sure the process may hold every connection of the run
        at once."""
        self.index()
        sockets: set[str] = set()
        hosts = list(hosts)
        ssh = self.settings.ssh
        identities = {ssh.identity_file: "ssh.identityFile"} if ssh.identity_file else {}
        for host in hosts:
            if host.identity_file:
                identities.setdefault(host.identity_file, f"hosts[{host.name}].identityFile")
            elif not ssh.identity_file:  # paramiko tries the ssh config's IdentityFile: one it cannot open ends it
                for identity in self._check_config(host.address, hop_given=True).get("identityfile", []):
                    identities.setdefault(identity, f"IdentityFile (for {host.address}) of ssh config "
                                                    f"{self.config_path}" + self._line("identityfile", identity))
        for host in hosts:
            spec = self._hop_spec(host)
            if spec:
                hops = [part.strip() for part in spec.split(",")]
                sockets.update(",".join(hops[:i + 1]) for i in range(len(hops)))
                for hop in hops:  # the kit opens each hop itself: only what Fabric reads of it counts
                    self._check_config(target(hop)[1], hop_given=True)
            else:
                sockets.add(f"host {host.name}")
        for identity, key in identities.items():
            check_identity(identity, key)
        ensure_descriptors(len(sockets) + DESCRIPTOR_MARGIN)

    def _line(self, key: str, value: str) -> str:
        number = config_line(self.config_path, key, value) if self.config_path else None
        return f" line {number}" if number else ""

    def _hop_spec(self, host: Host) -> str | None:
        """The bastion chain a host is reached through (None: directly); checks the host's ssh config."""
        ssh = self.settings.ssh
        given = host.gateway or ssh.gateway  # the kit's own hop: the config's ProxyJump/ProxyCommand do not apply
        lookup = self._check_config(host.address, hop_given=bool(given))
        spec = given or lookup.get("proxyjump")
        return spec if spec and spec.lower() != "none" else None

    def _check_config(self, name: str, hop_given: bool = False) -> dict:
        """What the ssh config says for `name`, refused with its file and line where Fabric would fail
        on it (a port that is not a number, a ProxyJump that is not [user@]host[:port]) or where the
        kit would lose control of a hop (ProxyCommand)."""
        if not self.config_path:
            return {}
        path = self.config_path
        try:
            found = dict(self.config.base_ssh_config.lookup(name))
        except (paramiko.SSHException, ValueError, KeyError, TypeError) as exc:
            raise SshError(f"ssh config {path}: cannot apply it to {name} ({exc}); see "
                           f"docs/troubleshooting.md#bad-ssh-config") from None

        def where(key: str, value: str) -> str:
            number = config_line(path, key, value)
            return f"ssh config {path}" + (f" line {number}" if number else "")

        port = found.get("port")
        if port is not None and not (str(port).isdigit() and 1 <= int(port) <= 65535):
            raise SshError(f"{where('port', port)}: Port {port} (for {name}) is not a number from 1 to 65535; see "
                           f"docs/troubleshooting.md#bad-ssh-config")
        jump = None if hop_given else found.get("proxyjump")
        if jump and jump.lower() != "none":
            for hop in jump.split(","):
                try:
                    target(hop)
                except ValueError as exc:
                    raise SshError(f"{where('proxyjump', jump)}: ProxyJump {jump} (for {name}): {exc}; each hop "
                                   f"must be [user@]host[:port] (a user of letters, digits, _ and -; no ssh:// "
                                   f"URI); see docs/troubleshooting.md#bad-ssh-config") from None
        command = found.get("proxycommand")
        if command and command.lower() != "none" and not jump and not hop_given:
            raise SshError(f"{where('proxycommand', command)}: ProxyCommand (for {name}) is refused: OpenSSH would "
                           "check that hop's host key by its own config, not ssh.knownHosts, and Ctrl-C would kill "
                           "it mid-step. Use ProxyJump or ssh.gateway, which the kit opens itself with strict host "
                           f"keys; see docs/troubleshooting.md#proxycommand-refused")
        return found

    # -- known_hosts ------------------------------------------------------------------------

    def index(self) -> KnownHosts:
        """known_hosts, indexed once per run (no key built); an unreadable file or a malformed line is
        named with file and line. A missing file is empty: every host is then refused as unknown."""
        with self._lock:
            if self._index is None:
                text = _read_text(self.known_hosts, "known_hosts") if self.known_hosts.exists() else ""
                try:
                    self._index = KnownHosts.parse(text, str(self.known_hosts))
                except KnownHostsError as exc:
                    raise SshError(str(exc)) from None
            return self._index

    def host_keys(self, host: str, port: int | None) -> list[paramiko.PKey]:
        """The keys `host` may present on `port`, built from the lines that name it (once per run)."""
        name = lookup_name(host, port)
        with self._lock:
            if name in self._keys:
                return self._keys[name]
        index = self.index()
        keys, unsupported = [], []
        try:  # outside the lock: hashed lines cost an HMAC each, and every other host's connect goes on meanwhile
            for entry in index.keys(host, port):
                try:
                    keys.append(self._decode(entry))
                except _Unsupported as exc:
                    unsupported.append(exc)  # as OpenSSH: a line of a type it cannot read is passed over
        except KnownHostsError as exc:
            raise HostKeyError(str(exc)) from None
        if unsupported and not keys:
            raise unsupported[0]
        with self._lock:
            return self._keys.setdefault(name, keys)

    def _decode(self, entry: Entry) -> paramiko.PKey:
        try:
            key = paramiko.PKey.from_type_string(entry.key_type, base64.b64decode(entry.key))
        except paramiko.pkey.UnknownKeyType:
            raise _Unsupported(f"known_hosts {self.known_hosts} line {entry.number}: key type {entry.key_type} is "
                               f"not one the kit can check ({', '.join(KEY_TYPES)}); add another key of the host "
                               "(ssh-keyscan -t ed25519)") from None
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            raise HostKeyError(f"known_hosts {self.known_hosts} line {entry.number}: cannot read its "
                               f"{entry.key_type} key ({exc or type(exc).__name__})") from None
        with self._lock:
            self.decoded += 1
        return key

    # -- connections ------------------------------------------------------------------------

    def _connection(self, host: str, user: str | None, port: int | None, identity: str | None) -> Connection:
        """A Connection that checks host keys strictly and never opens a hop of its own (Fabric's
        ProxyJump support would, with AutoAddPolicy): hops are ours (`_hop`)."""
        timeout = self.settings.ssh.connect_timeout
        # A host that accepts TCP and then says nothing must not hang the run either.
        kwargs: dict = {"banner_timeout": timeout, "auth_timeout": timeout, "transport_factory": _Transport}
        if identity:
            path = os.path.expanduser(identity)
            if not os.path.isfile(path):
                raise SshError(f"identity file {identity} does not exist (ssh.identityFile or hosts[].identityFile)")
            kwargs["key_filename"] = [path]
        try:  # a Config of its own: Connection() re-merges it, and open() reads it (another thread's would
            # see it half-merged, empty: "No attribute or config key found for 'authentication'")
            conn = Connection(host, user=user, port=port, config=self.config.clone(), connect_timeout=timeout,
                              connect_kwargs=kwargs, gateway=False)
        except (ValueError, KeyError, TypeError) as exc:  # an ssh config value Fabric cannot take
            raise SshError(f"ssh config {self.config_path}: a value for {host} cannot be used ({exc}); see "
                           f"docs/troubleshooting.md#bad-ssh-config") from None
        client = paramiko.SSHClient()
        known = client.get_host_keys()
        for key in self.host_keys(conn.host, conn.port):
            known.add(lookup_name(conn.host, conn.port), key.get_name(), key)
        client.set_missing_host_key_policy(_Strict())
        conn.client = client
        return conn

    def gateway(self, spec: str, retry: bool = False) -> Connection:
        """A bastion connection (`[user@]host[:port]`, or a ProxyJump chain `a,b`), opened once
        before any thread shares it; a bastion that failed fails every host at once, untried.
        `retry` (a restore): one that failed, or dropped, is tried again, at most once a
        RECONNECT_PAUSE whichever host asks."""
        with self._lock:
            cached = self._gateways.get(spec)
            if isinstance(cached, Connection) and not (cached.transport and cached.transport.is_active()):
                cached.close()
                del self._gateways[spec]  # the bastion link dropped: open it again (a restore needs it)
            elif isinstance(cached, tuple) and retry and time.monotonic() - cached[1] >= RECONNECT_PAUSE:
                del self._gateways[spec]
            if spec not in self._gateways:
                try:
                    *front, last = [part.strip() for part in spec.split(",")]
                    via = self.gateway(",".join(front), retry) if front else None  # re-entrant: RLock
                    user, host, port = target(last)
                    conn = self._connection(host, user or self.settings.ssh.user, port,
                                            self.settings.ssh.identity_file)
                    self._open(conn, f"bastion {last}", via)
                    conn.transport.set_keepalive(KEEPALIVE)
                    self._gateways[spec] = conn
                except SshError as exc:
                    self._gateways[spec] = (exc, time.monotonic())
            found = self._gateways[spec]
            if isinstance(found, tuple):
                raise type(found[0])(str(found[0]))
            return found

    def connect(self, host: Host, retry: bool = False) -> Connection:
        ssh = self.settings.ssh
        conn = self._connection(host.address, host.ssh_user or ssh.user, host.ssh_port or ssh.port,
                                host.identity_file or ssh.identity_file)
        spec = self._hop_spec(host)
        via = self.gateway(spec, retry) if spec else None
        self._open(conn, host.address, via)
        conn.transport.set_keepalive(KEEPALIVE)
        return conn

    def reconnect(self, host: Host) -> Connection:
        """A restore's connection: a host (or its bastion) that dropped gets RECONNECT_ATTEMPTS tries,
        RECONNECT_PAUSE apart; a host key problem is not retried (it does not pass by itself)."""
        for attempt in range(1, RECONNECT_ATTEMPTS + 1):
            try:
                return self.connect(host, retry=True)
            except HostKeyError:
                raise
            except SshError as exc:
                if attempt == RECONNECT_ATTEMPTS:
                    raise SshError(f"{exc} (tried {attempt} times)") from None
                time.sleep(RECONNECT_PAUSE)
        raise AssertionError("unreachable")

    def _open(self, conn: Connection, label: str, via: Connection | None = None) -> None:
        timeout = self.settings.ssh.connect_timeout
        try:
            if via is not None:  # the tunnel through the bastion is bounded by the connect timeout too
                try:
                    conn.connect_kwargs["sock"] = via.transport.open_channel(
                        "direct-tcpip", (conn.host, conn.port), ("127.0.0.1", 0), timeout=timeout)
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    raise SshError(f"ssh {label}:{conn.port}: cannot connect through the bastion: "
                                   f"{exc or type(exc).__name__}") from None
            conn.open()
        except _UnknownKey as exc:
            conn.close()
            raise self._unknown(conn, label, exc.key) from None
        except paramiko.BadHostKeyException as exc:
            conn.close()
            revoked = self._revoked(conn, exc.key)
            if revoked:
                raise revoked from None
            raise HostKeyError(f"host key of {label} CHANGED: got {exc.key.get_name()} "
                               f"{exc.key.get_fingerprint().hex()}, known_hosts ({self.known_hosts}) has another. "
                               "Refusing to connect (possible man-in-the-middle).") from None
        except paramiko.AuthenticationException as exc:
            raise SshError(f"ssh {label}: authentication failed: {exc}") from None
        except paramiko.SSHException as exc:
            raise SshError(f"ssh {label}: {exc}") from None
        except (TimeoutError, OSError, EOFError) as exc:
            raise SshError(f"ssh {label}:{conn.port}: cannot connect: {exc or type(exc).__name__}") from None

    def _revoked(self, conn: Connection, key: paramiko.PKey) -> HostKeyError | None:
        entry = self.index().revoked(conn.host, conn.port, key.get_name(), key.get_base64())
        if entry is None:
            return None
        return HostKeyError(f"host key of {lookup_name(conn.host, conn.port)} is REVOKED (@revoked, known_hosts "
                            f"{self.known_hosts} line {entry.number}): refusing to connect")

    def _unknown(self, conn: Connection, label: str, key: paramiko.PKey) -> HostKeyError:
        return self._revoked(conn, key) or HostKeyError(
            f"host key of {label} is not in {self.known_hosts}: refusing an unknown host "
            f"({key.get_name()} {key.get_fingerprint().hex()} as {lookup_name(conn.host, conn.port)}). "
            f"Verify it and add it (ssh-keyscan -p PORT {conn.host} >> known_hosts)")

    def run(self, conn: Connection, command: str, timeout: int | None = None) -> Result:
        """Run one command; a non-zero exit is a result, a lost connection or a timeout an error.
        A bare exec channel on the open transport: no pty, no runner threads, one round trip."""
        limit = timeout or self.settings.ssh.command_timeout
        deadline = time.monotonic() + limit
        try:
            chan = conn.transport.open_session(timeout=limit)
            try:
                chan.exec_command(command)
                chan.shutdown_write()
                stdout = _drain(chan.recv, chan, deadline)
                stderr = _drain(chan.recv_stderr, chan, deadline)
                if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError()
                return Result(chan.recv_exit_status(), stdout.decode(errors="replace"),
                              stderr.decode(errors="replace"))
            finally:
                chan.close()
        except TimeoutError:
            raise SshError(f"command timed out after {limit}s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"connection lost: {exc or type(exc).__name__}") from None

    def hold(self, conn: Connection, command: str, marker: str, done: str,
             timeout: int | None = None) -> tuple[Result, Session | None]:
        """Start a session command: one that prints `marker`, then serves requests (see Session).

        Returns what it printed up to the marker and the session; if it ends without the
        marker (the lock is taken, say), its result and None.
        """
        limit = timeout or self.settings.ssh.command_timeout
        deadline = time.monotonic() + limit
        try:
            chan = conn.transport.open_session(timeout=limit)
            chan.exec_command(command)
            out = b""
            while marker.encode() not in out:
                try:
                    chunk = _recv(chan.recv, chan, deadline)
                except TimeoutError:
                    chan.close()
                    raise
                if not chunk:  # it ended: the marker will not come
                    stderr = _drain(chan.recv_stderr, chan, deadline)
                    chan.status_event.wait(max(0.0, deadline - time.monotonic()))
                    code = chan.recv_exit_status() if chan.exit_status_ready() else -1
                    chan.close()
                    return Result(code, out.decode(errors="replace"), stderr.decode(errors="replace")), None
                out += chunk
            head, _, rest = out.partition(marker.encode())
            session = Session(chan, done, limit)
            session._buffer = rest.lstrip(b"\n")
            return Result(0, head.decode(errors="replace"), ""), session
        except TimeoutError:
            raise SshError(f"command timed out after {limit}s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"connection lost: {exc or type(exc).__name__}") from None

    def channel(self, conn: Connection, address: str, port: int, timeout: float | None = None) -> paramiko.Channel:
        """A TCP connection from the host itself to address:port (direct-tcpip over this SSH session);
        opening it and each read on it bounded by `timeout` (default ssh.connectTimeout)."""
        timeout = float(self.settings.ssh.connect_timeout) if timeout is None else timeout
        try:
            chan = conn.transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:
            if exc.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED:  # the host's own connect was refused
                raise PortClosed(f"nothing listens on {address}:{port} on the host") from None
            raise SshError(f"cannot reach {address}:{port} from the host: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"cannot reach {address}:{port} from the host: {exc or type(exc).__name__}") from None
        chan.settimeout(timeout)
        return chan

    def close(self) -> None:
        """Close every bastion connection (hosts' connections are closed by their users)."""
        for conn in self._gateways.values():
            if isinstance(conn, Connection):
                conn.close()
        self._gateways.clear()
