"""SSH edge: one strict, time-bounded connection per host (Fabric on paramiko).

Fabric's default accepts unknown host keys silently (AutoAddPolicy) and never reads
known_hosts; here every connection checks the host key against the configured known_hosts
and refuses unknown or changed keys. Connect and command timeouts are always set.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import paramiko
from fabric import Config, Connection
from paramiko.config import SSHConfig

from core.errors import KitError
from core.settings import Host, Settings


KEEPALIVE = 5  # seconds between SSH keepalives: a dead peer is noticed, an idle NAT keeps the flow


class SshError(KitError):
    """A host could not be reached, refused us, or a command could not run."""


class HostKeyError(SshError):
    """The host's key is unknown or differs from known_hosts."""


class Session:
    """A command that holds a lock on the host and serves one request a line (core.plan._SESSION).

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
            self.chan.sendall(word.encode() + b"\n" + (payload + b"\n" if payload is not None else b""))
            while not (m := self._done.search(self._buffer)):
                chunk = _recv(self.chan.recv, self.chan, deadline)
                if not chunk:
                    raise EOFError("the host session ended")
                self._buffer += chunk
        except socket.timeout:
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
        raise socket.timeout()
    chan.settimeout(remaining)
    return recv(65536)


def _drain(recv, chan: paramiko.Channel, deadline: float) -> bytes:
    """Everything a stream of `chan` sends until EOF, or socket.timeout at `deadline`."""
    chunks = []
    while chunk := _recv(recv, chan, deadline):
        chunks.append(chunk)
    return b"".join(chunks)


def _target(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` -> (user, host, port)."""
    user, _, rest = spec.rpartition("@")
    host, _, port = rest.partition(":")
    return (user or None), host, (int(port) if port else None)


class Ssh:
    """Connections for one run: one per host, opened once and reused for every step."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.config = _fabric_config(settings)
        self.known_hosts = Path(os.path.expanduser(settings.ssh.known_hosts))
        self._gateways: dict[str, Connection] = {}
        self._lock = threading.Lock()

    def _strict(self, conn: Connection) -> Connection:
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.client = client
        return conn

    def _connection(self, host: str, user: str | None, port: int | None, identity: str | None,
                    gateway: Connection | None) -> Connection:
        timeout = self.settings.ssh.connect_timeout
        # A host that accepts TCP and then says nothing must not hang the run either.
        kwargs = {"banner_timeout": timeout, "auth_timeout": timeout}
        if identity:
            kwargs["key_filename"] = [os.path.expanduser(identity)]
        conn = Connection(host, user=user, port=port, config=self.config, connect_timeout=timeout,
                          connect_kwargs=kwargs, gateway=gateway)
        return self._strict(conn)

    def gateway(self, spec: str) -> Connection:
        """A bastion connection, opened before any thread shares it."""
        with self._lock:
            if spec not in self._gateways:
                user, host, port = _target(spec)
                conn = self._connection(host, user or self.settings.ssh.user, port, self.settings.ssh.identity_file,
                                        None)
                self._open(conn, spec)
                self._gateways[spec] = conn
            return self._gateways[spec]

    def connect(self, host: Host) -> Connection:
        ssh = self.settings.ssh
        gw_spec = host.gateway or ssh.gateway
        gw = self.gateway(gw_spec) if gw_spec else None
        conn = self._connection(host.address, host.ssh_user or ssh.user, host.ssh_port or ssh.port,
                                host.identity_file or ssh.identity_file, gw)
        self._open(conn, host.address)
        conn.transport.set_keepalive(KEEPALIVE)
        return conn

    def _open(self, conn: Connection, label: str) -> None:
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(f"host key of {label} CHANGED: got {exc.key.get_name()} "
                               f"{exc.key.get_fingerprint().hex()}, known_hosts ({self.known_hosts}) has another. "
                               "Refusing to connect (possible man-in-the-middle).") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(f"host key of {label} is not in {self.known_hosts}: refusing an unknown host. "
                                   f"Verify it and add it (ssh-keyscan -p PORT {conn.host} >> known_hosts)") from None
            raise SshError(f"ssh {label}: {exc}") from None
        except (OSError, socket.timeout, EOFError) as exc:
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
                    raise socket.timeout()
                return Result(chan.recv_exit_status(), stdout.decode(errors="replace"),
                              stderr.decode(errors="replace"))
            finally:
                chan.close()
        except socket.timeout:
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
                except socket.timeout:
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
        except socket.timeout:
            raise SshError(f"command timed out after {limit}s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"connection lost: {exc or type(exc).__name__}") from None

    def channel(self, conn: Connection, address: str, port: int, timeout: float = 5.0) -> paramiko.Channel:
        """A TCP connection from the host itself to address:port (direct-tcpip over this SSH session)."""
        try:
            chan = conn.transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"cannot reach {address}:{port} from the host: {exc or type(exc).__name__}") from None
        chan.settimeout(timeout)
        return chan

    def close(self) -> None:
        for conn in self._gateways.values():
            conn.close()
