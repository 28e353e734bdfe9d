"""SSH edge: one strict, time-bounded connection per host (Fabric on paramiko).

Fabric's default accepts unknown host keys silently (AutoAddPolicy) and never reads
known_hosts; here every connection checks the host key against the configured known_hosts
and refuses unknown or changed keys. Connect and command timeouts are always set.
"""

from __future__ import annotations

import binascii
import logging
import os
import re
import threading
import time
from pathlib import Path

import paramiko
from fabric import Config, Connection
from paramiko.config import SSHConfig

from core.errors import KitError
from core.settings import Host, Settings, target

# paramiko logs refused channels (probes of a port not yet open) as errors; what a person
# reads is ours: our errors name host, step and cause.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

KEEPALIVE = 5  # seconds between SSH keepalives: a dead peer is noticed, an idle NAT keeps the flow


class SshError(KitError):
    """A host could not be reached, refused us, or a command could not run."""


class PortClosed(SshError):
    """The host refused a connection to one of its own ports: nothing listens there."""


class HostKeyError(SshError):
    """The host's key is unknown or differs from known_hosts."""


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


def _fabric_config(settings: Settings) -> Config:
    path = settings.ssh.config_file and os.path.expanduser(settings.ssh.config_file)
    if path and os.path.exists(path):
        return Config(runtime_ssh_path=path)
    return Config(ssh_config=SSHConfig())  # explicit and empty: read no ssh config file


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
    """Connections for one run: one per host, opened once and reused for every step."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.config = _fabric_config(settings)
        self.known_hosts = Path(os.path.expanduser(settings.ssh.known_hosts))
        self._gateways: dict[str, Connection | SshError] = {}
        self._keys: paramiko.HostKeys | None = None
        self._lock = threading.RLock()

    def _host_keys(self) -> paramiko.HostKeys:
        """known_hosts, read once; a line paramiko cannot read is named with its file and number."""
        if self._keys is None:
            keys = paramiko.HostKeys()
            if self.known_hosts.exists():
                for number, line in enumerate(self.known_hosts.read_text().splitlines(), 1):
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    try:
                        entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
                    except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError, TypeError,
                            binascii.Error) as exc:
                        raise SshError(f"known_hosts {self.known_hosts} line {number}: cannot read it "
                                       f"({exc or type(exc).__name__})") from None
                    if entry is None:
                        raise SshError(f"known_hosts {self.known_hosts} line {number}: not a host key line")
                    keys._entries.append(entry)
            self._keys = keys
        return self._keys

    def _connection(self, host: str, user: str | None, port: int | None, identity: str | None) -> Connection:
        """A Connection that checks host keys strictly and never opens a hop of its own (Fabric's
        ProxyJump support would, with AutoAddPolicy): hops are ours (`_hop`)."""
        timeout = self.settings.ssh.connect_timeout
        # A host that accepts TCP and then says nothing must not hang the run either.
        kwargs: dict = {"banner_timeout": timeout, "auth_timeout": timeout}
        if identity:
            path = os.path.expanduser(identity)
            if not os.path.isfile(path):
                raise SshError(f"identity file {identity} does not exist (ssh.identityFile or hosts[].identityFile)")
            kwargs["key_filename"] = [path]
        conn = Connection(host, user=user, port=port, config=self.config, connect_timeout=timeout,
                          connect_kwargs=kwargs, gateway=False)
        client = paramiko.SSHClient()
        keys = self._host_keys()
        for hostname, entry in keys.items():
            for key_type, key in entry.items():
                client.get_host_keys().add(hostname, key_type, key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.client = client
        return conn

    def gateway(self, spec: str) -> Connection:
        """A bastion connection (`[user@]host[:port]`, or a ProxyJump chain `a,b`), opened once
        before any thread shares it; a bastion that failed fails every host at once, untried."""
        with self._lock:
            cached = self._gateways.get(spec)
            if isinstance(cached, Connection) and not (cached.transport and cached.transport.is_active()):
                del self._gateways[spec]  # the bastion link dropped: open it again (a restore may need it)
            if spec not in self._gateways:
                try:
                    *front, last = [part.strip() for part in spec.split(",")]
                    via = self.gateway(",".join(front)) if front else None  # re-entrant: RLock
                    user, host, port = target(last)
                    conn = self._connection(host, user or self.settings.ssh.user, port,
                                            self.settings.ssh.identity_file)
                    self._open(conn, f"bastion {last}", via)
                    self._gateways[spec] = conn
                except SshError as exc:
                    self._gateways[spec] = exc
            found = self._gateways[spec]
            if isinstance(found, SshError):
                raise SshError(str(found))
            return found

    def connect(self, host: Host) -> Connection:
        ssh = self.settings.ssh
        conn = self._connection(host.address, host.ssh_user or ssh.user, host.ssh_port or ssh.port,
                                host.identity_file or ssh.identity_file)
        spec = host.gateway or ssh.gateway or conn.ssh_config.get("proxyjump")
        if not spec and conn.ssh_config.get("proxycommand"):
            conn.gateway = conn.ssh_config["proxycommand"]  # the final host's key is still checked strictly
        via = self.gateway(spec) if spec and spec.lower() != "none" else None
        self._open(conn, host.address, via)
        conn.transport.set_keepalive(KEEPALIVE)
        return conn

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
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(f"host key of {label} CHANGED: got {exc.key.get_name()} "
                               f"{exc.key.get_fingerprint().hex()}, known_hosts ({self.known_hosts}) has another. "
                               "Refusing to connect (possible man-in-the-middle).") from None
        except paramiko.AuthenticationException as exc:
            raise SshError(f"ssh {label}: authentication failed: {exc}") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(f"host key of {label} is not in {self.known_hosts}: refusing an unknown host. "
                                   f"Verify it and add it (ssh-keyscan -p PORT {conn.host} >> known_hosts)") from None
            raise SshError(f"ssh {label}: {exc}") from None
        except (TimeoutError, OSError, EOFError) as exc:
            raise SshError(f"ssh {label}:{conn.port}: cannot connect: {exc or type(exc).__name__}") from None

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

    def channel(self, conn: Connection, address: str, port: int, timeout: float = 5.0) -> paramiko.Channel:
        """A TCP connection from the host itself to address:port (direct-tcpip over this SSH session)."""
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
